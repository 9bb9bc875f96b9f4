"""Back-off and per-step-cost fixes of dsde, del, exp3, analytic-table and sssd-budget: exact small cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import adaptk
from adaptk import Feedback, StepContext
from adaptk.controllers.analytic import AnalyticTable
from adaptk.controllers.bandit import EXP3, step_reward
from adaptk.controllers.budget import SSSDBudget, per_token_draft
from adaptk.controllers.early_exit import DEL
from adaptk.controllers.kld import DSDE, wvir
from adaptk.controllers.stopping import roc_threshold
from adaptk.estimators.latency import LatencyModel
from adaptk.testing import check_controller


def ctx(ids, k_max=8, step=0, **kw):
    return StepContext(step=step, seq_ids=ids, context_lens=[10] * len(ids), k_max=k_max, **kw)


class Costs(LatencyModel):
    """Hand-made step costs: ``verify[k]`` for ``k`` drafted per row, plus ``per_token·k`` or ``per_step`` drafting."""

    ragged = "padded"

    def __init__(self, verify, per_token=0.0, per_step=0.0):
        self.verify = np.asarray(list(verify) + [1e9] * 40, dtype=np.float64)
        self.per_token = per_token
        self.per_step = per_step

    def _verify(self, batch, n, total, ctx_sum, ctx_max):
        return self.verify[np.asarray(n, dtype=np.int64) - 1]

    def _draft(self, rows, forwards, ctx_sum, exit_layer):
        forwards = np.asarray(forwards, dtype=np.float64)
        return np.where(forwards > 0, self.per_token * forwards + self.per_step, 0.0)


# -- DSDE ---------------------------------------------------------------------------------------------
def _round(c, ids, kls, accepted, step):
    c.decide(ctx(ids, k_max=32, step=step))
    mat = np.full((len(ids), max(1, max(len(r) for r in kls))), np.nan)
    for i, r in enumerate(kls):
        mat[i, : len(r)] = r
    c.update(Feedback(seq_ids=ids, num_draft_tokens=[len(r) for r in kls], num_accepted_tokens=accepted,
                      kl_divergences=mat))


def test_dsde_backs_off_to_one_token_when_the_first_draft_is_rejected():
    c = DSDE(warmup_tokens=4)
    assert c.decide(ctx([1], k_max=32)).num_draft_tokens.tolist() == [1]     # warm-up starts at k_min = 1
    for step, kl in enumerate([[9.0], [8.0], [12.0], [11.0]]):
        _round(c, [1], [kl], [0], step)
    row = c._slot[1]
    # max accepted in warm-up 0: k_max_1 = clip(round(0), 1, 20) = 1, k_min_1 = 1
    assert (c._kmin_i[row], c._kmax_i[row]) == (1, 1)
    assert c.decide(ctx([1], k_max=32, step=5)).num_draft_tokens.tolist() == [1]


def test_dsde_high_unstable_kl_sends_k_to_the_per_request_floor():
    c = DSDE(warmup_tokens=3)
    _round(c, [1], [[0.1, 0.2, 0.1]], [3], 0)     # warm-up: 3 accepted of 3 → k_max_1 = round(3·(1 + 0.5·(0.4/3)/0.2)) = 4
    row = c._slot[1]
    assert (c._kmin_i[row], c._kmax_i[row]) == (1, 4)
    _round(c, [1], [[6.0, 9.0, 14.0, 3.0]], [0], 1)
    history = np.array([0.1, 0.2, 0.1, 6.0, 9.0, 14.0, 3.0])
    product = wvir(history) * math.expm1(2 * 8.0)
    assert product > 1
    assert c._k[row] == 1                          # k_min_1


def test_dsde_fork_engine_floor_never_goes_below_six():
    c = DSDE(k_min=6, warmup_tokens=4)
    for step in range(8):
        k = int(c.decide(ctx([1], k_max=32, step=step)).num_draft_tokens[0])
        assert k == 6
        _round(c, [1], [[10.0] * k], [0], step)


def test_dsde_zero_start_grows_to_one_as_in_the_fork():
    c = DSDE(k_min=0, initial_k=0, warmup_tokens=10)
    assert c.decide(ctx([1], k_max=8)).num_draft_tokens.tolist() == [0]
    c.update(Feedback(seq_ids=[1], num_draft_tokens=[0], num_accepted_tokens=[0]))   # accepted 0 >= k 0: "full"
    assert c.decide(ctx([1], k_max=8, step=1)).num_draft_tokens.tolist() == [1]


def test_dsde_reused_rows_start_fresh_and_cached_rows_follow_the_batch():
    c = DSDE(k_min=2, warmup_tokens=0)
    _round(c, [1, 2], [[0.0, 0.0], [0.5, 0.1]], [2, 0], 0)
    # flat history (WVIR 20) and a one-value short window (WVIR 0): both times SF·WVIR = 0 → k = 20
    assert c._k[[c._slot[1], c._slot[2]]].tolist() == [20, 20]
    row_of_1 = c._slot[1]
    c.on_sequence_end(1)
    decision = c.decide(ctx([2, 3], k_max=32, step=1))
    assert c._slot[3] == row_of_1 and c._count[row_of_1] == 0    # the freed row, emptied
    assert decision.info["sl_cap"] == 11 and decision.num_draft_tokens.tolist() == [11, 2]   # ceil((20 + 2) / 2)
    assert c.decide(ctx([3, 2], k_max=32, step=2)).num_draft_tokens.tolist() == [2, 11]


def test_dsde_full_window_wvir_matches_reference():
    rng = np.random.default_rng(7)
    c = DSDE(k_min=1, warmup_tokens=0, window=30)
    ids = list(range(5))
    histories = {i: [] for i in ids}
    for step in range(30):
        drafted = rng.integers(1, 9, len(ids))
        kls = [rng.gamma(2.0, 0.4, d).tolist() if i != 4 else [0.3] * int(d) for i, d in zip(ids, drafted, strict=True)]
        c.decide(ctx(ids, k_max=32, step=step))
        mat = np.full((len(ids), 8), np.nan)
        for i, r in enumerate(kls):
            mat[i, : len(r)] = r
            histories[i] = (histories[i] + r)[-30:]
        c.update(Feedback(seq_ids=ids, num_draft_tokens=drafted, num_accepted_tokens=np.zeros(len(ids), dtype=np.int64),
                          kl_divergences=mat))
    rows = np.array([c._slot[i] for i in ids])
    assert (c._count[rows] == 30).all()            # every window full: the (window, 2)-weights path
    got = c._wvir_rows(rows)
    assert got == pytest.approx([wvir(np.array(histories[i])) for i in ids], rel=1e-9, abs=1e-12)
    assert got[4] == 20.0                          # a flat history


def test_dsde_huge_kl_does_not_overflow_and_state_skips_caches():
    c = DSDE(warmup_tokens=0, temperature=0.01)
    with np.errstate(all="raise"):
        for step in range(4):
            _round(c, [1, 2], [[900.0, 1.0], [0.0, 700.0]], [0, 0], step)
    state = c.state_dict()
    assert not {"_ids_cache", "_rows_cache", "_gather_base"} & set(state["state"])
    restored = DSDE(warmup_tokens=0, temperature=0.01)
    restored.load_state_dict(json.loads(json.dumps(state)))
    assert restored.decide(ctx([2, 1], k_max=32)).num_draft_tokens.tolist() == \
        c.decide(ctx([2, 1], k_max=32)).num_draft_tokens.tolist()


# -- DEL ----------------------------------------------------------------------------------------------
def test_del_checks_only_the_signals_it_reads():
    c = DEL()
    c.decide(ctx([1, 2]))
    # draft entropies are never read by DEL or its stop rule: not checked
    c.update(Feedback(seq_ids=[1, 2], num_draft_tokens=[2, 2], num_accepted_tokens=[1, 2],
                      draft_probs=[[0.5, 0.6], [0.7, 0.8]], draft_entropies=[[np.nan, -1.0], [0.1, 0.2]]))
    c.decide(ctx([1, 2], step=1))
    with pytest.raises(ValueError, match="draft_probs"):
        c.update(Feedback(seq_ids=[1, 2], num_draft_tokens=[2, 2], num_accepted_tokens=[1, 2],
                          draft_probs=[[np.nan, 0.6], [0.7, 0.8]]))
    with pytest.raises(ValueError, match="unknown sequence"):
        c.update(Feedback(seq_ids=[1, 9], num_draft_tokens=[2, 2], num_accepted_tokens=[1, 2]))


def test_del_threshold_is_hf_roc_over_the_last_window_samples():
    c = DEL(window=6, refit_every=1)
    rng = np.random.default_rng(3)
    samples: list[tuple[float, bool]] = []
    fits = 0
    for step in range(12):
        c.decide(ctx([1, 2], step=step))
        k = np.array([3, 3])
        a = rng.integers(0, 4, 2)
        probs = rng.uniform(0.05, 1.0, (2, 3))
        for i in range(2):
            for j in range(min(3, a[i] + 1)):
                samples.append((probs[i, j], j < a[i]))
        c.update(Feedback(seq_ids=[1, 2], num_draft_tokens=k, num_accepted_tokens=a, draft_probs=probs))
        window = samples[-6:]
        labels = np.array([y for _, y in window])
        if len(labels) > 5 and 0 < labels.sum() < len(labels):   # HF: more than min_samples, both classes
            assert c._threshold == roc_threshold(np.array([p for p, _ in window]), labels)
            fits += 1
    assert fits >= 8


def test_del_state_round_trip_keeps_queued_samples():
    c = DEL(refit_every=5)
    rng = np.random.default_rng(0)

    def step(controller, i, probs, a):
        controller.decide(ctx([1], step=i))
        controller.update(Feedback(seq_ids=[1], num_draft_tokens=[4], num_accepted_tokens=[a], draft_probs=probs))

    draws = [(rng.uniform(0, 1, (1, 4)), int(rng.integers(0, 5))) for _ in range(40)]
    for i, (p, a) in enumerate(draws[:17]):
        step(c, i, p, a)
    restored = DEL(refit_every=5)
    restored.load_state_dict(json.loads(json.dumps(c.state_dict())))
    for i, (p, a) in enumerate(draws[17:], start=17):
        step(c, i, p, a)
        step(restored, i, p, a)
        assert restored._threshold == c._threshold


def test_del_backs_off_when_no_layer_agrees():
    c = DEL()
    context = ctx([1, 2], k_max=6, num_layers=30, exit_layers=(6, 12, 18, 24))
    for _step in range(30):
        c.decide(context)
        c.update(Feedback(seq_ids=[1, 2], num_draft_tokens=[1, 1], num_accepted_tokens=[0, 0],
                          layer_matches=np.zeros((2, 30), dtype=int), layer_compared=np.ones((2, 30), dtype=int)))
    assert c.decide(context).num_draft_tokens.tolist() == [0, 0]


# -- EXP3 ---------------------------------------------------------------------------------------------
def test_exp3_loss_update_by_hand():
    c = EXP3(arms=(0, 2, 4), gamma=0.3, eta=0.5, seed=0)
    times = {0: 0.01, 2: 0.02, 4: 0.04}
    for step in range(6):
        p = c.probabilities(8)
        logw = c._log_w.copy()
        decision = c.decide(ctx([1, 2], step=step))
        arm_value = decision.info["arm"]
        arm = [0, 2, 4].index(arm_value)
        fb = Feedback(seq_ids=[1, 2], num_draft_tokens=[arm_value] * 2, num_accepted_tokens=[0, 0],
                      verify_time_s=times[arm_value])
        lo, hi = c._range
        c.update(fb)
        r = step_reward(fb)
        lo, hi = min(lo, r), max(hi, r)
        scaled = (r - lo) / (hi - lo) if hi > lo else 0.5
        logw[arm] -= 0.5 * (1 - scaled) / p[arm]
        assert c._log_w == pytest.approx(logw - logw.max())
    # (1 − γ)·softmax + γ/K: every arm keeps at least γ/K
    assert c.probabilities(8).min() >= 0.3 / 3 - 1e-12
    assert c.probabilities(8).sum() == pytest.approx(1.0)


def test_exp3_prefers_plain_decoding_when_drafts_are_rejected():
    c = EXP3(seed=2)
    for step in range(400):
        k = int(c.decide(ctx([1, 2, 3, 4], step=step)).num_draft_tokens[0])
        # nothing accepted; each drafted token costs 15% of a step
        c.update(Feedback(seq_ids=[1, 2, 3, 4], num_draft_tokens=[k] * 4, num_accepted_tokens=[0] * 4,
                          draft_time_s=0.0045 * k, verify_time_s=0.03))
    p = c.probabilities(8)
    assert p[0] > 0.9 and p[1:].max() < 0.02


def test_exp3_rejects_bad_eta():
    with pytest.raises(ValueError, match="eta"):
        EXP3(eta=0.0)


# -- analytic-table -----------------------------------------------------------------------------------
def test_analytic_table_profiles_rounds_then_builds_the_table_from_measured_acceptance():
    c = AnalyticTable(latency=Costs([1.0, 1.2, 1.6, 2.4]), profile_rounds=4)
    assert c.profiling
    with pytest.raises(ValueError, match="profiling phase"):
        c.table(k_max=3)
    for step, accepted in enumerate(([1, 0], [3, 0])):      # 2 steps of batch 2 = 4 rounds
        assert c.decide(ctx([0, 1], k_max=3, step=step)).num_draft_tokens.tolist() == [3, 3]
        c.update(Feedback(seq_ids=[0, 1], num_draft_tokens=[3, 3], num_accepted_tokens=accepted))
    # tried / accepted per position: 4/2, 2/1, 1/1 → r = 0.5, 0.25, 0.25 → l = 1, 1.5, 1.75, 2
    # τ = t / l = 1, 0.8, 0.914, 1.2 → s* = 1
    assert not c.profiling
    assert c.decide(ctx([0, 1], k_max=3, step=2)).num_draft_tokens.tolist() == [1, 1]
    assert c.table(k_max=3)[0] == [1, 1, 1]


def test_analytic_table_profiling_length_scales_with_batch():
    c = AnalyticTable(latency=Costs([1.0, 1.2, 1.6, 2.4]), profile_rounds=32)
    ids = list(range(16))
    for step in range(2):                                    # ceil(32 / 16) steps
        assert c.decide(ctx(ids, k_max=3, step=step)).num_draft_tokens[0] == 3
        c.update(Feedback(seq_ids=ids, num_draft_tokens=[3] * 16, num_accepted_tokens=[0] * 16))
    # the first token never accepted: l(s) = 1, so s* = 0 whatever the costs
    assert c.decide(ctx(ids, k_max=3, step=2)).num_draft_tokens[0] == 0


def test_analytic_table_reprofiles_from_fresh_counts():
    c = AnalyticTable(latency=Costs([1.0, 1.2, 1.6, 2.4]), profile_rounds=2, reprofile_every=2)
    c.decide(ctx([0, 1], k_max=3))
    c.update(Feedback(seq_ids=[0, 1], num_draft_tokens=[3, 3], num_accepted_tokens=[0, 0]))
    for step in (1, 2):                                      # deployed: plain decoding
        assert c.decide(ctx([0, 1], k_max=3, step=step)).num_draft_tokens.tolist() == [0, 0]
        c.update(Feedback(seq_ids=[0, 1], num_draft_tokens=[0, 0], num_accepted_tokens=[0, 0]))
    assert c.profiling                                       # a new profiling phase
    assert c.table(k_max=3)[0][2] == 0                       # the previous table still answers
    assert c.decide(ctx([0, 1], k_max=3, step=3)).num_draft_tokens.tolist() == [3, 3]
    c.update(Feedback(seq_ids=[0, 1], num_draft_tokens=[3, 3], num_accepted_tokens=[3, 3]))
    # every position accepted now: l = 1, 2, 3, 4; τ = 1, 0.6, 0.533, 0.6 → s* = 2
    assert c.decide(ctx([0, 1], k_max=3, step=4)).num_draft_tokens.tolist() == [2, 2]


def test_analytic_table_with_a_given_acceptance_needs_no_profiling():
    c = AnalyticTable(latency=Costs([1.0, 1.2, 1.6, 2.4]), profile_acceptance=0.5)
    assert not c.profiling
    assert c.decide(ctx([0, 1], k_max=3)).num_draft_tokens.tolist() == [1, 1]   # τ = 1, 0.8, 0.914, 1.28


# -- sssd-budget --------------------------------------------------------------------------------------
def test_per_token_draft_separates_per_step_and_per_token_costs():
    assert per_token_draft(np.array([0.0, 0.3, 0.3, 0.3])).tolist() == [0.0, 0.0, 0.0, 0.0]
    assert per_token_draft(np.array([0.0, 0.1, 0.2, 0.3])) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    # a per-step part and a per-token part: 0.2 + 0.1·k → charges 0.1·k
    assert per_token_draft(np.array([0.0, 0.3, 0.4, 0.5])) == pytest.approx([0.0, 0.1, 0.2, 0.3])


VERIFY = [1.0 + 0.008 * k for k in range(9)]   # verification nearly flat: 1.048 at k = 6


@pytest.mark.parametrize("draft, cost, expected", [
    ({"per_step": 0.5}, "per_token", 6),    # n-gram lookup: the verify-only budget of the reconstruction
    ({"per_step": 0.5}, "none", 6),
    ({"per_step": 0.5}, "all", 0),
    ({"per_token": 0.02}, "per_token", 1),  # early exit: 1 + 0.028·k <= 1.05 → k = 1
    ({"per_token": 0.02}, "none", 6),
    ({"per_token": 0.2}, "per_token", 0),
])
def test_sssd_budget_charges_per_token_drafting(draft, cost, expected):
    c = SSSDBudget(latency=Costs(VERIFY, **draft), epsilon=0.05, draft_cost=cost)
    assert c.decide(ctx([0, 1, 2], k_max=8)).num_draft_tokens.tolist() == [expected] * 3


def test_sssd_budget_with_early_exit_on_the_h100_preset_does_not_speculate():
    early_exit = {"name": "h100-llama3-8b", "drafter": "early_exit", "exit_layer": 6}
    assert SSSDBudget(latency=early_exit).decide(ctx([0], k_max=16)).num_draft_tokens.tolist() == [0]
    assert SSSDBudget(latency=early_exit, draft_cost="none").decide(ctx([0], k_max=16)).num_draft_tokens.tolist() == [16]


def test_sssd_budget_rejects_unknown_draft_cost():
    with pytest.raises(ValueError, match="draft_cost"):
        SSSDBudget(draft_cost="some")


# -- conformance of the new parameters ----------------------------------------------------------------
@pytest.mark.parametrize("name, params", [
    ("dsde", {"k_min": 0, "initial_k": 0, "warmup_tokens": 3}),
    ("dsde", {"k_min": 6, "window": 100, "warmup_tokens": 100}),
    ("del", {"window": 8, "refit_every": 1}),
    ("exp3", {"gamma": 0.5, "eta": 1.0}),
    ("analytic-table", {"profile_rounds": 3, "reprofile_every": 4}),
    ("sssd-budget", {"draft_cost": "all"}),
])
def test_conformance_of_new_parameters(name, params):
    check_controller(adaptk.make(name, **params), k_max=12, num_steps=80, seed=5)
