"""SSSD-like hardware budget (Marzollo et al., arXiv 2411.05894): speculate while verifying is near-free.

[reconstruction, algorithms.md §6] The paper sizes speculation with a hardware-aware (roofline)
budget; its exact rule is not public. Here: the largest ``k`` whose verify pass over ``B·(k+1)``
tokens costs at most ``(1 + ε)`` times a plain decoding pass over ``B`` tokens, at the batch's
contexts. Long contexts move the knee right (attention and KV reads dominate), so speculation stays
cheap at larger batches there.
"""

from __future__ import annotations

import numpy as np

from adaptk.controllers.analytic import LatencySpec, _CostAware
from adaptk.registry import register
from adaptk.types import Decision, Feedback, StepContext

__all__ = ["SSSDBudget", "budget_length"]


def budget_length(costs: np.ndarray, epsilon: float) -> int:
    """The largest ``k`` with ``costs[k] <= (1 + epsilon) · costs[0]`` (``costs[k]``: ``k`` drafted).

    >>> budget_length(np.array([1.0, 1.01, 1.04, 1.2, 1.05]), 0.05)
    4
    >>> budget_length(np.array([1.0, 1.5]), 0.05)
    0
    """
    within = np.flatnonzero(costs <= (1.0 + epsilon) * costs[0])
    return int(within[-1])


@register("sssd-budget")
class SSSDBudget(_CostAware):
    """Largest ``k`` with ``t(B·(k+1) tokens, contexts) ≤ (1 + ε)·t(B tokens, contexts)`` [reconstruction].

    ``t`` is the latency model's verify time (``include_draft=True`` adds the drafting time, for
    drafters that are not nearly free like SSSD's n-gram lookup). One length for the whole batch,
    from the batch size and the (bucketed) contexts; acceptance plays no part — the budget says how
    much speculation the hardware gives away, the drafter decides what fills it.

    ``latency`` names the cost profile; with ``latency=None`` the costs are learned online from the
    feedback timings (see :class:`adaptk.controllers.analytic._CostAware`): the online model's prior
    makes an extra token cheap at batch 1 and dear at large batches until measurements say otherwise.
    """

    def __init__(self, latency: LatencySpec = None, epsilon: float = 0.05, include_draft: bool = False) -> None:
        super().__init__(latency)
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon >= 0:
            raise ValueError(f"epsilon must be a number >= 0, got {epsilon!r}")
        self.latency = latency
        self.epsilon = epsilon
        self.include_draft = include_draft

    def verify_costs(self, batch_size: int, bucket: int, ctx: float, k_max: int) -> np.ndarray:
        """Seconds of the step's verify pass (plus drafting with ``include_draft``), ``k = 0..k_max``."""
        if self.include_draft:
            return self._uniform_costs(batch_size, bucket, ctx, k_max)
        key = ("verify", batch_size, bucket)
        costs = self._scratch.get(key)
        if costs is None or costs.size <= k_max:
            model = self.latency_model()
            n = np.arange(1.0, max(k_max, 8) + 2.0)  # tokens per row
            # the verify half of LatencyModel.predict_uniform (uniform k: padded and packed agree)
            costs = np.asarray(model._verify(batch_size, n, n * batch_size, ctx * batch_size, ctx), dtype=np.float64)
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
            k = budget_length(self.verify_costs(batch, bucket, ctx, k_max), self.epsilon)
            self._scratch[key] = k
        return Decision(np.full(batch, k, dtype=np.int64))

    def _update(self, feedback: Feedback) -> None:
        self._learn_costs(feedback)
