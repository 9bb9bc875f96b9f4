"""Conformance kit: :func:`check_controller` checks the rules every controller must obey.

Run it in your own test suite on any controller you write::

    from adaptk.testing import check_controller
    check_controller(MyController())

It raises ``AssertionError`` naming the first broken rule:

* decisions lie in ``[0, k_max]``, one integer per sequence, and are deterministic under a seed;
* sequences may join and leave between steps, and a sequence's state is freed when it ends;
* ``state_dict()`` survives a JSON round trip and a restored controller decides exactly as the
  original would;
* invalid feedback (accepted > drafted, negative counts, length mismatch, NaN or negative
  timings, unknown sequence) raises ``ValueError`` and leaves the learned state untouched;
* hyperparameters are the constructor's arguments, stored unchanged; ``clone()`` and
  ``reset()`` give an untrained controller.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np

from adaptk.core import SpeculationController
from adaptk.types import Decision, Feedback, StepContext

__all__ = ["check_controller", "synthetic_stream", "run_stream"]

_NUM_LAYERS = 12
_EXIT_LAYERS = (3, 6, 9)


def synthetic_stream(
    num_steps: int = 60, k_max: int = 8, seed: int = 0, max_batch: int = 6, id_base: int = 7_000_001
) -> Iterator[tuple[StepContext, Any]]:
    """Yield ``(context, respond)`` pairs: sequences join and leave, drafter hints vary.

    ``respond(decision) -> (feedback, ended_seq_ids)`` plays a seeded environment in which each
    sequence has its own acceptance rate, step time grows with tokens, and every optional
    per-position signal is present.
    """
    rng = np.random.default_rng(seed)
    next_id = 0
    live: dict[int, dict[str, float]] = {}
    for step in range(num_steps):
        while len(live) < max_batch and (not live or rng.random() < 0.5):
            live[id_base + 7 * next_id] = {"rate": float(rng.uniform(0.05, 0.95)), "len": float(rng.integers(20, 200))}
            next_id += 1
        seq_ids = np.fromiter(live, dtype=np.int64)
        context = StepContext(
            step=step,
            seq_ids=seq_ids,
            context_lens=np.array([int(live[s]["len"]) for s in seq_ids]),
            k_max=k_max,
            num_layers=_NUM_LAYERS,
            exit_layers=_EXIT_LAYERS,
            draft_available=rng.integers(0, k_max + 1, size=len(seq_ids)),
            match_ngram_lens=rng.integers(0, 4, size=len(seq_ids)),
            queue_len=int(rng.integers(0, 3)),
        )

        def respond(decision: Decision, context: StepContext = context) -> tuple[Feedback, list[int]]:
            drafted = np.asarray(decision.num_draft_tokens, dtype=np.int64)
            n = len(context.seq_ids)
            rates = np.array([live[s]["rate"] for s in context.seq_ids.tolist()])
            width = max(1, int(drafted.max()) if n else 1)
            accept_draws = rng.random((n, width)) < rates[:, None]
            run = np.cumprod(accept_draws, axis=1).sum(axis=1)
            accepted = np.minimum(run, drafted)
            probs = np.clip(rates[:, None] + rng.normal(0, 0.1, (n, width)), 0.01, 1.0)
            entropies = rng.uniform(0.0, 3.0, (n, width))
            kls = rng.uniform(0.0, 2.0, (n, width))
            compared = np.repeat((accepted + 1)[:, None], _NUM_LAYERS, axis=1)
            layer_rate = np.linspace(0.05, 0.95, _NUM_LAYERS)[None, :]
            matches = np.minimum(compared, rng.binomial(compared, layer_rate))
            tokens = float((drafted + 1).sum())
            ended = []
            for s, a in zip(context.seq_ids.tolist(), accepted.tolist(), strict=True):
                live[s]["len"] += a + 1
                if rng.random() < 0.08:
                    ended.append(s)
            feedback = Feedback(
                seq_ids=context.seq_ids,
                num_draft_tokens=drafted,
                num_accepted_tokens=accepted,
                draft_time_s=0.001 * float(drafted.max() if n else 0),
                verify_time_s=0.01 + 0.0005 * tokens,
                step=context.step,
                exit_layer=decision.exit_layer,
                finished=np.isin(context.seq_ids, ended),
                draft_probs=probs,
                draft_entropies=entropies,
                kl_divergences=kls,
                layer_matches=matches,
                layer_compared=compared,
            )
            for s in ended:
                live.pop(s)
            return feedback, ended

        yield context, respond


def run_stream(controller: SpeculationController, **stream_kwargs: Any) -> list[tuple[int, ...]]:
    """Drive ``controller`` through :func:`synthetic_stream`; return its decisions."""
    decisions = []
    for context, respond in synthetic_stream(**stream_kwargs):
        decision = controller.decide(context)
        decisions.append(tuple(decision.num_draft_tokens.tolist()) + (decision.exit_layer,))
        _exercise_stop_rule(controller, context, decision)
        feedback, ended = respond(decision)
        controller.update(feedback)
        for seq_id in ended:
            controller.on_sequence_end(seq_id)
    return decisions


def _exercise_stop_rule(controller: SpeculationController, context: StepContext, decision: Decision) -> None:
    rule = controller.stop_rule
    if rule is None or not len(context.seq_ids):
        return
    probs = np.linspace(0.05, 0.95, len(context.seq_ids))
    stop = np.asarray(rule.should_stop(context.seq_ids, 0, probs, np.full(len(probs), 1.0)))
    assert stop.shape == (len(context.seq_ids),) and stop.dtype == bool, (
        f"{controller!r}: stop_rule.should_stop must return one bool per sequence, got {stop!r}"
    )


def _ids_in(value: Any, ids: set[int], path: str = "") -> str | None:
    """Return where any of ``ids`` appears as a dict key in ``value``, or ``None``."""
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, (int, np.integer)) and int(key) in ids:
                return f"{path}[{key}]"
            found = _ids_in(item, ids, f"{path}[{key!r}]")
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _ids_in(item, ids, f"{path}[{i}]")
            if found:
                return found
    elif isinstance(value, (set, frozenset)):
        leaked = {int(v) for v in value if isinstance(v, (int, np.integer))} & ids
        if leaked:
            return f"{path} (holds {sorted(leaked)[:3]})"
    elif hasattr(value, "state_dict") and not isinstance(value, type):
        return _ids_in(value.state_dict(), ids, path + ".state_dict()")
    return None


def _state_json(controller: SpeculationController) -> str:
    return json.dumps(controller.state_dict(), sort_keys=True, allow_nan=True)


def check_controller(controller: SpeculationController, *, k_max: int = 8, num_steps: int = 60, seed: int = 0) -> None:
    """Raise ``AssertionError`` if ``controller`` breaks a rule of the step protocol (module docstring)."""
    label = repr(controller)

    # Hyperparameters are the constructor's arguments, stored unchanged.
    params = controller.params()
    fresh = controller.clone()
    assert type(fresh) is type(controller), f"{label}: clone() returned {type(fresh).__name__}"
    assert json.dumps(fresh.params(), sort_keys=True, default=repr) == json.dumps(params, sort_keys=True, default=repr), (
        f"{label}: constructor arguments are not stored unchanged: clone has {fresh.params()}"
    )
    controller = fresh  # work on an untrained copy so the caller's object is left alone

    # Bounds, determinism and the join/leave pattern.
    first = run_stream(controller.clone(), num_steps=num_steps, k_max=k_max, seed=seed)
    second = run_stream(controller.clone(), num_steps=num_steps, k_max=k_max, seed=seed)
    assert first == second, f"{label}: decisions differ between two runs with the same seed"
    for step, decision in enumerate(first):
        lengths = decision[:-1]
        assert all(0 <= k <= k_max for k in lengths), f"{label}: step {step} decided {lengths} outside [0, {k_max}]"
        exit_layer = decision[-1]
        assert exit_layer is None or exit_layer in _EXIT_LAYERS, f"{label}: exit layer {exit_layer} not offered"
    for small_k_max in (0, 1):
        decisions = run_stream(controller.clone(), num_steps=12, k_max=small_k_max, seed=seed + 1)
        assert all(max(d[:-1], default=0) <= small_k_max for d in decisions), f"{label}: ignores k_max={small_k_max}"

    # Per-sequence state is freed when sequences end.
    worked = controller.clone()
    seen: set[int] = set()
    for context, respond in synthetic_stream(num_steps=num_steps, k_max=k_max, seed=seed + 2):
        seen.update(context.seq_ids.tolist())
        decision = worked.decide(context)
        feedback, ended = respond(decision)
        worked.update(feedback)
        for seq_id in ended:
            worked.on_sequence_end(seq_id)
    for seq_id in seen:
        worked.on_sequence_end(seq_id)
    leak = _ids_in({k: v for k, v in vars(worked).items() if k.startswith("_")}, seen)
    assert leak is None, f"{label}: state of ended sequences is kept at {leak}"

    # State round trip through JSON: the restored controller decides exactly as the original.
    original = controller.clone()
    stream = synthetic_stream(num_steps=num_steps, k_max=k_max, seed=seed + 3)
    half = num_steps // 2
    for _ in range(half):
        context, respond = next(stream)
        decision = original.decide(context)
        feedback, ended = respond(decision)
        original.update(feedback)
        for seq_id in ended:
            original.on_sequence_end(seq_id)
    saved = json.loads(json.dumps(original.state_dict()))
    restored = controller.clone()
    restored.load_state_dict(saved)
    for context, respond in stream:
        a = original.decide(context)
        b = restored.decide(context)
        assert np.array_equal(a.num_draft_tokens, b.num_draft_tokens) and a.exit_layer == b.exit_layer, (
            f"{label}: restored controller decided {b.num_draft_tokens.tolist()} where the original decided "
            f"{a.num_draft_tokens.tolist()} (step {context.step})"
        )
        feedback, ended = respond(a)
        original.update(feedback)
        restored.update(feedback)
        for seq_id in ended:
            original.on_sequence_end(seq_id)
            restored.on_sequence_end(seq_id)

    # Invalid feedback raises ValueError and changes nothing.
    _check_bad_feedback(controller.clone(), k_max, label)

    # reset() forgets what was learned.
    original.reset()
    assert _state_json(original) == _state_json(controller.clone()), f"{label}: reset() left learned state behind"


def _check_bad_feedback(controller: SpeculationController, k_max: int, label: str) -> None:
    context = StepContext(step=0, seq_ids=[11, 12], context_lens=[30, 40], k_max=k_max,
                          num_layers=_NUM_LAYERS, exit_layers=_EXIT_LAYERS)
    controller.decide(context)
    good = Feedback(seq_ids=[11, 12], num_draft_tokens=[2, 2], num_accepted_tokens=[1, 2],
                    draft_time_s=0.001, verify_time_s=0.01, step=0)
    bad_cases = {
        "accepted > drafted": replace(good, num_accepted_tokens=np.array([3, 0])),
        "negative drafted": replace(good, num_draft_tokens=np.array([-1, 2]), num_accepted_tokens=np.array([0, 0])),
        "negative accepted": replace(good, num_accepted_tokens=np.array([-1, 0])),
        "length mismatch": replace(good, num_accepted_tokens=np.array([1])),
        "NaN timing": replace(good, verify_time_s=math.nan),
        "negative timing": replace(good, draft_time_s=-1.0),
        "unknown sequence": replace(good, seq_ids=np.array([11, 99])),
        "drafted > k_max": replace(good, num_draft_tokens=np.array([k_max + 1, 0]), num_accepted_tokens=np.array([0, 0])),
    }
    before = _state_json(controller)
    for what, feedback in bad_cases.items():
        try:
            controller.update(feedback)
        except ValueError:
            pass
        else:
            raise AssertionError(f"{label}: feedback with {what} was accepted; it must raise ValueError")
        assert _state_json(controller) == before, f"{label}: rejected feedback ({what}) changed the learned state"
