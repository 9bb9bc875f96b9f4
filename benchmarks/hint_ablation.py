"""What the n-gram match-length hint is worth to ``adaptk`` under vLLM-like packed costs (exact replay).

vLLM's n-gram proposer tells the scheduler what it drafted, not how long the matched n-gram was.
This replays the bundled SmolLM2 prompt-lookup traces at one batch size under a packed linear cost
fitted to the vLLM CPU engine's measured steps (``benchmarks/results/vllm-steps.json``, written by
``vllm_steps.py``), and compares every fixed k with ``adaptk`` learning costs online (as inside
vLLM) with the hint, without it, and without it while the drafter offers all or nothing (as vLLM's
proposer does)::

    python benchmarks/hint_ablation.py          # a few seconds; writes benchmarks/results/hint-ablation.json
    python benchmarks/hint_ablation.py --objective step --out /tmp/hint-step.json   # adaptk's per-step rule
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

import adaptk
from adaptk.bench.runner import bundled_trace_paths
from adaptk.controllers.flagship import AdaptK
from adaptk.estimators.latency import LatencySample, RegressionLatency
from adaptk.sim.replay import Workload, replay
from adaptk.sim.trace import TraceSet
from adaptk.types import StepContext

ROOT = Path(__file__).resolve().parents[1]
PACKED_ONLINE = {"name": "online", "ragged": "packed"}


class WithoutMatchLength(AdaptK):
    """``adaptk`` that is not told the matched n-gram length (vLLM does not report it)."""

    def _decide(self, context: StepContext):  # noqa: ANN202
        return super()._decide(dataclasses.replace(context, match_ngram_lens=None))


class WithoutMatchLengthAllOrNothing(WithoutMatchLength):
    """... and whose drafter offers ``k_max`` tokens or none, as vLLM's proposer at ``K = k_max``."""

    def _decide(self, context: StepContext):  # noqa: ANN202
        offer = context.draft_available
        if offer is not None:
            offer = np.where(offer > 0, context.k_max, 0)
        return super()._decide(dataclasses.replace(context, draft_available=offer))


def vllm_like_cost(steps_file: Path, batch: int) -> tuple[RegressionLatency, float, float]:
    """A packed cost ``base + slope · drafted`` fitted to the measured full steps."""
    curve = json.loads(steps_file.read_text())["full_step_ms_by_drafted"]
    drafted = np.array([float(k) + 1.5 for k in curve])  # bucket of 4 -> roughly its middle
    drafted[0] = 0.0
    ms = np.array(list(curve.values()))
    slope, base = np.polyfit(drafted, ms, 1)
    samples = [LatencySample(batch, [k] * batch, [400] * batch, 0.0, (base + slope * k * batch) / 1e3)
               for k in range(9) for _ in range(2)]
    return RegressionLatency(ragged="packed").fit(samples), base, slope


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-requests", type=int, default=None, help="replay only this many requests (default: all 90)")
    parser.add_argument("--steps-file", type=Path, default=ROOT / "benchmarks" / "results" / "vllm-steps.json")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "hint-ablation.json")
    parser.add_argument("--objective", default="throughput", choices=["throughput", "step"], help="adaptk's objective")
    args = parser.parse_args(argv)
    latency, base, slope = vllm_like_cost(args.steps_file, args.batch_size)
    work = Workload(TraceSet.load(bundled_trace_paths()["smollm2-prompt-lookup"]))
    n = args.num_requests
    goodput = {f"fixed k={k}": replay(adaptk.make("fixed", k=k), work, latency, args.batch_size, num_requests=n).token_goodput
               for k in range(9)}
    best = max(goodput.values())
    objective = args.objective
    for label, controller in (("adaptk", AdaptK(latency=PACKED_ONLINE, objective=objective)),
                              ("adaptk without the match length", WithoutMatchLength(latency=PACKED_ONLINE, objective=objective)),
                              ("adaptk without it, all-or-nothing offers",
                               WithoutMatchLengthAllOrNothing(latency=PACKED_ONLINE, objective=objective))):
        goodput[label] = replay(controller, work, latency, args.batch_size, num_requests=n).token_goodput
    print(f"batch {args.batch_size}, packed cost {base:.1f} ms + {slope:.2f} ms per drafted token (from {args.steps_file.name})")
    for label, value in goodput.items():
        print(f"{label:42s} {value:7.1f} tok/s  {value / best:.3f} of the best fixed k")
    args.out.write_text(json.dumps({
        "command": "python benchmarks/hint_ablation.py", "batch_size": args.batch_size, "num_requests": n,
        "objective": objective,
        "base_ms": base, "ms_per_drafted_token": slope, "token_goodput": goodput,
        "relative_to_best_fixed": {k: v / best for k, v in goodput.items()},
    }, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
