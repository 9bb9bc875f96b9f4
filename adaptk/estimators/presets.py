"""Analytic hardware × model presets for :class:`~adaptk.estimators.latency.RooflineLatency`.

These are **analytic** (``kind: "analytic"``): computed from published peak numbers and model
shapes, not measured — no GPU measurement is available to this project. Each entry is the
``"adaptk-roofline"`` JSON schema (write one to a file and :func:`get_latency_model` reads it).

Sources for the numbers: H100 SXM5 datasheet (989 TFLOP/s dense BF16, 3.35 TB/s HBM3);
Llama-3-8B / Llama-3.2-1B / Llama-3-70B ``config.json`` shapes (parameters rounded).

>>> sorted(PRESETS)
['h100-llama3-8b', 'h100x4-llama3-70b']
>>> load_preset("h100x4-llama3-70b").hardware["num_devices"]
4
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "load_preset", "H100_SXM", "LLAMA3_8B", "LLAMA3_70B", "LLAMA32_1B"]

#: NVIDIA H100 SXM5, one GPU. Efficiencies are typical achieved fractions of peak for decode-sized
#: GEMMs / weight streaming; ``forward_overhead_s`` is launch + sampling overhead per forward.
H100_SXM: dict[str, Any] = {
    "peak_flops": 989e12,
    "mem_bandwidth": 3.35e12,
    "flops_efficiency": 0.6,
    "bandwidth_efficiency": 0.8,
    "forward_overhead_s": 5e-4,
    "num_devices": 1,
    "comm_overhead_s_per_layer": 2e-5,
}

LLAMA3_8B: dict[str, Any] = {"num_params": 8.03e9, "num_layers": 32, "hidden_size": 4096, "num_heads": 32,
                             "num_kv_heads": 8, "head_dim": 128, "bytes_per_param": 2, "kv_bytes": 2}
LLAMA32_1B: dict[str, Any] = {"num_params": 1.24e9, "num_layers": 16, "hidden_size": 2048, "num_heads": 32,
                              "num_kv_heads": 8, "head_dim": 64, "bytes_per_param": 2, "kv_bytes": 2}
LLAMA3_70B: dict[str, Any] = {"num_params": 70.6e9, "num_layers": 80, "hidden_size": 8192, "num_heads": 64,
                              "num_kv_heads": 8, "head_dim": 128, "bytes_per_param": 2, "kv_bytes": 2}

PRESETS: dict[str, dict[str, Any]] = {
    "h100-llama3-8b": {
        "format": "adaptk-roofline", "version": 1, "name": "h100-llama3-8b", "kind": "analytic",
        "description": "Roofline estimate: Llama-3-8B target (bf16) on one H100 SXM, Llama-3.2-1B-shaped draft.",
        "target": LLAMA3_8B, "draft": LLAMA32_1B, "hardware": H100_SXM, "ragged": "packed",
    },
    "h100x4-llama3-70b": {
        "format": "adaptk-roofline", "version": 1, "name": "h100x4-llama3-70b", "kind": "analytic",
        "description": ("Roofline estimate: Llama-3-70B target (bf16) tensor-parallel over 4 H100 SXM, "
                        "Llama-3.2-1B-shaped draft on one GPU."),
        "target": LLAMA3_70B, "draft": LLAMA32_1B, "hardware": {**H100_SXM, "num_devices": 4}, "ragged": "packed",
    },
}


def load_preset(name: str, **kwargs: Any) -> RooflineLatency:  # noqa: F821
    """A :class:`RooflineLatency` for preset ``name`` (keyword arguments override fields)."""
    from adaptk.estimators.latency import RooflineLatency

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return RooflineLatency.from_preset(name, **kwargs)
