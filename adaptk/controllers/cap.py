"""``capped``: make any controller load-aware by capping its draft lengths.

Acceptance-only controllers cannot see load (algorithms.md §9: acceptance stayed 0.83–0.91 from
batch 1 to 32 while the right action flipped from speculating to not speculating). This
combinator wraps any registered controller, given as a JSON spec, and caps what it proposes:

* ``cap="batch-mean"`` — DSDE's anti-straggler cap [code, DSDE fork ``coordinate_batch_k``]:
  ``k_i ≤ ceil(mean over the batch of the proposed k_i)`` (the longest draft sets the batch's
  draft time);
* ``cap="goodput"`` — no ``k`` beyond the batch-uniform goodput-optimal length
  ``argmax_k E[emitted | k] / T(B, k)`` for the current batch size and contexts, under a global
  per-token EWMA acceptance rate the combinator keeps itself and the latency model.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from adaptk.controllers.analytic import LatencySpec, _check_prob, _CostAware, _GlobalAcceptance, expected_emitted_vector
from adaptk.core import SpeculationController, StopRule
from adaptk.registry import from_spec, get_class, register
from adaptk.types import Decision, Feedback, StepContext

__all__ = ["Capped"]

CAPS = ("batch-mean", "goodput")


@register("capped")
class Capped(_CostAware):
    """Wrap the controller ``inner`` (a JSON spec) and cap its lengths (module docstring).

    >>> import adaptk
    >>> from adaptk import StepContext
    >>> c = adaptk.make("capped", inner={"name": "fixed", "params": {"k": 6}}, cap="goodput", latency="h100-llama3-8b")
    >>> int(c.decide(StepContext(step=0, seq_ids=[0], context_lens=[512], k_max=8)).num_draft_tokens[0]) > 0
    True
    >>> int(c.decide(StepContext(step=1, seq_ids=list(range(512)), context_lens=[512] * 512, k_max=8)).num_draft_tokens[0])
    0

    Parameters
    ----------
    inner
        The wrapped controller: a registered name or ``{"name": ..., "params": {...}}`` (a dict or
        its JSON text), built with :func:`adaptk.from_spec`. Its state is part of this controller's
        state; its stop rule and required signals pass through. If the inner controller takes a
        ``latency`` parameter that the spec leaves out, it gets this controller's ``latency``.
    cap
        ``"batch-mean"`` or ``"goodput"``.
    latency
        Cost profile for the goodput cap (the bench fills it); ``None`` learns costs online from the
        feedback timings (see :class:`adaptk.controllers.analytic._CostAware`). Unused by
        ``"batch-mean"``.
    initial_acceptance, weight_new
        The goodput cap's acceptance EWMA (per-token, unbiased for any drafted length).

    Per-step cost: the inner controller's plus about 7 µs at batch 64 (``capped`` around
    ``hf-heuristic``: about 32 µs in ``benchmarks/bench_overhead.py``). Feedback is validated once, by this controller's ``update``,
    with exactly the inner controller's ``k_max``, signals and live ids, so it goes to the inner
    controller's ``_update`` directly.
    """

    def __init__(
        self,
        inner: str | dict = "hf-heuristic",
        cap: str = "batch-mean",
        latency: LatencySpec = None,
        initial_acceptance: float = 0.7,
        weight_new: float = 0.15,
    ) -> None:
        super().__init__(latency)
        if cap not in CAPS:
            raise ValueError(f"cap must be one of {CAPS}, got {cap!r}")
        _check_prob(initial_acceptance, "initial_acceptance")
        if isinstance(weight_new, bool) or not isinstance(weight_new, (int, float)) or not 0.0 < weight_new <= 1.0:
            raise ValueError(f"weight_new must lie in (0, 1], got {weight_new!r}")
        if isinstance(inner, SpeculationController) or not isinstance(inner, (str, dict)):
            raise ValueError('inner must be a controller name or a JSON spec {"name": ..., "params": {...}}')
        self.inner = inner
        self.cap = cap
        self.latency = latency
        self.initial_acceptance = initial_acceptance
        self.weight_new = weight_new
        self._inner = self._build_inner()
        #: what the replay / engines read to decide which per-position signals to compute
        self.required_signals = self._inner.required_signals
        if cap == "batch-mean":
            self._online = None  # no cost model needed
        self._alpha = _GlobalAcceptance(weight_new, initial_acceptance, "per_token")
        self._rate = float(initial_acceptance)  # the rate the cap uses, refreshed every 4 drafting steps
        self._drafted_steps = 0

    def _build_inner(self) -> SpeculationController:
        spec: Any = self.inner
        if isinstance(spec, str):
            text = spec.strip()
            spec = json.loads(text) if text.startswith("{") else {"name": text}
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ValueError('inner spec must be a name or {"name": str, "params": {...}}')
        params = dict(spec.get("params") or {})
        if self.latency is not None and "latency" not in params and "latency" in get_class(spec["name"])._param_names():
            params["latency"] = self.latency
        return from_spec({"name": spec["name"], "params": params})

    @property
    def inner_controller(self) -> SpeculationController:
        return self._inner

    @property
    def stop_rule(self) -> StopRule | None:
        return self._inner.stop_rule

    def goodput_cap(self, batch_size: int, context_lens: np.ndarray, k_max: int) -> int:
        """The batch-uniform goodput-optimal length for this batch."""
        bucket, ctx = self._ctx_bucket(context_lens)
        key = ("cap", batch_size, bucket, k_max)
        k = self._scratch.get(key)
        if k is None:
            costs = self._uniform_costs(batch_size, bucket, ctx, k_max)
            k = int(np.argmax(expected_emitted_vector(self._rate, k_max) / costs))
            self._scratch[key] = k
        return k

    def _decide(self, context: StepContext) -> Decision:
        decision = self._inner.decide(context)
        proposed = decision.num_draft_tokens
        if not len(proposed):
            return decision
        if self.cap == "batch-mean":
            limit = -(-int(proposed.sum()) // len(proposed))  # ceil of the mean, in integers
        else:
            limit = self.goodput_cap(len(proposed), context.context_lens, int(context.k_max))
        if int(proposed.max()) <= limit:
            return decision
        return Decision(np.minimum(proposed, limit), exit_layer=decision.exit_layer, info=decision.info)

    def _update(self, feedback: Feedback) -> None:
        # ``update`` has validated this feedback exactly as the inner controller's own ``update``
        # would: same k_max (both decided this context), same signals (the stop rule and required
        # signals are the inner's), same live ids (decisions and ends are forwarded). Going to the
        # inner ``_update`` skips the second, identical validation.
        self._inner._update(feedback)
        if self.cap == "goodput":
            self._learn_costs(feedback)
            if self._alpha.observe(feedback.num_draft_tokens, feedback.num_accepted_tokens):
                self._drafted_steps += 1
                if self._drafted_steps % self._REFRESH_EVERY == 1 or self._REFRESH_EVERY == 1:
                    self._rate = self._alpha.rate()
                    self._scratch.clear()

    def _end_sequence(self, seq_id: int) -> None:
        self._inner.on_sequence_end(seq_id)
