"""Stop-rule controllers (confidence, AdaEDL, SpecDec++-like): round-cap schedules, back-off, exact
small cases of the vectorised state; and the vectorised HF / GammaTune-like updates against
per-sequence reference loops."""

from __future__ import annotations

import json

import numpy as np
import pytest

import adaptk
from adaptk import Feedback, StepContext
from adaptk.controllers.heuristic import GammaTuneLike, HFHeuristic
from adaptk.controllers.stopping import AdaEDL, Confidence, SpecDecPPLike, _SeqTable, judged_positions, roc_threshold


def ctx(ids, k_max=8, step=0):
    return StepContext(step=step, seq_ids=ids, context_lens=[10] * len(ids), k_max=k_max)


def round_(c, ids, drafted, accepted, k_max=8, step=0, **signals):
    decided = c.decide(ctx(ids, k_max, step)).num_draft_tokens.tolist()
    c.update(Feedback(seq_ids=ids, num_draft_tokens=drafted, num_accepted_tokens=accepted, **signals))
    return decided


# -- per-sequence rows ------------------------------------------------------------------------------
def test_seq_table_rows_reuse_growth_and_json_state():
    t = _SeqTable(x=1.5, n=0)
    ids = np.array([5, 6, 7])
    rows = t.rows(ids, n=3)
    assert rows.tolist() == [0, 1, 2] and t.rows(ids) is rows  # unchanged batch: cached answer
    assert t.cols["n"][rows].tolist() == [3, 3, 3] and t.cols["x"][rows].tolist() == [1.5] * 3
    t.cols["x"][rows] = [10.0, 11.0, 12.0]
    t.discard(6)
    assert 6 not in t and t.rows(np.array([8])).tolist() == [1]  # the freed row, reset to defaults
    assert t.cols["x"][1] == 1.5
    many = t.rows(np.arange(100, 120))  # grows past the first 8 rows
    assert len(set(many.tolist())) == 20 and not set(many.tolist()) & {0, 1, 2}
    assert t.lookup(np.array([7, 999]), "x", -1.0).tolist() == [12.0, -1.0]  # unknown id: default
    restored = _SeqTable(x=1.5, n=0)
    restored.load_state_dict(json.loads(json.dumps(t.state_dict())))
    assert restored.slot_of == t.slot_of and restored.rows(np.array([5, 7])).tolist() == [0, 2]
    assert restored.cols["x"][[0, 2]].tolist() == [10.0, 12.0]


# -- the HF heuristic round cap ---------------------------------------------------------------------
def test_confidence_heuristic_cap_is_hf_plus2_minus1_per_sequence():
    c = Confidence(base_k=4, self_tuning=False)
    assert round_(c, [1], [4], [4]) == [4]          # all accepted: 4 + 2
    assert round_(c, [1], [3], [3]) == [6]          # stopped at 3, all 3 accepted: counts as full
    assert round_(c, [1], [8], [2]) == [8]          # min(6 + 2, k_max = 8); then a rejection: 7
    assert round_(c, [1, 2], [0, 7], [0, 0]) == [7, 7]  # seq 2 starts where the last update left off
    # drafting nothing counts as all accepted (HF's quirk): seq 1 7 → 8; seq 2 7 → 6
    assert c.decide(ctx([1, 2], k_max=8)).num_draft_tokens.tolist() == [8, 6]
    assert c.decide(ctx([1, 2], k_max=5)).num_draft_tokens.tolist() == [5, 5]
    t = Confidence(base_k=4, self_tuning=False, schedule="heuristic_transient")
    round_(t, [1], [4], [0])
    assert t.decide(ctx([1, 2])).num_draft_tokens.tolist() == [3, 4]
    with pytest.raises(ValueError, match="schedule"):
        Confidence(schedule="fast")


def test_heuristic_cap_floor_is_one():
    c = Confidence(base_k=2, self_tuning=False)
    assert [round_(c, [1], [1], [0], step=s)[0] for s in range(4)] == [2, 1, 1, 1]


def test_confidence_and_adaedl_back_off_when_confident_drafts_are_rejected():
    # the draft is sure of itself (p = 0.95, H = 0.05) and always wrong: the threshold rules never
    # stop such a token, the HF cap falls by one per round
    for c in (Confidence(), AdaEDL()):
        ks = []
        for step in range(20):
            k = int(c.decide(ctx([1], k_max=16, step=step)).num_draft_tokens[0])
            ks.append(k)
            c.update(Feedback(seq_ids=[1], num_draft_tokens=[k], num_accepted_tokens=[0],
                              draft_probs=np.full((1, k), 0.95), draft_entropies=np.full((1, k), 0.05)))
        assert ks[:3] == [16, 15, 14] and ks[-5:] == [1] * 5, ks


# -- confidence self-tuning ---------------------------------------------------------------------------
def _random_round(rng, n, k_max=6):
    k = rng.integers(0, k_max + 1, n)
    a = np.minimum(k, rng.geometric(0.5, n) - 1)
    probs = np.where(np.arange(k_max)[None, :] < k[:, None], rng.uniform(0.0, 1.0, (n, k_max)), np.nan)
    return k, a, probs


def test_confidence_self_tuning_is_hf_with_refit_every_round_and_a_huge_window():
    rng = np.random.default_rng(1)
    c = Confidence(refit_every=1, window=10**9, schedule="constant")
    all_probs, all_labels = [], []
    for step in range(40):
        k, a, probs = _random_round(rng, 3)
        c.decide(ctx([1, 2, 3], k_max=6, step=step))
        fb = Feedback(seq_ids=[1, 2, 3], num_draft_tokens=k, num_accepted_tokens=a, draft_probs=probs)
        c.update(fb)
        mask, accepted = judged_positions(fb)
        all_probs += probs[:, : mask.shape[1]][mask].tolist()
        all_labels += accepted[mask].astype(int).tolist()
        labels = np.array(all_labels)
        if len(labels) > 5 and 0 < labels.sum() < len(labels):
            assert c._threshold == roc_threshold(np.array(all_probs), labels)
    assert sorted(c._probs.tolist()) == sorted(all_probs)


def test_confidence_window_keeps_the_last_samples_and_refits_every_n_once_full():
    rng = np.random.default_rng(2)
    c = Confidence(refit_every=3, window=30, schedule="constant")
    history: list[float] = []
    refits = 0
    for step in range(80):
        k, a, probs = _random_round(rng, 4)
        c.decide(ctx([1, 2, 3, 4], k_max=6, step=step))
        fb = Feedback(seq_ids=[1, 2, 3, 4], num_draft_tokens=k, num_accepted_tokens=a, draft_probs=probs)
        mask, _ = judged_positions(fb)
        history += probs[:, : mask.shape[1]][mask].tolist()
        before = c._threshold
        c.update(fb)
        steady = c._seen > c.window and c._seen_at_fit
        if steady and c._since_fit == 0:  # a refit just ran on exactly the last `window` samples
            refits += 1
            assert c._probs.tolist() == history[-30:]
            assert c._threshold == roc_threshold(c._probs, c._labels)
        elif steady:
            assert c._threshold == before
    assert refits >= 15


# -- AdaEDL with the heuristic cap ---------------------------------------------------------------------
def test_adaedl_lambda_at_the_adaptive_cap_by_hand():
    c = AdaEDL(base_k=2)
    lam = 0.5
    # full rounds at caps 2, 4, 6: AR_ema 0.5, 0.75, 0.875 < 0.9, λ += 0.001 each; the cap grows by 2
    for cap in (2, 4, 6):
        assert round_(c, [1], [cap], [cap]) == [cap]
        lam += 0.001
    assert c._lambda[1] == pytest.approx(lam)
    assert round_(c, [1], [8], [8]) == [8]  # AR_ema 0.9375 > 0.9 and a == the cap 8: λ −= 0.001
    assert c._lambda[1] == pytest.approx(lam - 0.001)
    assert round_(c, [1], [5], [5]) == [8]  # AR_ema 0.96875, but stopped at 5 < cap: λ unchanged
    assert c._lambda[1] == pytest.approx(lam - 0.001) and c._ar_ema[1] == pytest.approx(0.96875)
    assert round_(c, [1], [0], [0]) == [8]  # nothing drafted: λ and AR_ema skipped, the cap counts it
    assert c._ar_ema[1] == pytest.approx(0.96875)
    assert round_(c, [1], [8], [0]) == [8]  # AR_ema 0.484 < 0.9: λ += 0.001; cap 8 → 7
    assert c._lambda[1] == pytest.approx(lam) and c.decide(ctx([1])).num_draft_tokens.tolist() == [7]


def test_adaedl_stop_rule_reads_each_sequences_lambda():
    c = AdaEDL(schedule="constant")
    round_(c, [1, 2], [4, 4], [0, 4], k_max=4)   # seq 1: λ 0.501; seq 2: AR 0.5 < 0.9, λ 0.501 too
    for _ in range(30):
        round_(c, [1], [4], [0], k_max=4)
    lam1, lam2 = c._lambda[1], c._lambda[2]
    assert lam1 > lam2
    # β = 1 − sqrt(0.1·H) between the two λ: only seq 1 stops; an unknown id reads λ0
    h = ((1.0 - (lam1 + lam2) / 2) ** 2) / 0.1
    stop = c.stop_rule.should_stop(np.array([2, 1, 77]), 0, np.full(3, 0.5), np.full(3, h))
    assert stop.tolist() == [False, True, False]


# -- SpecDec++-like -----------------------------------------------------------------------------------
def test_specdecpp_may_stop_after_the_first_token_and_tracks_subsets_in_any_order():
    c = SpecDecPPLike(acceptance_model="confidence")
    assert c.min_k == 1 and c.decide(ctx([3, 1, 2], k_max=30)).num_draft_tokens.tolist() == [20, 20, 20]
    rule = c.stop_rule
    assert rule.should_stop(np.array([3, 1, 2]), 0, np.array([0.9, 0.6, 0.8])).tolist() == [False, True, False]
    # survival 2: 0.8·0.9 = 0.72 (risk 0.28); 3: 0.9·0.9 = 0.81
    assert rule.should_stop(np.array([2, 3]), 1, np.array([0.9, 0.9])).tolist() == [False, False]
    assert rule.should_stop(np.array([3]), 2, np.array([0.8])).tolist() == [True]   # 0.648: risk 0.352
    assert rule.should_stop(np.array([2]), 2, np.array([0.99])).tolist() == [False]  # 0.7128


def test_specdecpp_logistic_learns_that_confident_drafts_are_rejected():
    c = SpecDecPPLike()
    assert c.acceptance_model == "logistic"
    assert c.required_signals == {"draft_probs", "draft_entropies"}
    assert SpecDecPPLike(acceptance_model="confidence").required_signals == {"draft_probs"}
    confident = np.array([0.95])
    assert not c.stop_rule.should_stop(np.array([1]), 0, confident, np.array([0.2]))[0]  # starts at P = p
    rng = np.random.default_rng(0)
    for step in range(60):
        k = c.decide(ctx([1, 2, 3, 4], step=step)).num_draft_tokens
        probs = rng.uniform(0.7, 1.0, (4, 8))
        c.update(Feedback(seq_ids=[1, 2, 3, 4], num_draft_tokens=k, num_accepted_tokens=[0, 0, 0, 0],
                          draft_probs=probs, draft_entropies=1.0 - probs))
    assert c._p_accept(confident, np.array([0.05]), 0)[0] < 0.2
    assert c.stop_rule.should_stop(np.array([1]), 0, confident, np.array([0.05]))[0]


# -- vectorised HF heuristic and GammaTune-like against per-sequence loops ----------------------------
def _stream(seed, steps=60):
    rng = np.random.default_rng(seed)
    live, next_id = [], 0
    for step in range(steps):
        while len(live) < 5 and rng.random() < 0.6:
            live.append(next_id)
            next_id += 1
        if not live:
            live.append(next_id)
            next_id += 1
        k_max = int(rng.integers(1, 9))
        yield step, list(live), k_max, rng
        live = [s for s in live if rng.random() > 0.15]


def test_hf_heuristic_matches_the_per_sequence_rule():
    c = HFHeuristic(initial_k=3)
    ref: dict[int, int] = {}
    last = 3
    for step, ids, k_max, rng in _stream(3):
        decided = c.decide(ctx(ids, k_max, step)).num_draft_tokens.tolist()
        for s in ids:
            ref.setdefault(s, last)
        assert decided == [min(ref[s], k_max) for s in ids]
        drafted = [min(d, int(rng.integers(0, 9))) for d in decided]
        accepted = [min(d, int(rng.geometric(0.5)) - 1) for d in drafted]
        c.update(Feedback(seq_ids=ids, num_draft_tokens=drafted, num_accepted_tokens=accepted))
        for s, d, a in zip(ids, drafted, accepted, strict=True):
            ref[s] = min(ref[s] + 2, k_max) if a == d else max(1, ref[s] - 1)
            last = ref[s]
        assert c._k == ref and c._last_k == last
        for s in list(ref):
            if rng.random() < 0.1:
                c.on_sequence_end(s)
                del ref[s]


def test_gammatune_like_matches_the_per_sequence_rule():
    c = GammaTuneLike(initial_k=3, delta_up=1.5, eta=0.6, k_min=1)
    ref: dict[int, float] = {}
    start = 3.0
    for step, ids, k_max, rng in _stream(4):
        decided = c.decide(ctx(ids, k_max, step)).num_draft_tokens.tolist()
        for s in ids:
            ref.setdefault(s, start)
        assert decided == [int(np.clip(np.round(ref[s]), min(1, k_max), k_max)) for s in ids]
        drafted = [min(d, int(rng.integers(0, 9))) for d in decided]
        accepted = [min(d, int(rng.geometric(0.5)) - 1) for d in drafted]
        c.update(Feedback(seq_ids=ids, num_draft_tokens=drafted, num_accepted_tokens=accepted))
        updated = []
        for s, d, a in zip(ids, drafted, accepted, strict=True):
            if d:
                g = ref[s] + 1.5 if a == d else 0.6 * ref[s] + 0.4 * (a + 1)
                ref[s] = min(max(g, 1), max(1, k_max))
                updated.append(ref[s])
        if updated:
            start = float(np.mean(updated))
        assert dict(c._gamma) == pytest.approx(ref) and c._start == pytest.approx(start)
        for s in list(ref):
            if rng.random() < 0.1:
                c.on_sequence_end(s)
                del ref[s]


# -- capped --------------------------------------------------------------------------------------------
def test_capped_validates_feedback_once_for_the_inner_controller():
    c = adaptk.make("capped", inner="confidence", cap="batch-mean")
    c.decide(ctx([1, 2]))
    before = json.dumps(c.state_dict(), sort_keys=True)
    with pytest.raises(ValueError, match="draft_probs"):
        c.update(Feedback(seq_ids=[1, 2], num_draft_tokens=[2, 2], num_accepted_tokens=[1, 2],
                          draft_probs=[[0.5, 1.5], [0.1, 0.2]]))
    assert json.dumps(c.state_dict(), sort_keys=True) == before
    c.update(Feedback(seq_ids=[1, 2], num_draft_tokens=[2, 2], num_accepted_tokens=[1, 2],
                      draft_probs=[[0.5, 0.5], [0.1, 0.2]]))
    assert c.inner_controller.decide(ctx([1, 2], step=1)).num_draft_tokens.tolist() == [7, 8]


# -- the ROC threshold, validation, and the logistic model's schedule ------------------------------------
def test_roc_threshold_equals_sklearns_roc_curve_argmin():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(5)
    checked = 0
    for _ in range(400):
        n = int(rng.integers(2, 80))
        probs = np.round(rng.uniform(0.0, 1.0, n), int(rng.integers(1, 4)))  # rounding makes ties
        labels = (rng.random(n) < rng.uniform(0.05, 0.95)).astype(int)
        if not 0 < labels.sum() < n:
            continue
        for fn_cost in (3.0, 0.5):
            fpr, tpr, thresholds = metrics.roc_curve(labels, probs)
            want = float(min(thresholds[int(np.argmin(fpr + fn_cost * (1 - tpr)))], 1.0))
            assert roc_threshold(probs, labels, fn_cost) == want
            checked += 1
    assert checked > 500


def test_only_the_signals_the_controller_reads_are_checked():
    c = AdaEDL()
    c.decide(ctx([1, 2]))
    ok = np.full((2, 2), 0.5)
    c.update(Feedback(seq_ids=[1, 2], num_draft_tokens=[2, 2], num_accepted_tokens=[0, 1],
                      draft_probs=[[np.nan, 2.0], [0.1, 0.2]], draft_entropies=ok))  # AdaEDL reads no probs
    with pytest.raises(ValueError, match="draft_entropies"):
        c.update(Feedback(seq_ids=[1, 2], num_draft_tokens=[2, 2], num_accepted_tokens=[0, 1],
                          draft_entropies=[[-1.0, 0.5], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="seq_ids: unknown"):
        c.update(Feedback(seq_ids=[1, 9], num_draft_tokens=[2, 2], num_accepted_tokens=[0, 1], draft_entropies=ok))
    with pytest.raises(ValueError, match="num_accepted_tokens exceeds"):
        c.update(Feedback(seq_ids=[1, 2], num_draft_tokens=[2, 2], num_accepted_tokens=[3, 1], draft_entropies=ok))


def test_specdecpp_logistic_gradient_step_by_hand_and_fit_every():
    fb = Feedback(seq_ids=[1], num_draft_tokens=[3], num_accepted_tokens=[1],
                  draft_probs=[[0.8, 0.5, 0.9]], draft_entropies=[[0.1, 0.2, 0.3]])
    c = SpecDecPPLike(fit_every=1)
    c.decide(ctx([1]))
    c.update(fb)
    # judged: position 0 (accepted), position 1 (the first rejection); position 2 is not used.
    # weights [0, 1, 0, 0]: P = p, residuals 0.8 − 1 = −0.2 and 0.5 − 0 = 0.5
    logit08 = np.log(0.8 / 0.2)
    grad = np.array([0.3, -0.2 * logit08, -0.2 * 0.1 + 0.5 * 0.2, 0.5 / 16]) / 2
    w = np.array([0.0, 1.0, 0.0, 0.0])
    assert c._weights == pytest.approx(w - 0.5 * (grad + 1e-4 * w))
    lazy = SpecDecPPLike(fit_every=3)
    lazy.decide(ctx([1]))
    lazy.update(fb)
    lazy.update(fb)
    assert lazy._weights.tolist() == [0.0, 1.0, 0.0, 0.0] and len(lazy._queued) == 2
    lazy.update(fb)  # one step over the three rounds: the same mean gradient here
    assert lazy._weights == pytest.approx(c._weights) and lazy._queued == []
    with pytest.raises(ValueError, match="fit_every"):
        SpecDecPPLike(fit_every=0)
