"""Core records, registry, state, guard, and the conformance kit over every registered controller."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest

import adaptk
from adaptk import ControllerError, Decision, Feedback, SpeculationController, StepContext
from adaptk.guard import ControllerFallbackWarning, GuardedController
from adaptk.testing import check_controller


def ctx(seq_ids=(1, 2), k_max=4, **kw):
    return StepContext(step=0, seq_ids=list(seq_ids), context_lens=[10] * len(seq_ids), k_max=k_max, **kw)


@pytest.mark.parametrize("name", adaptk.available())
def test_every_registered_controller_conforms(name):
    check_controller(adaptk.make(name))


def test_import_adaptk_stays_light():
    # heavy frameworks stay out of `import adaptk` (how long it takes is a benchmark's business)
    code = "import sys, adaptk; print(sorted(m for m in ('torch', 'transformers', 'vllm', 'sklearn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"import adaptk pulled in {out}"


class _Leaky(SpeculationController):
    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[int, int] = {}

    def _decide(self, context):
        for s in context.seq_ids.tolist():
            self._seen[s] = 1
        return Decision(np.zeros(len(context.seq_ids), dtype=np.int64))


class _OutOfRange(SpeculationController):
    def _decide(self, context):
        return Decision(np.full(len(context.seq_ids), context.k_max + 1))


class _Random(SpeculationController):
    def _decide(self, context):
        return Decision(np.random.default_rng().integers(0, context.k_max + 1, len(context.seq_ids)))


class _ForgetsParams(SpeculationController):
    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.k = k + 1

    def _decide(self, context):
        return Decision(np.zeros(len(context.seq_ids), dtype=np.int64))


class _SilentBadUpdate(SpeculationController):
    """Validates nothing itself but mutates state before the base class could check: impossible
    through update(), so it overrides update() — the kit must catch it."""

    def __init__(self) -> None:
        super().__init__()
        self._count = 0

    def update(self, feedback):
        self._count += 1

    def _decide(self, context):
        return Decision(np.zeros(len(context.seq_ids), dtype=np.int64))


@pytest.mark.parametrize(
    "controller, message",
    [
        (_Leaky(), "ended sequences"),
        (_OutOfRange(), "outside"),
        (_Random(), "same seed"),
        (_ForgetsParams(), "stored unchanged"),
        (_SilentBadUpdate(), "must raise ValueError"),
    ],
)
def test_conformance_kit_catches_violations(controller, message):
    with pytest.raises((AssertionError, ControllerError), match=message):
        check_controller(controller)


def test_decision_out_of_range_names_the_controller():
    with pytest.raises(ControllerError, match="_OutOfRange"):
        _OutOfRange().decide(ctx())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_accepted_tokens": [3, 0]}, "num_accepted_tokens exceeds"),
        ({"num_draft_tokens": [-1, 2], "num_accepted_tokens": [0, 0]}, "num_draft_tokens"),
        ({"num_accepted_tokens": [1]}, "num_accepted_tokens has 1 entries"),
        ({"verify_time_s": math.nan}, "verify_time_s"),
        ({"draft_time_s": -0.1}, "draft_time_s"),
        ({"seq_ids": [1, 99]}, "seq_ids: unknown"),
        ({"draft_probs": [[0.5, 1.5], [0.1, 0.2]]}, "draft_probs"),
    ],
)
def test_invalid_feedback_names_the_field(kwargs, field):
    # "confidence" reads draft_probs (through its stop rule), so those are validated too
    controller = adaptk.make("confidence")
    controller.decide(ctx())
    base = {"seq_ids": [1, 2], "num_draft_tokens": [2, 2], "num_accepted_tokens": [1, 2],
            "draft_time_s": 0.0, "verify_time_s": 0.01}
    with pytest.raises(ValueError, match=field):
        controller.update(Feedback(**{**base, **kwargs}))


def test_context_validation():
    with pytest.raises(ValueError, match="context_lens"):
        StepContext(step=0, seq_ids=[1, 2], context_lens=[1], k_max=3)
    with pytest.raises(ValueError, match="unique"):
        StepContext(step=0, seq_ids=[1, 1], context_lens=[1, 1], k_max=3)
    with pytest.raises(ValueError, match="k_max"):
        StepContext(step=0, seq_ids=[1], context_lens=[1], k_max=-1)


def test_registry_make_and_errors():
    assert {"fixed", "hf-heuristic", "adaptk"} <= set(adaptk.available())
    assert adaptk.make("fixed", k=3).k == 3
    with pytest.raises(ValueError, match="unknown controller 'nope'"):
        adaptk.make("nope")
    with pytest.raises(ValueError, match="no parameter"):
        adaptk.make("fixed", kk=3)
    assert adaptk.from_spec('{"name": "fixed", "params": {"k": 2}}').k == 2
    with pytest.raises(ValueError, match="not valid JSON"):
        adaptk.from_spec("{oops")


def test_signals_a_controller_does_not_read_are_not_checked():
    controller = adaptk.make("hf-heuristic")
    controller.decide(ctx())
    controller.update(Feedback(seq_ids=[1, 2], num_draft_tokens=[2, 2], num_accepted_tokens=[1, 2],
                               draft_probs=[[0.5, 1.5], [0.1, 0.2]]))


def test_state_round_trip_is_json_and_exact():
    controller = adaptk.make("hf-heuristic", initial_k=3)
    controller.decide(ctx())
    controller.update(Feedback(seq_ids=[1, 2], num_draft_tokens=[3, 3], num_accepted_tokens=[3, 0]))
    state = json.loads(json.dumps(controller.state_dict()))
    restored = adaptk.make("hf-heuristic", initial_k=3)
    restored.load_state_dict(state)
    assert np.array_equal(restored.decide(ctx()).num_draft_tokens, controller.decide(ctx()).num_draft_tokens)
    with pytest.raises(ValueError, match="parameters"):
        adaptk.make("hf-heuristic", initial_k=5).load_state_dict(state)
    with pytest.raises(ValueError, match="is for controller"):
        adaptk.make("fixed").load_state_dict(state)


def test_guard_falls_back_once_and_keeps_going():
    class Boom(SpeculationController):
        def _decide(self, context):
            raise RuntimeError("boom")

    guarded = GuardedController(Boom(), fallback_k=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = guarded.decide(ctx(k_max=2))
        second = guarded.decide(ctx(k_max=8))
        guarded.update(Feedback(seq_ids=[1, 2], num_draft_tokens=[3, 3], num_accepted_tokens=[0, 0]))
    assert first.num_draft_tokens.tolist() == [2, 2] and second.num_draft_tokens.tolist() == [3, 3]
    assert [w.category for w in caught] == [ControllerFallbackWarning]
    assert not guarded.should_stop(np.array([1]), 0, np.array([0.1])).any()


def test_hf_heuristic_plus2_minus1_with_floor():
    c = adaptk.make("hf-heuristic", initial_k=2)
    ks = []
    for accepted_all in (True, True, False, False, False, False):
        k = int(c.decide(ctx(seq_ids=[1], k_max=16)).num_draft_tokens[0])
        ks.append(k)
        c.update(Feedback(seq_ids=[1], num_draft_tokens=[k], num_accepted_tokens=[k if accepted_all else 0]))
    assert ks == [2, 4, 6, 5, 4, 3]
    for _ in range(10):
        c.update(Feedback(seq_ids=[1], num_draft_tokens=[1], num_accepted_tokens=[0]))
    assert int(c.decide(ctx(seq_ids=[1], k_max=16)).num_draft_tokens[0]) == 1
