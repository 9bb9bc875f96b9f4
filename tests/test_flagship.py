"""The flagship ``adaptk`` controller: allocation, back-off, probing and copy-run behaviour."""

from __future__ import annotations

import numpy as np
import pytest

import adaptk
from adaptk.bench.runner import build_controller, bundled_trace_paths
from adaptk.estimators.latency import get_latency_model
from adaptk.sim.oracle import best_fixed
from adaptk.sim.replay import Workload, replay
from adaptk.sim.synthetic import iid_traces, regime_switching_traces
from adaptk.sim.trace import TraceSet
from adaptk.types import Feedback, StepContext


def context(step: int, batch: int, k_max: int = 8, ngram: int = 3, available: int = 8) -> StepContext:
    return StepContext(step=step, seq_ids=np.arange(batch), context_lens=np.full(batch, 300), k_max=k_max,
                       draft_available=np.full(batch, available), match_ngram_lens=np.full(batch, ngram))


def run(controller, steps: int, batch: int, accept, start: int = 0) -> list[np.ndarray]:
    """Feed ``steps`` rounds; ``accept(drafted) -> accepted`` plays the drafter. Returns decisions."""
    decisions = []
    for step in range(start, start + steps):
        k = controller.decide(context(step, batch)).num_draft_tokens
        decisions.append(k)
        controller.update(Feedback(seq_ids=np.arange(batch), num_draft_tokens=k, num_accepted_tokens=accept(k),
                                   step=step))
    return decisions


def test_drafts_the_maximum_where_verification_is_free_and_drafts_are_accepted() -> None:
    controller = adaptk.make("adaptk", latency="h100-llama3-8b")
    decisions = run(controller, 40, 1, lambda k: k)
    assert all(int(k[0]) == 8 for k in decisions[5:])


def test_long_copy_runs_earn_longer_drafts_than_isolated_hits() -> None:
    # CPU batch 1: 3+ drafted tokens cost ~50% more than 2, so length must be earned by evidence
    controller = adaptk.make("adaptk", latency={"name": "smollm2-135m-cpu", "drafter": "prompt_lookup"})
    run(controller, 300, 1, lambda k: np.zeros_like(k))  # nothing is ever accepted
    after_rejections = int(controller.decide(context(300, 1)).num_draft_tokens[0])
    run(controller, 300, 1, lambda k: k, start=301)  # now everything is
    after_copying = int(controller.decide(context(601, 1)).num_draft_tokens[0])
    assert after_rejections <= 1
    assert after_copying == 8


def test_never_probes_where_even_an_optimistic_estimate_cannot_pay() -> None:
    # SmolLM2 on 2 CPU cores at batch 64: verifying 2 tokens per row costs 2.3x one token, so with
    # well-measured ~35% first-token acceptance no draft can pay; probing would only cost
    controller = adaptk.make("adaptk", latency={"name": "smollm2-135m-cpu", "drafter": "prompt_lookup"})
    rng = np.random.default_rng(0)
    accept = lambda k: np.minimum(k, rng.geometric(0.65, k.shape) - 1)  # noqa: E731
    run(controller, 300, 64, accept)
    late = run(controller, 2000, 64, accept, start=300)
    assert sum(int(k.sum()) for k in late) == 0


def test_a_stale_never_is_retested_when_drafting_could_pay() -> None:
    # batch 1 on the CPU: two drafted tokens cost ~14% more than none. After a rejection-only phase
    # it stops drafting; once the text turns copyable, probes must find out and drafting resume.
    controller = adaptk.make("adaptk", latency={"name": "smollm2-135m-cpu", "drafter": "prompt_lookup"})
    rejected = run(controller, 400, 1, lambda k: np.zeros_like(k))
    probes = [int(k[0]) for k in rejected[100:] if k[0] > 0]
    assert len(probes) <= 3 and max(probes, default=1) == 1  # a few single-token probes, no more
    later = run(controller, 600, 1, lambda k: k, start=400)
    assert all(int(k[0]) == 8 for k in later[-100:])


@pytest.fixture(scope="module")
def prompt_lookup() -> TraceSet:
    return TraceSet.load(bundled_trace_paths()["smollm2-prompt-lookup"])


@pytest.mark.parametrize("cost_profile,batch_size", [("smollm2-135m-cpu", 1), ("smollm2-135m-cpu", 4),
                                                     ("smollm2-135m-cpu", 64), ("h100-llama3-8b", 16)])
def test_at_least_as_good_as_the_best_fixed_k_on_bundled_summarization(prompt_lookup: TraceSet, cost_profile: str,
                                                                     batch_size: int) -> None:
    work = Workload(prompt_lookup.subset(category="summarization"))
    latency = get_latency_model(cost_profile, drafter="prompt_lookup")
    requests = max(len(work), 4 * batch_size)
    _, _, best, _ = best_fixed(work, latency, batch_size, ks=[0, 1, 2, 4, 8, 16], num_requests=requests)
    controller = build_controller("adaptk", cost_profile, drafter="prompt_lookup")
    result = replay(controller, work, latency, batch_size, num_requests=requests)
    assert result.token_goodput >= 0.995 * best.token_goodput


@pytest.mark.parametrize("batch_size", [16, 64])
def test_learns_online_that_a_packed_h100_batch_verifies_long_drafts_almost_free(prompt_lookup: TraceSet,
                                                                                 batch_size: int) -> None:
    # Under the online prior an extra token is dear at batch >= 8, so a cautious model that has only
    # measured 1-2 tokens per row never learns otherwise; the optimistic packed model (what the vLLM
    # adapter passes) tries longer verifies once and finds them nearly free on an H100.
    work = Workload(prompt_lookup)
    engine = get_latency_model("h100-llama3-8b", drafter="prompt_lookup", ragged="packed")
    requests = max(120, 4 * batch_size)
    _, _, best, _ = best_fixed(work, engine, batch_size, ks=[0, 1, 2, 4, 8, 16], num_requests=requests)
    packed = adaptk.make("adaptk", latency={"name": "online", "ragged": "packed"})
    cautious = adaptk.make("adaptk", latency={"name": "online", "ragged": "packed", "optimistic": False})
    assert replay(packed, work, engine, batch_size, num_requests=requests).token_goodput >= 0.98 * best.token_goodput
    assert replay(cautious, work, engine, batch_size, num_requests=requests).token_goodput < 0.9 * best.token_goodput


@pytest.mark.parametrize("batch_size", [16, 64])
def test_learns_online_that_a_padded_gpu_batch_verifies_several_tokens_cheaply(batch_size: int) -> None:
    # The reference decoder on a GPU: padded, and verifying 4 tokens per row costs about what 1 does.
    # The cautious online model believes the prior (an extra token is dear at batch >= 8) for lengths
    # it has not measured, so it never measures them; the default walks up one token at a time.
    work = Workload(iid_traces(n=24, alpha=(0.7, 0.95), seed=3))
    engine = get_latency_model("h100-llama3-8b", drafter="draft_model", ragged="padded")
    _, _, best, _ = best_fixed(work, engine, batch_size, ks=list(range(9)))
    default = adaptk.make("adaptk")
    cautious = adaptk.make("adaptk", latency={"name": "online", "optimistic": False})
    assert replay(default, work, engine, batch_size).token_goodput >= 0.97 * best.token_goodput
    assert replay(cautious, work, engine, batch_size).token_goodput < 0.9 * best.token_goodput


def test_bounded_optimism_tries_a_dear_second_token_at_few_steps(prompt_lookup: TraceSet) -> None:
    # SmolLM2 on this CPU at batch 64: verifying 2 tokens per row costs 3-6x verifying 1. Each try
    # is priced from the last (one more token per row), so after a few tries the walk stops.
    work = Workload(prompt_lookup.subset(category="qa"))
    engine = get_latency_model("smollm2-135m-cpu", drafter="prompt_lookup")
    controller = adaptk.make("adaptk")
    widest = []
    original = controller.update

    def update(feedback: Feedback) -> None:
        if len(feedback.seq_ids) == 64:
            widest.append(int(np.max(feedback.num_draft_tokens)))
        original(feedback)

    controller.update = update
    plain = replay(adaptk.make("fixed", k=0), work, engine, 64).token_goodput
    assert replay(controller, work, engine, 64).token_goodput >= 0.97 * plain
    assert len(widest) > 100 and sum(k > 0 for k in widest) <= 0.02 * len(widest)


def early_exit_context(step: int, batch: int = 1) -> StepContext:
    return StepContext(step=step, seq_ids=np.arange(batch), context_lens=np.full(batch, 300), k_max=8,
                       num_layers=30, exit_layers=(6, 12))


def test_early_exit_measures_shadow_agreement_on_plain_steps_before_drafting() -> None:
    # every layer agrees with the target 90% of the time: drafting pays, but only once that is measured
    controller = adaptk.make("adaptk", latency="h100-llama3-8b")
    first = []
    for step in range(6):
        decision = controller.decide(early_exit_context(step))
        first.append(int(decision.num_draft_tokens[0]))
        k = decision.num_draft_tokens
        compared = np.full((1, 30), int(k[0]) + 1)
        controller.update(Feedback(seq_ids=[0], num_draft_tokens=k, num_accepted_tokens=k, step=step,
                                   exit_layer=decision.exit_layer,
                                   layer_matches=np.round(0.9 * compared).astype(np.int64), layer_compared=compared))
    assert first[:4] == [0, 0, 0, 0]  # prior_strength = 4 positions compared, one per plain step at batch 1
    assert first[4] > 0 and first[5] > 0


def test_early_exit_never_drafts_from_layers_that_never_agree() -> None:
    # shadow agreement is measured for free, so a layer gets no optimistic benefit of the doubt:
    # once prior_strength positions show no agreement at all, nothing is drafted from it
    controller = adaptk.make("adaptk", latency="h100-llama3-8b")
    drafted = []
    for step in range(40):
        decision = controller.decide(early_exit_context(step))
        k = decision.num_draft_tokens
        drafted.append(int(k[0]))
        compared = np.full((1, 30), int(k[0]) + 1)
        controller.update(Feedback(seq_ids=[0], num_draft_tokens=k, num_accepted_tokens=np.zeros(1, dtype=np.int64),
                                   step=step, exit_layer=decision.exit_layer,
                                   layer_matches=np.zeros((1, 30), dtype=np.int64), layer_compared=compared))
    assert drafted == [0] * 40


def test_early_exit_without_shadow_agreement_still_drafts() -> None:
    # an engine that offers exit layers but reports no layer_matches: decide from the acceptance table
    controller = adaptk.make("adaptk", latency="h100-llama3-8b")
    drafted = []
    for step in range(20):
        k = controller.decide(early_exit_context(step)).num_draft_tokens
        drafted.append(int(k[0]))
        controller.update(Feedback(seq_ids=[0], num_draft_tokens=k, num_accepted_tokens=k, step=step))
    assert drafted[0] == 0 and sum(drafted[1:]) > 0


def test_per_cell_curves_decide_exactly_as_per_row_curves(monkeypatch: pytest.MonkeyPatch) -> None:
    # large batches read acceptance curves from a per-cell table; it must change nothing
    import adaptk.controllers.flagship as flagship

    def decisions() -> list[list[int]]:
        controller = adaptk.make("adaptk", latency="h100-llama3-8b")
        out, stream = [], np.random.default_rng(0)
        for step in range(150):
            ctx = StepContext(step=step, seq_ids=np.arange(32), context_lens=np.full(32, 300 + step), k_max=8,
                              draft_available=stream.integers(0, 9, 32), match_ngram_lens=stream.integers(0, 4, 32))
            k = controller.decide(ctx).num_draft_tokens
            out.append(k.tolist())
            accepted = np.minimum(k, stream.geometric(0.3, 32) - 1)
            controller.update(Feedback(seq_ids=np.arange(32), num_draft_tokens=k, num_accepted_tokens=accepted, step=step))
        return out

    per_cell = decisions()
    monkeypatch.setattr(flagship, "_CELL_CURVES_FROM_BATCH", 10**9)
    per_row = decisions()
    assert per_cell == per_row
    assert len({tuple(k) for k in per_cell}) > 10  # many different ragged allocations were compared


@pytest.mark.parametrize("batch_size", [4, 64])
def test_batch_objective_beats_per_step_goodput_where_rows_switch_between_easy_and_hard(batch_size: int) -> None:
    # H100, draft model: maximising each step's tokens per second drafts 2 for the batch, which
    # races through the easy stretches and leaves the batch full of hard rows; the best fixed k is 1.
    # Scoring by the time to finish the work (a harmonic mean over rows) drafts less where rows are hard.
    work = Workload(regime_switching_traces())
    latency = get_latency_model("h100-llama3-8b", drafter="draft_model")
    requests = max(len(work), 4 * batch_size)
    best_k, _, best, _ = best_fixed(work, latency, batch_size, ks=[0, 1, 2, 3, 4], num_requests=requests)
    goodput = {}
    for objective in ("throughput", "step"):
        controller = adaptk.make("adaptk", latency={"name": "h100-llama3-8b", "drafter": "draft_model"},
                                 objective=objective)
        goodput[objective] = replay(controller, work, latency, batch_size, num_requests=requests).token_goodput
    assert best_k == 1
    assert goodput["throughput"] >= 1.008 * goodput["step"]
    assert goodput["throughput"] >= 0.995 * best.token_goodput


def test_a_row_left_undrafted_is_measured_again_once_its_last_round_is_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    # Regime-switching rows at batch 16: a row whose last round was rejected in the batch's last
    # wave, alone, is left undrafted, and an undrafted row is never measured, so its verdict would
    # stand after its text turned easy. Forgetting the last round after 16 idle steps fixes that.
    import adaptk.controllers.flagship as flagship

    work = Workload(regime_switching_traces(seed=1))
    latency = get_latency_model("h100-llama3-8b", drafter="draft_model")

    def goodput() -> float:
        controller = adaptk.make("adaptk", latency={"name": "h100-llama3-8b", "drafter": "draft_model"})
        return replay(controller, work, latency, 16, num_requests=64).token_goodput

    forgetting = goodput()
    monkeypatch.setattr(flagship, "_STALE_AFTER", 10**9)
    assert forgetting >= 1.02 * goodput()


def test_batch_objective_changes_nothing_at_batch_1(prompt_lookup: TraceSet) -> None:
    work = Workload(prompt_lookup.subset(category="summarization"))
    latency = get_latency_model("smollm2-135m-cpu", drafter="prompt_lookup")
    steps = {}
    for objective in ("throughput", "step"):
        controller = build_controller({"name": "adaptk", "params": {"objective": objective}}, "smollm2-135m-cpu",
                                      drafter="prompt_lookup")
        result = replay(controller, work, latency, 1).as_dict()
        steps[objective] = {name: value for name, value in result.items() if name != "controller"}
    assert steps["throughput"] == steps["step"]


def test_objective_must_be_named() -> None:
    with pytest.raises(ValueError, match="objective"):
        adaptk.make("adaptk", objective="harmonic")
