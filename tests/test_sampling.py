"""Rejection sampling: exact tiny cases, and speculative samples distributed as target samples."""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
scipy_stats = pytest.importorskip("scipy.stats")

import adaptk.decoding.reference as reference_module  # noqa: E402
from adaptk.decoding import DraftModelDrafter, PromptLookupDrafter, SpeculativeDecoder  # noqa: E402
from adaptk.decoding.sampling import greedy_verify, logits_to_probs, rejection_sample  # noqa: E402

VOCAB = 8


def test_top_p_matches_hf_warper():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0)) * 3
    warper = transformers.generation.logits_process.TopPLogitsWarper(top_p=0.8)
    want = warper(None, logits.clone() / 0.7).softmax(-1)
    assert torch.allclose(logits_to_probs(logits, 0.7, 0.8), want, atol=1e-6)


def test_exact_cases():
    p = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]])  # [1, K+1=3, V=3]
    drafts = torch.tensor([[1, 0]])
    # point-mass drafter: draft 1 is certain under p -> accepted; draft 0 has p=0 -> rejected,
    # recovered from p_1 with token 0 removed -> token 2
    a, y = rejection_sample(p, drafts, None, torch.tensor([2]))
    assert a.tolist() == [1] and y.tolist() == [2]
    # q == p: everything accepted, bonus from p_2
    q = p[:, :2]
    a, y = rejection_sample(p, torch.tensor([[1, 2]]), q, torch.tensor([2]))
    assert a.tolist() == [2] and y.tolist() == [0]
    # num_draft = 0: plain sampling from p_0
    a, y = rejection_sample(p, drafts, None, torch.tensor([0]))
    assert a.tolist() == [0] and y.tolist() == [1]
    # greedy: accept while equal to argmax
    a, y, _ = greedy_verify(torch.log(p + 1e-9), torch.tensor([[1, 1]]), torch.tensor([2]))
    assert a.tolist() == [1] and y.tolist() == [2]


def peaky_llama(num_layers, seed, scale):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
                                      pad_token_id=None, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)  # make next-token distributions far from uniform
    return model


@pytest.fixture(scope="module")
def target():
    return peaky_llama(2, 0, 40.0)


def exact_two_token_distribution(model, prompt, temperature, top_p):
    """P(y1, y2) = p(y1 | prompt) p(y2 | prompt, y1), exactly: [V, V]."""
    with torch.inference_mode():
        first = logits_to_probs(model(torch.tensor([prompt])).logits[0, -1], temperature, top_p)
        ids = torch.tensor([prompt + [y] for y in range(VOCAB)])
        second = logits_to_probs(model(ids).logits[:, -1], temperature, top_p)
    return (first[:, None] * second).numpy()


def chi_square_pvalue(samples: np.ndarray, probs: np.ndarray) -> float:
    counts = np.bincount(samples, minlength=probs.size).astype(float)
    expected = probs.ravel().astype(np.float64) * len(samples)
    if counts[expected == 0].sum():
        return 0.0  # sampled a token pair of probability 0 (e.g. outside the top-p nucleus)
    big = expected >= 5  # pool the rare cells so the chi-square approximation holds
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    exp = exp[keep] * obs[keep].sum() / exp[keep].sum()  # float32 probabilities: renormalise
    obs = obs[keep]
    return float(scipy_stats.chisquare(obs, exp).pvalue)


def speculative_samples(decoder, prompt, n, temperature, top_p, seed):
    result = decoder.generate([prompt] * n, max_new_tokens=2, temperature=temperature, top_p=top_p, seed=seed,
                              eos_token_id=None)
    tokens = np.array([r.tokens for r in result])
    assert tokens.shape == (n, 2)
    return tokens[:, 0] * VOCAB + tokens[:, 1], result


ALWAYS_ACCEPT = functools.partial(rejection_sample, accept_rule=lambda p_x, q_x, u: torch.ones_like(p_x, dtype=torch.bool))

# the first token is drafted (k = 1 fits the 2-token budget) and verified; the second is the
# bonus / recovered token or a fresh sample: the joint law of both tests the whole step


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 0.9)])
def test_draft_model_sampling_matches_target(target, temperature, top_p, monkeypatch):
    prompt = [1, 2, 3, 4]
    exact = exact_two_token_distribution(target, prompt, temperature, top_p)
    draft = peaky_llama(1, 7, 25.0)  # a different model: partial acceptance
    decoder = SpeculativeDecoder(target, drafter=DraftModelDrafter(draft), controller={"name": "fixed", "params": {"k": 3}},
                                 k_max=3)
    samples, result = speculative_samples(decoder, prompt, 6000, temperature, top_p, seed=0)
    steps = sum(r.num_steps for r in result)
    accepted = sum(r.num_accepted_tokens for r in result)
    assert 0.05 < accepted / sum(r.num_draft_tokens for r in result) < 0.95  # both branches exercised
    assert steps < 2 * 6000  # speculation really emitted two tokens in one step sometimes
    assert chi_square_pvalue(samples, exact) > 1e-3

    monkeypatch.setattr(reference_module, "rejection_sample", ALWAYS_ACCEPT)
    wrong, _ = speculative_samples(decoder, prompt, 6000, temperature, top_p, seed=0)
    assert chi_square_pvalue(wrong, exact) < 1e-6


def test_prompt_lookup_sampling_matches_target(target, monkeypatch):
    prompt = [3, 5, 3, 5, 3]  # suffix "5 3" / "3" recur: prompt lookup proposes a point mass
    exact = exact_two_token_distribution(target, prompt, 1.0, 1.0)
    decoder = SpeculativeDecoder(target, drafter=PromptLookupDrafter(), controller="fixed", k_max=3)
    samples, result = speculative_samples(decoder, prompt, 6000, 1.0, 1.0, seed=1)
    assert all(r.num_draft_tokens >= 1 for r in result)
    assert 0 < sum(r.num_accepted_tokens for r in result) < 6000
    assert chi_square_pvalue(samples, exact) > 1e-3

    monkeypatch.setattr(reference_module, "rejection_sample", ALWAYS_ACCEPT)
    wrong, _ = speculative_samples(decoder, prompt, 6000, 1.0, 1.0, seed=1)
    assert chi_square_pvalue(wrong, exact) < 1e-6


def test_seeded_sampling_is_reproducible(target):
    decoder = SpeculativeDecoder(target, drafter=PromptLookupDrafter(), controller="fixed", k_max=3)
    a = decoder.generate([[3, 5, 3, 5, 3]] * 4, max_new_tokens=8, temperature=1.0, seed=3, eos_token_id=None)
    b = decoder.generate([[3, 5, 3, 5, 3]] * 4, max_new_tokens=8, temperature=1.0, seed=3, eos_token_id=None)
    assert [r.tokens for r in a] == [r.tokens for r in b]
