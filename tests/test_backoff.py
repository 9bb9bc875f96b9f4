"""Every adaptive controller backs off (k <= 1) on the low-acceptance early-exit workload.

The bundled early-exit trace drafted from layer 6 of SmolLM2's 30 agrees with the full model on
about 4% of positions: nothing is gained by drafting there, under any cost profile. A controller
that keeps drafting several tokens per step on it has not learned from what it saw.
"""

from __future__ import annotations

import numpy as np
import pytest

import adaptk
from adaptk.bench.runner import build_controller, bundled_trace_paths
from adaptk.estimators.latency import get_latency_model
from adaptk.sim.replay import Workload, replay
from adaptk.sim.trace import TraceSet
from adaptk.types import Feedback

LOW_ACCEPTANCE_LAYER = 6
# a constant k is the baseline the others are measured against, not a policy that could back off
NOT_ADAPTIVE = {"fixed"}


@pytest.fixture(scope="module")
def early_exit_work() -> Workload:
    return Workload(TraceSet.load(bundled_trace_paths()["smollm2-early-exit"]))


def drafted_per_sequence_step(name: str, work: Workload, cost_profile: str, batch_size: int) -> np.ndarray:
    """Tokens actually drafted (after any stop rule) per sequence and step, in replay."""
    controller = build_controller(name, cost_profile, drafter="early_exit", exit_layer=LOW_ACCEPTANCE_LAYER)
    drafted: list[np.ndarray] = []
    update = controller.update

    def recording_update(feedback: Feedback) -> None:
        drafted.append(np.asarray(feedback.num_draft_tokens).copy())
        update(feedback)

    controller.update = recording_update  # type: ignore[method-assign]
    latency = get_latency_model(cost_profile, drafter="early_exit", exit_layer=LOW_ACCEPTANCE_LAYER)
    replay(controller, work, latency, batch_size, exit_layer=LOW_ACCEPTANCE_LAYER, num_requests=24)
    return np.concatenate(drafted)


def test_workload_is_low_acceptance(early_exit_work: Workload) -> None:
    variant = early_exit_work.variant(LOW_ACCEPTANCE_LAYER)
    first_token_accepted = np.mean(early_exit_work.match_len[variant] > 0)
    assert first_token_accepted < 0.10


@pytest.mark.parametrize("cost_profile", ["smollm2-135m-cpu", "h100-llama3-8b"])
@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("name", sorted(set(adaptk.available()) - NOT_ADAPTIVE))
def test_controller_backs_off_on_low_acceptance(name: str, cost_profile: str, batch_size: int,
                                                early_exit_work: Workload) -> None:
    drafted = drafted_per_sequence_step(name, early_exit_work, cost_profile, batch_size)
    after_warmup = drafted[len(drafted) // 5:]
    share_backed_off = float(np.mean(after_warmup <= 1))
    assert share_backed_off >= 0.8, (
        f"{name} drafted more than one token on {1 - share_backed_off:.0%} of sequence-steps "
        f"(mean {after_warmup.mean():.2f}) at ~4% acceptance")


def test_the_check_fails_for_a_constant_k(early_exit_work: Workload) -> None:
    drafted = drafted_per_sequence_step("fixed", early_exit_work, "smollm2-135m-cpu", 1)
    assert np.mean(drafted <= 1) < 0.8
