"""Exact replay and the oracles, checked against hand computation."""

from __future__ import annotations

import numpy as np
import pytest

import adaptk
from adaptk.sim import Trace, TraceSet
from adaptk.sim.oracle import best_fixed, clairvoyant_batch1
from adaptk.sim.replay import replay


class LinearCost:
    """Verify costs 1 s + 0.5 s per drafted token (of the longest row); prefill 2 s per request."""

    def predict_components(self, batch_size, num_draft_tokens, context_lens, exit_layer=None):
        return 0.0, 1.0 + 0.5 * float(np.max(num_draft_tokens, initial=0))

    def predict_uniform(self, batch_size, ks, context_lens, exit_layer=None):
        return 1.0 + 0.5 * np.asarray(ks, dtype=float)

    def prefill_time(self, prompt_lens):
        return 2.0 * len(prompt_lens)


def hand_trace() -> TraceSet:
    # output positions t = 0..5; t = 0 is produced by prefill, so m_0 is never used
    return TraceSet([Trace("p0", "qa", prompt_len=5, match_len=[9, 2, 0, 1, 0, 0])], "prompt_lookup", k_max=9)


def test_fixed_k2_matches_hand_computation():
    # prefill: now 2, t=1.  t=1: draft 2, accept 2 -> t=4, now 4.  t=4: accept 0 -> t=5, now 6.
    # t=5: accept 0 (nothing left to match) -> t=6 done, now 8.  6 tokens in 8 s.
    result = replay(adaptk.make("fixed", k=2), hand_trace(), LinearCost(), batch_size=1, num_requests=1)
    assert result.num_steps == 3
    assert result.total_time_s == pytest.approx(8.0)
    assert result.token_goodput == pytest.approx(6 / 8)
    assert result.mean_acceptance_length == pytest.approx(5 / 3)
    assert result.tpot_s == pytest.approx(6.0 / 5)
    assert result.acceptance_rate == pytest.approx(2 / 6)


def test_clairvoyant_matches_hand_dynamic_programme():
    # T[6]=0, T[5]=1, T[4]=2, T[3]=min(1+2, 1.5+1)=2.5, T[2]=3.5, T[1]=min(4.5, 4, 2+2)=4; plus prefill 2
    oracle = clairvoyant_batch1(hand_trace(), LinearCost())
    assert oracle.total_time_s == pytest.approx(6.0)
    assert oracle.token_goodput == pytest.approx(1.0)


def test_no_controller_beats_the_clairvoyant_oracle():
    rng = np.random.default_rng(0)
    traces = [Trace(f"p{i}", "qa", 10, match_len=rng.integers(0, 5, size=40)) for i in range(5)]
    for t in traces:
        t.match_len[0] = np.minimum(t.match_len[0], 40 - 1 - np.arange(40)).clip(0)
    ts = TraceSet(traces, "prompt_lookup", k_max=4)
    oracle = clairvoyant_batch1(ts, LinearCost())
    for name in ("fixed", "hf-heuristic"):
        result = replay(adaptk.make(name), ts, LinearCost(), batch_size=1)
        assert result.token_goodput <= oracle.token_goodput * (1 + 1e-12)
    k, _, best, _ = best_fixed(ts, LinearCost(), batch_size=1)
    assert best.token_goodput <= oracle.token_goodput * (1 + 1e-12)


def test_available_draft_length_limits_what_is_charged():
    trace = Trace("p", "chat", 3, match_len=[0, 4, 0, 0, 0, 0], draft_avail=[0, 1, 0, 0, 0, 0])
    ts = TraceSet([trace], "prompt_lookup", k_max=4)
    # t=1: controller asks 4, drafter offers 1 -> charged 1.5 s, accepts 1 -> t=3; then 3 plain steps
    result = replay(adaptk.make("fixed", k=4), ts, LinearCost(), batch_size=1, num_requests=1)
    assert result.num_steps == 4
    assert result.total_time_s == pytest.approx(2 + 1.5 + 3 * 1.0)


def test_batching_and_arrivals_serve_every_request():
    rng = np.random.default_rng(1)
    ts = TraceSet([Trace(f"p{i}", "qa", 10, match_len=rng.integers(0, 3, size=30)) for i in range(6)],
                  "prompt_lookup", k_max=4)
    closed = replay(adaptk.make("fixed", k=2), ts, LinearCost(), batch_size=4, num_requests=12)
    assert closed.num_tokens == 12 * 30
    opened = replay(adaptk.make("fixed", k=2), ts, LinearCost(), batch_size=4, num_requests=12, arrival_rate=0.05)
    assert opened.num_tokens == 12 * 30
    assert opened.total_time_s > closed.total_time_s  # waiting for arrivals takes time
    assert closed.latency_p99_s >= closed.latency_p50_s


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="batch_size"):
        replay(adaptk.make("fixed"), hand_trace(), LinearCost(), batch_size=0)
    with pytest.raises(ValueError, match="arrival_rate"):
        replay(adaptk.make("fixed"), hand_trace(), LinearCost(), batch_size=1, arrival_rate=-1.0)
    with pytest.raises(ValueError, match="timing_noise must"):
        replay(adaptk.make("fixed"), hand_trace(), LinearCost(), batch_size=1, timing_noise=-0.1)
    with pytest.raises(ValueError, match="timing_noise_corr"):
        replay(adaptk.make("fixed"), hand_trace(), LinearCost(), batch_size=1, timing_noise=0.1, timing_noise_corr=1.0)


class TimingRecorder(adaptk.SpeculationController):
    """Drafts 2 and keeps the verify times it is told."""

    def __init__(self) -> None:
        super().__init__()
        self.told: list[float] = []

    def _decide(self, context):
        return adaptk.Decision(num_draft_tokens=np.full(len(context.seq_ids), 2))

    def _update(self, feedback):
        self.told.append(feedback.verify_time_s)


def long_trace() -> TraceSet:
    rng = np.random.default_rng(0)
    return TraceSet([Trace("p", "qa", prompt_len=5, match_len=rng.integers(0, 4, 3000))], "prompt_lookup", k_max=4)


@pytest.mark.parametrize("corr", [0.0, 0.9])
def test_timing_noise_reaches_the_controller_not_the_clock(corr):
    traces = long_trace()
    clean, noisy = TimingRecorder(), TimingRecorder()
    exact = replay(clean, traces, LinearCost(), batch_size=1)
    blurred = replay(noisy, traces, LinearCost(), batch_size=1, timing_noise=0.3, timing_noise_corr=corr)
    # the decisions do not depend on timings here, so the clock must be identical to the last bit
    assert blurred.total_time_s == exact.total_time_s
    assert clean.told == [2.0] * len(clean.told)
    log_factor = np.log(np.array(noisy.told) / 2.0)
    assert log_factor.std() == pytest.approx(0.3, rel=0.15)
    assert abs(log_factor.mean()) < 0.1
    lag1 = np.corrcoef(log_factor[:-1], log_factor[1:])[0, 1]
    assert lag1 == pytest.approx(corr, abs=0.08)
