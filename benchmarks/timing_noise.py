"""What noisy step timings cost the controllers that learn from them (exact replay).

Controllers that learn costs online read the step times the engine reports. On a shared machine
those times are noisy: this project's CPU host varies by ±10–50% over minutes, in spells. This
script replays prompt-lookup traces with the timings the controller is told multiplied by
``exp(σ·z)``, ``z`` an AR(1) process (:func:`adaptk.sim.replay.replay`'s ``timing_noise`` and
``timing_noise_corr``), while every controller is scored on the true clock. So the difference
between a noisy column and the noise-free one is what the noise does to the decisions alone.

Four settings, each against the best fixed ``k`` of the same request order (drafts capped at 8):

* the engine's drafter (vLLM ``ngram``, n = 2..4, 96 tokens) at batch 8 under a packed cost fitted
  to the vLLM CPU engine's steps, as ``bench_vllm.py`` runs it;
* the bundled traces (n = 1..3, 256 tokens) at batch 8 under the same packed cost;
* the bundled traces at batch 1 and 8 under the SmolLM2 CPU profile, priced padded (the reference
  decoder).

Every controller learns its costs online (``latency="online"``, packed where the cost is packed);
the bandits' reward is the measured tokens per second. Medians over three seeds (each seed is a
request order and a noise path).

    python benchmarks/timing_noise.py        # ~6 min on 2 cores; writes benchmarks/results/timing-noise.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import adaptk
from adaptk.bench.runner import bundled_trace_paths
from adaptk.estimators.latency import get_latency_model
from adaptk.sim.replay import Workload, replay
from adaptk.sim.trace import TraceSet

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from hint_ablation import capped_workload, vllm_like_cost  # noqa: E402

# (σ, step-to-step correlation): none, independent jitter, spells of ~100 steps
NOISE = [(0.0, 0.0), (0.1, 0.0), (0.3, 0.0), (0.3, 0.99), (0.5, 0.99)]
CONTROLLERS = ["adaptk", "smartspec", "dsd", "ucb", "thompson"]
SETTINGS = {
    "vLLM drafter, batch 8, packed": ("vllm-ngram", 8, "packed"),
    "bundled, batch 8, packed": ("bundled", 8, "packed"),
    "bundled, batch 1, CPU profile": ("bundled", 1, "cpu"),
    "bundled, batch 8, CPU profile": ("bundled", 8, "cpu"),
}
K_MAX = 8


def _workload(name: str) -> Workload:
    path = (ROOT / "benchmarks" / "data" / "smollm2-prompt-lookup-vllm-ngram.npz" if name == "vllm-ngram"
            else bundled_trace_paths()["smollm2-prompt-lookup"])
    return capped_workload(TraceSet.load(path), K_MAX)


def _controller(name: str, cost: str) -> adaptk.SpeculationController:
    if name in ("ucb", "thompson"):
        return adaptk.make(name)
    return adaptk.make(name, latency={"name": "online", "ragged": "packed"} if cost == "packed" else "online")


def run_setting(task: tuple[str, int, int]) -> dict:
    """Goodput relative to the best fixed k, per controller and noise level, for one seed."""
    label, seed, num_requests = task
    traces, batch, cost = SETTINGS[label]
    work = _workload(traces)
    if cost == "packed":
        latency = vllm_like_cost(ROOT / "benchmarks" / "results" / "vllm-steps.json", batch)[0]
    else:
        latency = get_latency_model("smollm2-135m-cpu", drafter=work.traces.drafter)
    best = max(replay(adaptk.make("fixed", k=k), work, latency, batch, seed=seed,
                      num_requests=num_requests).token_goodput for k in range(K_MAX + 1))
    out = {}
    for name in CONTROLLERS:
        out[name] = [replay(_controller(name, cost), work, latency, batch, seed=seed, num_requests=num_requests,
                            timing_noise=sigma, timing_noise_corr=corr).token_goodput / best
                     for sigma, corr in NOISE]
    return {"setting": label, "seed": seed, "relative_to_best_fixed": out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--num-requests", type=int, default=None, help="requests per replay (default: all 90)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "timing-noise.json")
    args = parser.parse_args(argv)
    tasks = [(label, seed, args.num_requests) for label in SETTINGS for seed in range(args.seeds)]
    with ProcessPoolExecutor(args.workers) as pool:
        runs = list(pool.map(run_setting, tasks))
    header = " ".join(f"{f'σ={s:g}' + (f' ρ={c:g}' if c else ''):>12s}" for s, c in NOISE)
    summary: dict[str, dict[str, list[float]]] = {}
    for label in SETTINGS:
        print(f"\n{label}: median over seeds of goodput / best fixed k (controller told noisy timings)")
        print(f"  {'':10s} {header}")
        summary[label] = {}
        for name in CONTROLLERS:
            per_seed = [r["relative_to_best_fixed"][name] for r in runs if r["setting"] == label]
            medians = [statistics.median(column) for column in zip(*per_seed, strict=True)]
            summary[label][name] = medians
            print(f"  {name:10s} " + " ".join(f"{m:12.3f}" for m in medians))
    args.out.write_text(json.dumps({
        "command": "python benchmarks/timing_noise.py", "noise": [{"sigma": s, "corr": c} for s, c in NOISE],
        "k_max": K_MAX, "seeds": args.seeds, "num_requests": args.num_requests,
        "median_relative_to_best_fixed": summary, "runs": runs,
    }, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
