"""Prompt-lookup (n-gram) drafting, torch-free.

Prompt lookup drafts by copying: it finds an earlier occurrence of the last ``n`` tokens of the
text so far (prompt + output) and proposes the tokens that followed it. It costs microseconds, needs
no model, and is excellent when the output copies its input (summaries, QA over a given text) and
useless on free chat. This module mirrors Hugging Face's ``PromptLookupCandidateGenerator``:

- try ``n = max_ngram, max_ngram - 1, ..., min_ngram`` and stop at the first ``n`` that matches;
- among the occurrences of the suffix n-gram, take the **earliest** one (HF scans the matches in
  order and takes the first whose continuation is non-empty). Because the earliest occurrence is
  also the earliest occurrence in every longer prefix, this choice is what makes
  :func:`propose_all` vectorisable;
- the continuation is cut at the end of the known text, so it may hold fewer than ``num_tokens``.

The suffix itself is never a match (its continuation would be empty).

>>> import numpy as np
>>> draft, n = propose(np.array([5, 6, 7, 8, 5, 6]), num_tokens=3)
>>> draft.tolist(), n
([7, 8, 5], 2)
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["propose", "propose_all"]


def _check(max_ngram: int, min_ngram: int) -> None:
    if min_ngram < 1 or max_ngram < min_ngram:
        raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, max_ngram={max_ngram}")


def propose(
    tokens: np.ndarray, max_ngram: int = 3, min_ngram: int = 1, *, num_tokens: int
) -> tuple[np.ndarray, int]:
    """Draft up to ``num_tokens`` tokens to follow ``tokens`` (prompt + output so far).

    Returns ``(draft, n)``: the proposed tokens and the length of the matched suffix n-gram, or an
    empty array and 0 when no n-gram of length ``min_ngram..max_ngram`` recurs.
    """
    _check(max_ngram, min_ngram)
    tokens = np.asarray(tokens).ravel()
    length = tokens.shape[0]
    empty = tokens[:0]
    if num_tokens <= 0:
        return empty, 0
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        # Windows starting before length - n: the suffix window itself has nothing after it.
        windows = sliding_window_view(tokens[:-1], n)
        hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[0]) + n
            return tokens[start : min(start + num_tokens, length)].copy(), n
    return empty, 0


def propose_all(
    tokens: np.ndarray, prompt_len: int, max_ngram: int = 3, min_ngram: int = 1, k_max: int = 16
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What :func:`propose` would offer at every output position, in one vectorised pass.

    ``tokens`` is the prompt followed by the full output. For output position ``t`` the drafter
    sees ``tokens[:prompt_len + t]`` and proposes tokens for output positions ``t, t+1, ...``.

    Returns
    -------
    avail : uint8 (n_out,)
        Number of tokens offered at ``t`` (``0..k_max``).
    ngram_len : uint8 (n_out,)
        Length of the matched suffix n-gram at ``t`` (0 when nothing matched).
    drafts : int64 (n_out, k_max)
        The proposals, padded with -1 beyond ``avail[t]``.

    The trick: an n-gram's earliest occurrence in the whole sequence is also its earliest
    occurrence in any prefix that contains it. So with ``first[s]`` = first start of the n-gram
    starting at ``s``, the suffix ending at ``p`` matches earlier iff ``first[p - n] < p - n``,
    and the match is exactly the one :func:`propose` picks.

    >>> avail, ngram, drafts = propose_all(np.array([1, 2, 3, 1, 2, 3]), prompt_len=3, k_max=2)
    >>> avail.tolist(), ngram.tolist(), drafts.tolist()
    ([0, 2, 2], [0, 1, 2], [[-1, -1], [2, 3], [3, 1]])
    """
    _check(max_ngram, min_ngram)
    tokens = np.asarray(tokens).ravel().astype(np.int64)
    length = tokens.shape[0]
    if not 0 <= prompt_len <= length:
        raise ValueError(f"prompt_len={prompt_len} outside [0, {length}]")
    n_out = length - prompt_len
    ends = prompt_len + np.arange(n_out)  # p: the prefix length when drafting output position t
    match_start = np.full(n_out, -1, dtype=np.int64)  # where the continuation begins (f + n)
    ngram_len = np.zeros(n_out, dtype=np.uint8)
    for n in range(max_ngram, min_ngram - 1, -1):
        if length < n:
            continue
        windows = sliding_window_view(tokens, n)  # (length - n + 1, n)
        _, first_idx, inverse = np.unique(windows, axis=0, return_index=True, return_inverse=True)
        first = first_idx[inverse.ravel()]  # first[s]: earliest start of the n-gram at s
        suffix = ends - n  # start of the suffix n-gram
        ok = (suffix >= 0) & (match_start < 0)
        ok[ok] = first[suffix[ok]] < suffix[ok]
        match_start[ok] = first[suffix[ok]] + n
        ngram_len[ok] = n
    found = match_start >= 0
    avail = np.where(found, np.minimum(k_max, ends - match_start), 0)
    idx = match_start[:, None] + np.arange(k_max)[None, :]
    valid = np.arange(k_max)[None, :] < avail[:, None]
    drafts = np.where(valid, tokens[np.clip(idx, 0, max(length - 1, 0))], -1) if length else np.full((0, k_max), -1)
    return avail.astype(np.uint8), ngram_len, drafts.astype(np.int64)
