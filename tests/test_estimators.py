"""Acceptance estimators: exact tiny cases, the bias of ratio vs per_token, state round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adaptk import _state
from adaptk.estimators import AcceptanceEWMA, PositionAcceptance, expected_emitted


def test_expected_emitted_formula_and_limits() -> None:
    assert expected_emitted(0.5, 2) == pytest.approx(1.75)
    assert expected_emitted(1.0, 4) == 5.0
    assert expected_emitted(0.0, 7) == 1.0
    ks = np.arange(6)
    np.testing.assert_allclose(expected_emitted(0.6, ks), [sum(0.6**j for j in range(k + 1)) for k in ks])
    grid = expected_emitted(np.array([[0.2], [1.0]]), ks)  # broadcasts
    assert grid.shape == (2, 6) and grid[1].tolist() == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="k"):
        expected_emitted(0.5, -1)
    with pytest.raises(ValueError, match="rate"):
        expected_emitted(1.5, 2)


def test_ewma_ratio_exact_steps() -> None:
    est = AcceptanceEWMA(weight_new=0.5, initial=0.5)
    est.observe([1, 2], [4, 2], [4, 0])  # pooled 4/6
    assert est.rate() == pytest.approx(0.5 + 0.5 * (4 / 6 - 0.5))
    np.testing.assert_allclose(est.rates([1, 2, 3]), [0.75, 0.25, est.rate()])
    est.end_sequence(1)
    assert est.rates([1])[0] == est.rate()
    assert len(est) == 1


def test_ewma_skips_zero_drafts_and_empty_batches() -> None:
    est = AcceptanceEWMA()
    est.observe([1, 2], [0, 0], [0, 0])
    est.observe([], [], [])
    assert est.rate() == 0.7 and len(est) == 0


def test_new_sequence_starts_from_global_rate() -> None:
    est = AcceptanceEWMA(weight_new=1.0, initial=0.7)
    est.observe([1], [4], [0])
    assert est.rate() == 0.0
    est2 = AcceptanceEWMA(weight_new=0.5, initial=0.6)
    est2.observe([5], [2], [2])  # seq 5 starts at 0.6 -> 0.8
    assert est2.rates([5])[0] == pytest.approx(0.8)


@pytest.mark.parametrize("mode", ["ratio", "per_token"])
def test_validation_names_the_field(mode: str) -> None:
    est = AcceptanceEWMA(mode=mode)
    with pytest.raises(ValueError, match="num_accepted_tokens"):
        est.observe([1], [2], [3])
    with pytest.raises(ValueError, match="num_draft_tokens"):
        est.observe([1], [-1], [0])
    with pytest.raises(ValueError, match="num_draft_tokens"):
        est.observe([1, 2], [1], [0, 0])
    with pytest.raises(ValueError, match="mode"):
        AcceptanceEWMA(mode="mean")
    with pytest.raises(ValueError, match="weight_new"):
        AcceptanceEWMA(weight_new=0.0)


def test_per_token_is_unbiased_and_ratio_is_not() -> None:
    rng = np.random.default_rng(0)
    alpha, k, rounds = 0.8, 4, 16000
    draws = rng.random((rounds, k)) < alpha
    accepted = np.where(draws.all(axis=1), k, np.argmin(draws, axis=1))
    ratio, token = AcceptanceEWMA(weight_new=0.01, mode="ratio"), AcceptanceEWMA(weight_new=0.01, mode="per_token")
    for chunk in np.array_split(accepted, 2000):
        ids = np.arange(chunk.size)
        ratio.observe(ids, np.full(chunk.size, k), chunk)
        token.observe(ids, np.full(chunk.size, k), chunk)
    assert token.rate() == pytest.approx(alpha, abs=0.02)
    # ratio converges to (α + α² + α³ + α⁴) / 4 ≈ 0.59, not α
    assert ratio.rate() == pytest.approx(sum(alpha**j for j in range(1, k + 1)) / k, abs=0.03)


def test_ewma_state_round_trip_through_json() -> None:
    est = AcceptanceEWMA(mode="per_token")
    est.observe([3, 9, 4], [4, 4, 2], [1, 4, 2])
    est.end_sequence(9)
    copy = AcceptanceEWMA(mode="per_token")
    encoded = json.loads(json.dumps(_state.encode(est)))  # how controllers save an estimator they hold
    _state.decode(encoded, current=copy)
    assert copy.rate() == est.rate()
    np.testing.assert_array_equal(copy.rates([3, 4, 9]), est.rates([3, 4, 9]))
    for target in (est, copy):
        target.observe([3, 11], [3, 3], [3, 0])
    np.testing.assert_array_equal(copy.rates([3, 4, 11]), est.rates([3, 4, 11]))


def test_slot_reuse_after_end_sequence() -> None:
    est = AcceptanceEWMA(weight_new=1.0)
    for sid in range(40):
        est.observe([sid], [2], [sid % 3])
        est.end_sequence(sid)
    assert len(est) == 0
    est.observe([100, 101], [2, 2], [2, 0])
    np.testing.assert_allclose(est.rates([100, 101]), [1.0, 0.0])


def test_position_acceptance_exact_counts() -> None:
    pa = PositionAcceptance(k_max=4, initial=0.9)
    # round (d=4, a=2): tried 0,1,2 accepted 0,1; (d=1, a=1): tried 0 accepted 0; (d=3, a=0): tried 0
    pa.observe([4, 1, 3], [2, 1, 0])
    np.testing.assert_allclose(pa._tried, [3, 1, 1, 0])
    np.testing.assert_allclose(pa._accepted, [2, 1, 0, 0])
    c = pa.curve()
    np.testing.assert_allclose(c, [2 / 3, 1.0, 0.0, 0.0])  # position 3 never tried: carries position 2
    np.testing.assert_allclose(pa.cumulative(), [2 / 3, 2 / 3, 0, 0])
    np.testing.assert_allclose(pa.expected_emitted(np.arange(5)), [1, 5 / 3, 7 / 3, 7 / 3, 7 / 3])
    assert pa.expected_emitted(1) == pytest.approx(5 / 3)


def test_position_acceptance_matches_iid_formula_and_vllm_metric() -> None:
    rng = np.random.default_rng(1)
    alpha, k = 0.7, 5
    draws = rng.random((20000, k)) < alpha
    accepted = np.where(draws.all(axis=1), k, np.argmin(draws, axis=1))
    pa = PositionAcceptance(k_max=k)
    pa.observe(np.full(accepted.size, k), accepted)
    np.testing.assert_allclose(pa.curve(), alpha, atol=0.02)
    # every round drafted k_max: cumulative r_j equals vLLM's accepted-at-position / num_drafts
    vllm = np.array([(accepted > j).mean() for j in range(k)])
    np.testing.assert_allclose(pa.cumulative(), vllm, atol=1e-12)
    assert pa.expected_emitted(k) == pytest.approx(expected_emitted(alpha, k), rel=0.02)


def test_position_acceptance_decay_and_validation() -> None:
    pa = PositionAcceptance(k_max=2, decay=0.5)
    pa.observe([2], [2])
    pa.observe([2], [0])
    np.testing.assert_allclose(pa._tried, [1.5, 0.5])
    np.testing.assert_allclose(pa.curve(), [0.5 / 1.5, 1.0])
    with pytest.raises(ValueError, match="k_max"):
        pa.observe([3], [0])
    with pytest.raises(ValueError, match="num_accepted_tokens"):
        pa.observe([1], [2])
    with pytest.raises(ValueError, match="k"):
        pa.expected_emitted(3)
    restored = PositionAcceptance(k_max=2, decay=0.5)
    restored.load_state_dict(json.loads(json.dumps(pa.state_dict())))
    np.testing.assert_array_equal(restored.curve(), pa.curve())
