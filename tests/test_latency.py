"""Latency models: exact interpolation, ragged handling, roofline shape, regression, online learning."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adaptk.estimators import (
    PRESETS,
    LatencySample,
    OnlineLatency,
    ProfileLatency,
    RegressionLatency,
    RooflineLatency,
    expected_emitted,
    get_latency_model,
    load_preset,
)

# the measured SmolLM2-135M CPU verify costs from testbed.md (ms, cache 128): a step at n=4, a dip at 16
NS = [1, 2, 3, 4, 6, 8, 12, 16]
SMOL_B1 = [31.4, 33.5, 35.1, 47.5, 51.0, 59.0, 69.2, 68.4]
SMOL_B8 = [64.2, 77.8, 84.7, 90.9, 107.8, 123.8, 148.1, 176.4]


def smol_profile() -> dict:
    return {
        "format": "adaptk-profile", "version": 1, "name": "smol-testbed", "kind": "measured",
        "verify": {"batch_sizes": [1, 8], "tokens_per_seq": NS, "context_lens": [128, 512],
                   "seconds": [[[v / 1e3, 1.5 * v / 1e3] for v in row] for row in (SMOL_B1, SMOL_B8)]},
        "draft_per_token": {
            "early_exit": {"layers": [6, 12, 18, 24], "batch_sizes": [1, 8],
                           "seconds": [[0.0102, 0.02], [0.0153, 0.03], [0.0206, 0.04], [0.026, 0.05]]},
            "prompt_lookup": {"batch_sizes": [1, 8, 64], "seconds": [1e-4, 8e-4, 6.4e-3]},
        },
        "prefill": {"tokens": [32, 128], "seconds": [0.05, 0.2]},
        "num_layers": 30,
    }


def toy_profile() -> dict:
    # verify = 0.01 + 0.001 * b + 0.002 * n + 0.00001 * c  (trilinear data: interpolation is exact)
    bs, ns, cs = [1, 4], [1, 2, 3], [100, 300]
    seconds = [[[0.01 + 0.001 * b + 0.002 * n + 1e-5 * c for c in cs] for n in ns] for b in bs]
    return {"format": "adaptk-profile", "version": 1, "name": "toy", "kind": "analytic",
            "verify": {"batch_sizes": bs, "tokens_per_seq": ns, "context_lens": cs, "seconds": seconds},
            "draft_per_token": {"draft_model": {"batch_sizes": [1, 4], "seconds": [0.001, 0.004]}}}


def truth(b: float, n: float, c: float) -> float:
    return 0.01 + 0.001 * b + 0.002 * n + 1e-5 * c


# -- profile --------------------------------------------------------------------------------------
def test_profile_interpolation_is_exact_on_trilinear_data() -> None:
    model = ProfileLatency(toy_profile())
    for b, n, c in [(1, 1, 100), (2, 2, 200), (3, 1.5, 150), (4, 3, 300)]:
        k = np.full(b, n - 1)
        if float(n).is_integer():
            draft, verify = model.predict_components(b, k.astype(int), np.full(b, c))
            assert verify == pytest.approx(truth(b, n, c))
            assert draft == pytest.approx((n - 1) * 0.001 * b)
    # fractional tokens per row only arise under "packed": Σ(k+1)/B
    packed = ProfileLatency(toy_profile(), ragged="packed")
    _, verify = packed.predict_components(2, [0, 1], [150, 250])
    assert verify == pytest.approx(truth(2, 1.5, 200))


def test_profile_clamps_below_and_extrapolates_above() -> None:
    model = ProfileLatency(toy_profile())
    # context below the grid: clamped to 100; above: linear in context
    assert model.predict_components(1, [0], [10])[1] == pytest.approx(truth(1, 1, 100))
    assert model.predict_components(1, [0], [500])[1] == pytest.approx(truth(1, 1, 500))
    # tokens and batch above the grid: linear
    assert model.predict_uniform(8, np.array([5]), 100)[0] == pytest.approx(truth(8, 6, 100) + 5 * 0.008)


def test_profile_extrapolation_never_decreases() -> None:
    model = ProfileLatency(smol_profile(), drafter="prompt_lookup")
    t = model.predict_uniform(1, np.arange(0, 25), 128)
    assert t[15] - 1e-4 == pytest.approx(0.0684)  # n=16 measured (dip kept), plus one lookup
    assert np.all(np.diff(t[15:]) >= 0)            # beyond the grid: slope floored at 0
    assert t[11] - 1e-4 == pytest.approx(0.0692)


def test_profile_nulls_are_filled_from_neighbours() -> None:
    data = toy_profile()
    data["verify"]["seconds"][1][2][0] = None       # b=4, n=3, c=100
    data["verify"]["seconds"][0][1][1] = None       # b=1, n=2, c=300
    model = ProfileLatency(data)
    assert model.predict_components(4, [2] * 4, [100] * 4)[1] == pytest.approx(truth(4, 3, 100))
    assert model.predict_components(1, [1], [300])[1] == pytest.approx(truth(1, 2, 300))


def test_profile_drafters() -> None:
    ee = ProfileLatency(smol_profile(), drafter="early_exit")
    assert ee.predict_components(1, [3], [128], exit_layer=12)[0] == pytest.approx(3 * 0.0153)
    assert ee.predict_components(1, [3], [128], exit_layer=15)[0] == pytest.approx(3 * (0.0153 + 0.0206) / 2)
    with pytest.raises(ValueError, match="exit_layer"):
        ee.predict(1, [3], [128])
    pl = ProfileLatency(smol_profile(), drafter="prompt_lookup")
    assert pl.predict_components(8, [5] * 8, [128] * 8)[0] == pytest.approx(8e-4)  # once per step
    assert pl.predict_components(8, [0] * 8, [128] * 8)[0] == 0.0
    with pytest.raises(ValueError, match="draft_model"):
        ProfileLatency(smol_profile(), drafter="draft_model")
    assert pl.prefill_time([32, 80]) == pytest.approx(0.05 + 0.125)


def test_predict_uniform_equals_predict_on_uniform_vectors() -> None:
    models = [ProfileLatency(smol_profile(), drafter="early_exit", exit_layer=18),
              ProfileLatency(smol_profile(), ragged="packed"),
              load_preset("h100-llama3-8b"), load_preset("h100x4-llama3-70b", ragged="padded"),
              OnlineLatency()]
    models.append(RegressionLatency.from_model(models[2], [1, 8, 64], [0, 2, 4, 8], [128, 1024], seed=0))
    ctx = np.arange(100, 164) * 3
    ks = np.arange(17)
    for model in models:
        for batch in (1, 5, 64):
            c = ctx[:batch]
            uniform = model.predict_uniform(batch, ks, c)
            single = [model.predict(batch, np.full(batch, k), c) for k in ks]
            np.testing.assert_allclose(uniform, single, rtol=1e-12, err_msg=type(model).__name__)


def test_padded_vs_packed_on_a_ragged_batch() -> None:
    padded = ProfileLatency(toy_profile(), ragged="padded")
    packed = ProfileLatency(toy_profile(), ragged="packed")
    k, ctx = [0, 0, 0, 2], [100, 100, 100, 300]
    d_pad, v_pad = padded.predict_components(4, k, ctx)
    d_pack, v_pack = packed.predict_components(4, k, ctx)
    assert v_pad == pytest.approx(truth(4, 3, 300))       # every row pays max k + 1, longest context
    assert v_pack == pytest.approx(truth(4, 1.5, 150))    # Σ(k+1)/B tokens per row, mean context
    assert d_pad == pytest.approx(2 * 0.004)              # 2 forwards over all 4 rows
    assert d_pack == pytest.approx(2 * 0.001)             # 2 forwards over the 1 drafting row
    roof_pad = load_preset("h100-llama3-8b", ragged="padded")
    roof_pack = load_preset("h100-llama3-8b", ragged="packed")
    big = np.r_[np.zeros(63, dtype=int), 8]
    assert roof_pad.predict(64, big, 2048) > roof_pack.predict(64, big, 2048)


# -- roofline -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_roofline_memory_bound_at_batch_1_and_best_k_falls_with_batch(name: str) -> None:
    model = load_preset(name)
    assert model.kind == "analytic"
    ks = np.arange(11)
    ctx = 512
    draft_free = load_preset(name, drafter="prompt_lookup")
    t1 = draft_free.predict_uniform(1, ks, ctx)
    assert t1[4] / t1[0] < 1.02                       # verifying 5 tokens ≈ 1 token at batch 1
    t256 = draft_free.predict_uniform(256, ks, ctx)
    assert t256[4] / t256[0] > 2.5                    # 1280 tokens: compute bound
    # monotone in tokens, batch and context
    assert np.all(np.diff(model.predict_uniform(32, ks, ctx)) > 0)
    assert all(model.predict(b, [2] * b, ctx) < model.predict(2 * b, [2] * (2 * b), ctx) for b in (1, 8, 64))
    assert model.predict(8, [2] * 8, 512) < model.predict(8, [2] * 8, 4096)
    best = []
    for batch in (1, 8, 32, 128, 512):
        goodput = batch * expected_emitted(0.8, ks) / model.predict_uniform(batch, ks, ctx)
        best.append(int(ks[np.argmax(goodput)]))
    assert best == sorted(best, reverse=True) and best[0] >= 3 and best[-1] <= 1, best


def test_roofline_prefill_and_early_exit() -> None:
    model = load_preset("h100-llama3-8b", drafter="early_exit", exit_layer=8)
    full = load_preset("h100-llama3-8b", drafter="prompt_lookup").predict_components(4, [0] * 4, 512)[1]
    draft = model.predict_components(4, [1] * 4, 512)[0]
    assert 0.2 * full < draft < 0.5 * full
    assert model.prefill_time([]) == 0.0
    assert model.prefill_time([2000]) > model.prefill_time([100]) > 0


# -- regression -----------------------------------------------------------------------------------
def _samples(fn, rng: np.random.Generator, count: int) -> list[LatencySample]:
    out = []
    for _ in range(count):
        b = int(rng.integers(1, 65))
        k = np.full(b, int(rng.integers(0, 9)))
        ctx = np.full(b, int(rng.integers(64, 2048)))
        tokens, csum = float((k + 1).sum()), float(ctx.sum())
        out.append(LatencySample(b, k, ctx, 0.001 * k[0] * (1 + 0.01 * b), fn(b, tokens, csum)))
    return out


def test_regression_picks_linear_for_linear_data() -> None:
    rng = np.random.default_rng(0)
    model = RegressionLatency(seed=0).fit(_samples(lambda b, t, c: 0.005 + 1e-4 * b + 2e-5 * t + 1e-8 * c, rng, 80))
    assert model.verify_fit["degree"] == 1
    assert model.predict_components(10, [3] * 10, [500] * 10)[1] == pytest.approx(0.005 + 1e-3 + 8e-4 + 5e-5)


def test_regression_picks_and_fits_a_quadratic_exactly() -> None:
    rng = np.random.default_rng(1)
    fn = lambda b, t, c: 0.01 + 1e-4 * b + 1e-5 * t + 3e-7 * t * t + 1e-9 * c + 2e-12 * c * t  # noqa: E731
    model = RegressionLatency(seed=3).fit(_samples(fn, rng, 120))
    assert model.verify_fit["degree"] == 2
    assert model.verify_fit["r2"]["2"] > model.verify_fit["r2"]["1"]
    for b, k, c in [(3, 2, 100), (40, 7, 1500), (64, 0, 64)]:
        assert model.predict_components(b, [k] * b, [c] * b)[1] == pytest.approx(fn(b, b * (k + 1), b * c), rel=1e-6)
    assert model.predict_components(4, [0] * 4, [100] * 4)[0] == 0.0  # no drafting, no draft time


def test_regression_from_model_state_and_refit() -> None:
    source = load_preset("h100-llama3-8b")
    model = RegressionLatency.from_model(source, [1, 4, 16, 64], [0, 1, 2, 4, 8], [256, 2048], seed=0,
                                         num_ragged=20, noise=0.01)
    ks = np.arange(9)
    pred, true = model.predict_uniform(16, ks, 1024), source.predict_uniform(16, ks, 1024)
    np.testing.assert_allclose(pred, true, rtol=0.1)
    copy = RegressionLatency()
    copy.load_state_dict(json.loads(json.dumps(model.state_dict())))
    np.testing.assert_array_equal(copy.predict_uniform(16, ks, 1024), pred)
    with pytest.raises(RuntimeError, match="fit"):
        RegressionLatency().predict(1, [1], [10])
    online = RegressionLatency(refit_every=5)
    online.fit(_samples(lambda b, t, c: 0.01 + 1e-5 * t, np.random.default_rng(2), 20))
    for _ in range(5):
        online.observe(2, [1, 1], [10, 10], 0.0, 1.0)
    assert len(online.state_dict()["samples"]) == 25 and online.state_dict()["since_fit"] == 0


# -- online ---------------------------------------------------------------------------------------
def test_online_prior_favours_speculation_at_small_batch_only() -> None:
    model = OnlineLatency()
    ks = np.arange(9)
    best = [int(ks[np.argmax(expected_emitted(0.7, ks) / model.predict_uniform(b, ks, 256))]) for b in (1, 64)]
    assert best[0] >= 2 and best[1] <= 1, best


@pytest.mark.parametrize("ragged", ["padded", "packed"])
def test_online_converges_to_measured_smollm2_curve(ragged: str) -> None:
    source = ProfileLatency(smol_profile(), drafter="early_exit", exit_layer=12, ragged=ragged)
    model = OnlineLatency(ragged=ragged)
    rng = np.random.default_rng(0)
    for _ in range(400):
        b = int(rng.choice([1, 8]))
        k = np.full(b, int(rng.choice([n - 1 for n in NS])))
        ctx = np.full(b, int(rng.choice([128, 512])))
        draft, verify = source.predict_components(b, k, ctx)
        model.observe(b, k, ctx, draft, verify, exit_layer=12)
    ks = np.array([n - 1 for n in NS])
    for b in (1, 8):
        for c in (128, 512):
            np.testing.assert_allclose(model.predict_uniform(b, ks, c, exit_layer=12),
                                       source.predict_uniform(b, ks, c), rtol=0.1)


def test_online_follows_drift_and_round_trips_state() -> None:
    model = OnlineLatency()
    for _ in range(200):
        model.observe(4, [2] * 4, [100] * 4, 0.004, 0.040)
    assert model.predict(4, [2] * 4, [100] * 4) == pytest.approx(0.044, rel=0.02)
    for _ in range(200):
        model.observe(4, [2] * 4, [100] * 4, 0.008, 0.080)   # the machine got slower
    assert model.predict(4, [2] * 4, [100] * 4) == pytest.approx(0.088, rel=0.05)
    copy = OnlineLatency()
    copy.load_state_dict(json.loads(json.dumps(model.state_dict())))
    ks = np.arange(6)
    np.testing.assert_array_equal(copy.predict_uniform(4, ks, 100), model.predict_uniform(4, ks, 100))
    with pytest.raises(ValueError, match="verify_time_s"):
        model.observe(1, [1], [10], 0.0, float("nan"))


def test_online_stays_on_the_measured_curve_under_noisy_timings_at_one_batch_size() -> None:
    # At one batch size the batch feature is a constant; a recursive fit that forgets its prior let
    # noisy timings (log-normal, sigma 0.1) throw its coefficients off until it priced plain decoding
    # at 0 s and 8 tokens at 4.8 s. The curve is SmolLM2's on this CPU at batch 1.
    engine = get_latency_model("smollm2-135m-cpu", drafter="prompt_lookup")
    model = OnlineLatency()
    rng = np.random.default_rng(0)
    for step in range(6000):
        k, ctx = int(rng.choice([0, 1, 2, 2, 3, 8])), 300 + step % 700
        draft_s, verify_s = engine.predict_components(1, [k], [ctx])
        model.observe(1, [k], [ctx], draft_s, verify_s * float(np.exp(0.1 * rng.standard_normal())))
    for ctx in (400, 900):
        for k in (0, 1, 2, 3, 8):
            assert model.predict_components(1, [k], [ctx])[1] == pytest.approx(
                engine.predict_components(1, [k], [ctx])[1], rel=0.1), (ctx, k)


def test_optimistic_online_prices_an_untried_longer_verify_like_the_longest_tried() -> None:
    cautious, optimistic = OnlineLatency(ragged="packed"), OnlineLatency(ragged="packed", optimistic=True)
    for model in (cautious, optimistic):
        for k in (0, 1) * 20:  # an H100-like batch: 1 and 2 tokens per row cost the same
            model.observe(8, [k] * 8, [600] * 8, 0.0005 * k, 0.0070)
    def verify(model, k):
        return model.predict_components(8, [k] * 8, [600] * 8)[1]

    assert [verify(optimistic, k) for k in range(2, 9)] == pytest.approx([verify(optimistic, 1)] * 7)
    assert all(verify(cautious, k) > 1.2 * verify(optimistic, k) for k in range(3, 9))
    optimistic.observe(8, [8] * 8, [600] * 8, 0.004, 0.030)  # once tried, the measurement counts
    assert verify(optimistic, 8) > 0.02


def test_bounded_optimism_prices_one_token_beyond_the_longest_measured_and_no_further() -> None:
    cautious = OnlineLatency(ragged="padded")
    bounded = OnlineLatency(ragged="padded", optimistic=True, reach=1)

    def verify(model, k, ctx=600):
        return model.predict_components(8, [k] * 8, [ctx] * 8)[1]

    # nothing measured yet: nothing is priced optimistically, so plain decoding gets measured first
    assert [verify(bounded, k) for k in range(4)] == pytest.approx([verify(cautious, k) for k in range(4)])
    for model in (cautious, bounded):
        for _ in range(20):
            model.observe(8, [0] * 8, [600] * 8, 0.0, 0.0070)
            model.observe(8, [0] * 8, [4000] * 8, 0.0, 0.0090)
    assert verify(bounded, 1) == pytest.approx(verify(bounded, 0))    # one token beyond: priced like plain
    assert verify(bounded, 2) == pytest.approx(verify(cautious, 2))   # two beyond: as the model predicts
    assert verify(cautious, 1) > 1.2 * verify(bounded, 1)
    bounded.observe(8, [1] * 8, [600] * 8, 0.0, 0.0350)  # the try: a second token costs 5x the first
    assert verify(bounded, 1) > 0.02
    assert verify(bounded, 2) == pytest.approx(verify(bounded, 1))    # the walk would go on only from there
    # a try counts at this batch size whatever the context: at 4000 the second token is no longer
    # priced like plain decoding there (0.009), but as the model predicts from the try
    assert verify(bounded, 0, ctx=4000) == pytest.approx(0.009)
    assert verify(bounded, 1, ctx=4000) > 0.015


def test_reach_must_be_a_positive_int() -> None:
    for reach in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="reach"):
            OnlineLatency(optimistic=True, reach=reach)


def test_online_by_name_and_spec() -> None:
    assert isinstance(get_latency_model("online"), OnlineLatency)
    model = get_latency_model({"name": "online", "ragged": "packed", "optimistic": True}, drafter="prompt_lookup")
    assert model.ragged == "packed" and model.optimistic


# -- lookup and input validation --------------------------------------------------------------------
def test_get_latency_model_lookup(tmp_path) -> None:
    assert isinstance(get_latency_model("h100-llama3-8b"), RooflineLatency)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(toy_profile()))
    assert isinstance(get_latency_model(str(path)), ProfileLatency)
    assert isinstance(ProfileLatency.from_json(path), ProfileLatency)
    roof = tmp_path / "r.json"
    roof.write_text(json.dumps(PRESETS["h100x4-llama3-70b"]))
    assert get_latency_model(roof, drafter="prompt_lookup").drafter == "prompt_lookup"
    with pytest.raises(ValueError, match="h100-llama3-8b"):
        get_latency_model("nope")
    with pytest.raises(ValueError, match="does not exist"):
        get_latency_model(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("model", [ProfileLatency(toy_profile()), load_preset("h100-llama3-8b"), OnlineLatency()],
                         ids=["profile", "roofline", "online"])
def test_bad_inputs_name_the_argument(model) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        model.predict(0, [], [])
    with pytest.raises(ValueError, match="batch_size"):
        model.predict_uniform(0, np.arange(3), [])
    with pytest.raises(ValueError, match="num_draft_tokens"):
        model.predict(2, [1, -1], [10, 10])
    with pytest.raises(ValueError, match="num_draft_tokens"):
        model.predict(2, [1], [10, 10])
    with pytest.raises(ValueError, match="context_lens"):
        model.predict(2, [1, 1], [10])
    with pytest.raises(ValueError, match="context_lens"):
        model.predict(2, [1, 1], [10, -1])
    with pytest.raises(ValueError, match="ks"):
        model.predict_uniform(2, np.array([-1, 2]), [10, 10])
    with pytest.raises(ValueError, match="context_lens"):
        model.predict_uniform(2, np.array([1, 2]), [10, 10, 10])
    with pytest.raises(ValueError, match="draft_time_s"):
        model.observe(2, [1, 1], [10, 10], -1.0, 0.1)
    with pytest.raises(ValueError, match="ragged"):
        type(model)(**({"profile": toy_profile()} if isinstance(model, ProfileLatency) else {}), ragged="dense") \
            if not isinstance(model, RooflineLatency) else load_preset("h100-llama3-8b", ragged="dense")
