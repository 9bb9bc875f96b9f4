"""SSSD-like hardware budget (Marzollo et al., arXiv 2411.05894): speculate while a step stays near-free.

[reconstruction, algorithms.md §6] The paper sizes speculation with a hardware-aware (roofline)
budget; its exact rule is not public. Here: the largest ``k`` whose step — the verify pass over
``B·(k+1)`` tokens plus the drafting that grows with ``k`` — costs at most ``(1 + ε)`` times a
plain decoding step over ``B`` tokens, at the batch's contexts. Long contexts move the knee right
(attention and KV reads dominate), so speculation stays cheap at larger batches there.
"""

from __future__ import annotations

import numpy as np

from adaptk.controllers.analytic import LatencySpec, _CostAware
from adaptk.registry import register
from adaptk.types import Decision, Feedback, StepContext

__all__ = ["SSSDBudget", "budget_length", "per_token_draft"]

DRAFT_COSTS = ("per_token", "none", "all")


def budget_length(costs: np.ndarray, epsilon: float) -> int:
    """The largest ``k`` with ``costs[k] <= (1 + epsilon) · costs[0]`` (``costs[k]``: ``k`` drafted).

    >>> budget_length(np.array([1.0, 1.01, 1.04, 1.2, 1.05]), 0.05)
    4
    >>> budget_length(np.array([1.0, 1.5]), 0.05)
    0
    """
    within = np.flatnonzero(costs <= (1.0 + epsilon) * costs[0])
    return int(within[-1])


def per_token_draft(draft: np.ndarray) -> np.ndarray:
    """The part of the drafting seconds ``draft[k]`` (``k = 0..``) that grows with ``k``.

    The per-step part is the intercept of the line through ``k = 1`` and ``k = 2``,
    ``2·draft[1] − draft[2]``, held in ``[0, draft[1]]``: all of an n-gram lookup's cost (paid once
    per step, whatever ``k``), none of a model drafter's (a forward per drafted token).

    >>> per_token_draft(np.array([0.0, 0.2, 0.2, 0.2]))          # n-gram lookup: once per step
    array([0., 0., 0., 0.])
    >>> per_token_draft(np.array([0.0, 0.5, 1.0, 1.5]))          # early exit: a forward per token
    array([0. , 0.5, 1. , 1.5])
    """
    draft = np.asarray(draft, dtype=np.float64)
    if draft.size < 3:
        return draft.copy()
    fixed = min(max(2.0 * draft[1] - draft[2], 0.0), draft[1])
    out = draft - fixed
    out[0] = 0.0
    return np.maximum(out, 0.0)


@register("sssd-budget")
class SSSDBudget(_CostAware):
    """Largest ``k`` whose step costs at most ``(1 + ε)`` times plain decoding [reconstruction].

    Step cost for ``k`` drafted tokens per sequence: ``t_verify(B·(k+1) tokens, contexts)`` plus,
    depending on ``draft_cost``,

    * ``"per_token"`` (default): the drafting time that grows with ``k`` — a forward of the drafter
      per drafted token (early exit, a draft model) is charged in full; a per-step cost that does
      not depend on ``k`` (the n-gram lookup SSSD uses, paid once per step) is not (see
      :func:`per_token_draft`). For n-gram drafting this is the verify-only budget of the
      reconstruction: speculate while verification stays near-free;
    * ``"none"``: verification only, whatever the drafter costs;
    * ``"all"``: every second of drafting.

    ``k = max{k : cost(k) <= (1 + ε)·cost(0)}``, one length for the whole batch, from the batch size
    and the (bucketed) contexts; acceptance plays no part — the budget says how much speculation
    the hardware gives away, the drafter decides what fills it.

    Why ``"per_token"`` [our extension]: SSSD's budget is about the step's hardware cost, and SSSD
    drafts by n-gram lookup on the CPU, where drafting is nearly free; there only verification
    matters. A drafter that runs part of the model per drafted token (early exit: the first ``ℓ``
    layers; a draft model) spends accelerator time in proportion to ``k``, so a verify pass that
    stays flat (weight loads dominate, as on a GPU at small batch) no longer makes speculation
    free. Verify-only, SSSD drafted 16 tokens a step on the H100 preset with early exit, and on the
    SmolLM2 CPU profile it drafted 2 at short contexts (the measured verify pass over 3 tokens is
    no slower than over 1 there) although each drafted token costs ~15% of a step.

    ``latency`` names the cost profile; with ``latency=None`` the costs are learned online from the
    feedback timings (see :class:`adaptk.controllers.analytic._CostAware`): the online model's prior
    makes an extra token cheap at batch 1 and dear at large batches until measurements say otherwise.

    >>> from adaptk import StepContext
    >>> ctx = StepContext(step=0, seq_ids=[0], context_lens=[512], k_max=8)
    >>> SSSDBudget(latency={"name": "h100-llama3-8b", "drafter": "prompt_lookup"}).decide(ctx).num_draft_tokens
    array([8])
    >>> SSSDBudget(latency={"name": "h100-llama3-8b", "drafter": "early_exit", "exit_layer": 6}).decide(ctx).num_draft_tokens
    array([0])
    """

    def __init__(self, latency: LatencySpec = None, epsilon: float = 0.05, draft_cost: str = "per_token") -> None:
        super().__init__(latency)
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon >= 0:
            raise ValueError(f"epsilon must be a number >= 0, got {epsilon!r}")
        if draft_cost not in DRAFT_COSTS:
            raise ValueError(f"draft_cost must be one of {DRAFT_COSTS}, got {draft_cost!r}")
        self.latency = latency
        self.epsilon = epsilon
        self.draft_cost = draft_cost

    def step_costs(self, batch_size: int, bucket: int, ctx: float, k_max: int) -> np.ndarray:
        """Seconds the budget charges a step that drafts ``k`` per sequence, ``k = 0..k_max`` (cached)."""
        key = ("costs", batch_size, bucket)
        costs = self._scratch.get(key)
        if costs is None or costs.size <= k_max:
            model = self.latency_model()
            ks = np.arange(max(k_max, 8) + 1, dtype=np.float64)
            n = ks + 1.0  # tokens per row
            # the two halves of LatencyModel.predict_uniform (uniform k: padded and packed agree)
            costs = np.asarray(model._verify(batch_size, n, n * batch_size, ctx * batch_size, ctx), dtype=np.float64)
            if self.draft_cost != "none":
                draft = np.asarray(model._draft(batch_size, ks, ctx * batch_size, None), dtype=np.float64)
                costs = costs + (draft if self.draft_cost == "all" else per_token_draft(draft))
            self._scratch[key] = costs
        return costs[: k_max + 1]

    def _decide(self, context: StepContext) -> Decision:
        batch, k_max = len(context.seq_ids), int(context.k_max)
        if not batch:
            return Decision(np.zeros(0, dtype=np.int64))
        bucket, ctx = self._ctx_bucket(context.context_lens)
        if k_max == 0:
            return Decision(np.zeros(batch, dtype=np.int64))
        key = ("k", batch, bucket, k_max)
        k = self._scratch.get(key)
        if k is None:
            k = budget_length(self.step_costs(batch, bucket, ctx, k_max), self.epsilon)
            self._scratch[key] = k
        return Decision(np.full(batch, k, dtype=np.int64))

    def _update(self, feedback: Feedback) -> None:
        self._learn_costs(feedback)
