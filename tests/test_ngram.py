"""Prompt-lookup drafter: exact tiny cases and the vectorised batch form against the scalar one."""

from __future__ import annotations

import numpy as np
import pytest

from adaptk.ngram import propose, propose_all


def test_longest_ngram_wins() -> None:
    # suffix [1, 2]: the bigram recurs at 0, so the unigram match at 4 is never considered
    draft, n = propose(np.array([1, 2, 9, 9, 2, 7, 1, 2]), max_ngram=3, num_tokens=4)
    assert n == 2
    assert draft.tolist() == [9, 9, 2, 7]


def test_earliest_match_is_taken() -> None:
    # "5" occurs at 0 (followed by 1) and at 2 (followed by 2): HF order takes the first
    draft, n = propose(np.array([5, 1, 5, 2, 5]), num_tokens=1)
    assert (draft.tolist(), n) == ([1], 1)


def test_continuation_cut_at_end_of_text() -> None:
    draft, n = propose(np.array([3, 3]), num_tokens=5)
    assert (draft.tolist(), n) == ([3], 1)


def test_no_match_and_suffix_is_not_a_match() -> None:
    draft, n = propose(np.array([1, 2, 3, 4]), num_tokens=3)
    assert draft.size == 0 and n == 0
    draft, n = propose(np.array([7]), num_tokens=3)
    assert draft.size == 0 and n == 0


def test_min_ngram_limits_search() -> None:
    tokens = np.array([4, 8, 1, 4])
    assert propose(tokens, max_ngram=3, min_ngram=2, num_tokens=2)[1] == 0
    assert propose(tokens, max_ngram=3, min_ngram=1, num_tokens=2)[0].tolist() == [8, 1]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="min_ngram"):
        propose(np.array([1, 2]), max_ngram=1, min_ngram=2, num_tokens=1)
    with pytest.raises(ValueError, match="prompt_len"):
        propose_all(np.array([1, 2]), prompt_len=3)


def test_propose_all_tiny() -> None:
    avail, ngram, drafts = propose_all(np.array([1, 2, 3, 1, 2, 3]), prompt_len=3, k_max=2)
    assert avail.tolist() == [0, 2, 2]
    assert ngram.tolist() == [0, 1, 2]
    assert drafts.tolist() == [[-1, -1], [2, 3], [3, 1]]
    assert avail.dtype == np.uint8 and ngram.dtype == np.uint8


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("max_ngram,min_ngram", [(3, 1), (4, 2), (1, 1)])
def test_propose_all_matches_propose(seed: int, max_ngram: int, min_ngram: int) -> None:
    rng = np.random.default_rng(seed)
    vocab = int(rng.integers(2, 8))
    tokens = rng.integers(0, vocab, size=int(rng.integers(1, 60)))
    prompt_len = int(rng.integers(0, len(tokens) + 1))
    k_max = int(rng.integers(1, 7))
    avail, ngram, drafts = propose_all(tokens, prompt_len, max_ngram, min_ngram, k_max)
    assert avail.shape == ngram.shape == (len(tokens) - prompt_len,)
    for t in range(len(tokens) - prompt_len):
        draft, n = propose(tokens[: prompt_len + t], max_ngram, min_ngram, num_tokens=k_max)
        assert n == ngram[t]
        assert len(draft) == avail[t]
        assert drafts[t, : avail[t]].tolist() == draft.tolist()
        assert (drafts[t, avail[t] :] == -1).all()
