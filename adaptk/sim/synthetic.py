"""Synthetic traces with a known acceptance process, for tests and for workloads the bundled ones lack.

Recorded traces are the evidence for claims about real models; these generators exist to put a
controller in situations a recording may not contain, with the ground truth known: i.i.d. acceptance
(each sequence its own rate) and acceptance that switches between an easy and a hard regime within
a sequence (a summary that alternates between copying its source and writing its own words).

>>> traces = regime_switching_traces(n=2, seed=0)
>>> len(traces), traces.drafter, traces.k_max
(2, 'draft_model', 16)
>>> int(traces.traces[0].match_len.max()) <= 16
True
"""

from __future__ import annotations

import numpy as np

from adaptk.sim.trace import Trace, TraceSet

__all__ = ["iid_traces", "regime_switching_traces"]


def _runs(alpha: np.ndarray, k_max: int, rng: np.random.Generator) -> np.ndarray:
    """Match lengths when position ``t`` accepts each next draft token with probability ``alpha[t]``."""
    length = len(alpha)
    runs = np.minimum(rng.geometric(1.0 - alpha) - 1, k_max)
    return np.minimum(runs, np.maximum(length - 1 - np.arange(length), 0))  # never past the end


def iid_traces(n: int = 24, alpha: tuple[float, float] = (0.6, 0.9), k_max: int = 16,
               output_len: tuple[int, int] = (150, 300), seed: int = 0,
               drafter: str = "draft_model") -> TraceSet:
    """Sequence ``i`` accepts every draft token with its own probability ``α_i ~ U(alpha)``."""
    rng = np.random.default_rng(seed)
    traces = []
    for i in range(n):
        rate, length = rng.uniform(*alpha), int(rng.integers(*output_len))
        runs = _runs(np.full(length, rate), k_max, rng)
        traces.append(Trace(f"iid{i}", "synthetic", int(rng.integers(100, 600)), match_len=runs))
    return TraceSet(traces, drafter, k_max=k_max)


def regime_switching_traces(n: int = 24, rates: tuple[float, float] = (0.2, 0.9), stretch: tuple[int, int] = (20, 60),
                            k_max: int = 16, output_len: tuple[int, int] = (150, 300), seed: int = 0,
                            drafter: str = "draft_model") -> TraceSet:
    """Each sequence is cut into stretches of ``stretch`` tokens (its own length, drawn once), each
    stretch hard or easy at random: draft tokens are accepted with probability ``rates[0]`` or
    ``rates[1]``."""
    rng = np.random.default_rng(seed)
    traces = []
    for i in range(n):
        length, span = int(rng.integers(*output_len)), int(rng.integers(*stretch))
        alpha = np.repeat(rng.choice(np.asarray(rates, dtype=np.float64), size=length // span + 1), span)[:length]
        runs = _runs(alpha, k_max, rng)
        traces.append(Trace(f"switch{i}", "synthetic", int(rng.integers(100, 600)), match_len=runs))
    return TraceSet(traces, drafter, k_max=k_max)
