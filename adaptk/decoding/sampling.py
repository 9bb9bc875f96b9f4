"""Verification: greedy matching and speculative rejection sampling.

Glossary (as in vLLM's ``rejection_sampler.py``), per sequence ``i`` with ``k_i`` drafted tokens:

* **accepted tokens** — the leading drafts the target keeps, ``a_i <= k_i``;
* **recovered token** — at the first rejection ``j = a_i < k_i``, a token drawn from the residual
  ``norm(max(p_j - q_j, 0))``;
* **bonus token** — after a full acceptance (``a_i = k_i``), a token drawn from ``p_{k_i}``.

Each step emits ``a_i + 1`` tokens. Rejection sampling (Leviathan et al. 2023, Chen et al. 2023):
accept draft ``x_j ~ q_j`` with probability ``min(1, p_j(x_j) / q_j(x_j))``; the emitted tokens are
then distributed exactly as sampling from ``p`` token by token. Prompt lookup proposes
deterministically, i.e. ``q_j`` is a point mass at ``x_j``: accept with probability ``p_j(x_j)``
and recover from ``p_j`` with ``x_j`` removed.

Shapes: ``b`` sequences, ``K = max_i k_i`` draft columns, ``V`` vocabulary; target logits/probs
have ``K + 1`` columns (column ``j`` predicts the token after draft ``j``; column 0 follows the
last emitted token).
"""

from __future__ import annotations

import torch

__all__ = ["logits_to_probs", "greedy_verify", "rejection_sample", "draft_signals"]


def logits_to_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """The sampling distribution: ``softmax(logits / T)`` restricted to the top-p nucleus.

    Nucleus as in Hugging Face's ``TopPLogitsWarper``: drop the least likely tokens whose cumulative
    probability stays within ``1 - top_p``; the most likely token is always kept.
    """
    logits = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


def _accepted_count(accept: torch.Tensor, num_draft: torch.Tensor) -> torch.Tensor:
    """Leading run of ``True`` among each row's first ``num_draft[i]`` columns. accept: [b, K]."""
    K = accept.shape[1]
    valid = torch.arange(K, device=accept.device)[None, :] < num_draft[:, None]
    return (accept & valid).long().cumprod(1).sum(1)


def greedy_verify(target_logits: torch.Tensor, draft_tokens: torch.Tensor, num_draft: torch.Tensor):
    """Greedy: accept while ``x_j == argmax p_j``; the bonus is ``argmax p_a``.

    target_logits: [b, K+1, V]; draft_tokens: [b, K]; num_draft: [b]. Returns
    ``(num_accepted [b], next_token [b], target_tokens [b, K+1])``.
    """
    target = target_logits.argmax(-1)  # [b, K+1]
    accepted = _accepted_count(draft_tokens == target[:, :-1], num_draft)
    bonus = target.gather(1, accepted[:, None])[:, 0]
    return accepted, bonus, target


def rejection_sample(
    target_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    num_draft: torch.Tensor,
    generator: torch.Generator | None = None,
    accept_rule=None,
):
    """Speculative sampling. Returns ``(num_accepted [b], next_token [b])``.

    target_probs: [b, K+1, V] (``p``); draft_tokens: [b, K]; draft_probs: [b, K, V] (``q``) or
    ``None`` for a point-mass drafter (prompt lookup). ``accept_rule(p_x, q_x, u) -> bool`` may
    replace the acceptance test ``u * q(x) <= p(x)``; it exists so tests can check that a wrong
    rule is caught.
    """
    b, K = draft_tokens.shape
    rows = torch.arange(b, device=target_probs.device)
    if K:
        p_x = target_probs[:, :K].gather(2, draft_tokens[:, :, None])[..., 0]  # p_j(x_j): [b, K]
        q_x = torch.ones_like(p_x) if draft_probs is None else draft_probs.gather(2, draft_tokens[:, :, None])[..., 0]
        u = torch.rand(b, K, generator=generator, device=p_x.device)
        accept = (u * q_x <= p_x) if accept_rule is None else accept_rule(p_x, q_x, u)
        accepted = _accepted_count(accept, num_draft)
    else:
        accepted = torch.zeros(b, dtype=torch.long, device=target_probs.device)
    p_a = target_probs[rows, accepted]  # [b, V]: distribution at the first rejection / bonus column
    rejected = accepted < num_draft
    if bool(rejected.any()):
        j = accepted.clamp(max=max(K - 1, 0))
        if draft_probs is None:
            q_a = torch.zeros_like(p_a).scatter_(1, draft_tokens[rows, j][:, None], 1.0)
        else:
            q_a = draft_probs[rows, j]
        residual = (p_a - q_a).clamp_min(0)
        mass = residual.sum(1, keepdim=True)
        residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_a)  # p == q: never rejects
        p_a = torch.where(rejected[:, None], residual, p_a)
    next_token = torch.multinomial(p_a, 1, generator=generator)[:, 0]
    return accepted, next_token


def draft_signals(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draft top-1 probability and entropy (nats) of ``softmax(logits)``: logits [..., V]."""
    logp = logits.float().log_softmax(-1)
    p = logp.exp()
    return p.max(-1).values, -(p * logp).sum(-1)
