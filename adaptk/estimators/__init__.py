"""Shared online estimators: acceptance rates and step-latency (cost) models (numpy only).

>>> import numpy as np
>>> from adaptk.estimators import AcceptanceEWMA, expected_emitted, get_latency_model
>>> model = get_latency_model("h100-llama3-8b")
>>> ks = np.arange(9)
>>> goodput = expected_emitted(0.8, ks) / model.predict_uniform(8, ks, np.full(8, 512))
>>> int(ks[goodput.argmax()]) > 0
True
"""

from adaptk.estimators.acceptance import AcceptanceEWMA, PositionAcceptance, expected_emitted
from adaptk.estimators.latency import (
    LatencyModel,
    LatencySample,
    OnlineLatency,
    ProfileLatency,
    RegressionLatency,
    RooflineLatency,
    available_profiles,
    get_latency_model,
    load_profile,
)
from adaptk.estimators.presets import PRESETS, load_preset

__all__ = [
    "AcceptanceEWMA",
    "PositionAcceptance",
    "expected_emitted",
    "LatencyModel",
    "LatencySample",
    "OnlineLatency",
    "ProfileLatency",
    "RegressionLatency",
    "RooflineLatency",
    "available_profiles",
    "get_latency_model",
    "load_profile",
    "PRESETS",
    "load_preset",
]
