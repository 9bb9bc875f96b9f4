"""What the n-gram match-length hint is worth to ``adaptk`` under vLLM-like packed costs (exact replay).

Replays prompt-lookup traces at one batch size under a packed linear cost fitted to the vLLM CPU
engine's measured steps (``benchmarks/results/vllm-steps.json``, written by ``vllm_steps.py``), with
drafts capped at the engine's ``K`` (``--k-max``, 8 as in ``bench_vllm.py``; capping a trace's match
lengths at ``K`` is exact for every schedule that drafts at most ``K``). It compares every fixed
``k`` with ``adaptk`` learning costs online (as inside vLLM) with the hint (the adapter computes it),
and without it.

Three trace sets by default, of the same 90 bundled Spec-Bench prompts:

* the bundled ``smollm2-prompt-lookup`` traces: Hugging Face's prompt lookup, n = 1..3, 256 tokens;
* ``benchmarks/data/smollm2-prompt-lookup-n1-3-96.npz``: the same drafter over 96-token outputs;
* ``benchmarks/data/smollm2-prompt-lookup-vllm-ngram.npz``: the same 96-token outputs under vLLM's
  ``ngram`` proposer as ``bench_vllm.py`` runs it, n = 2..4 (vLLM's rule — the longest n-gram in
  range, its earliest occurrence, the continuation cut at the end of the text — is the one
  :mod:`adaptk.ngram` implements).

The two 96-token sets were recorded (greedy, so deterministic; ~6 min each) with::

    adaptk record --drafter prompt_lookup --max-new-tokens 96 --k-max 8 --max-ngram 3 --min-ngram 1 \\
        --threads 2 --batch-size 16 --out benchmarks/data/smollm2-prompt-lookup-n1-3-96.npz
    adaptk record --drafter prompt_lookup --max-new-tokens 96 --k-max 8 --max-ngram 4 --min-ngram 2 \\
        --threads 2 --batch-size 16 --out benchmarks/data/smollm2-prompt-lookup-vllm-ngram.npz

Run::

    python benchmarks/hint_ablation.py          # a few seconds; writes benchmarks/results/hint-ablation.json
    python benchmarks/hint_ablation.py --objective step --out /tmp/hint-step.json   # adaptk's per-step rule
    python benchmarks/hint_ablation.py --num-requests 16 --resume --out /tmp/hint-resumed.json   # a restart with saved state
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
DATA = ROOT / "benchmarks" / "data"
DEFAULT_TRACES = [bundled_trace_paths()["smollm2-prompt-lookup"], DATA / "smollm2-prompt-lookup-n1-3-96.npz",
                  DATA / "smollm2-prompt-lookup-vllm-ngram.npz"]


class WithoutMatchLength(AdaptK):
    """``adaptk`` that is not told the matched n-gram length."""

    def _decide(self, context: StepContext):  # noqa: ANN202
        return super()._decide(dataclasses.replace(context, match_ngram_lens=None))


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


def capped_workload(traces: TraceSet, k_max: int) -> Workload:
    """``traces`` as a drafter offering at most ``k_max`` tokens sees them."""
    work = Workload(traces)
    if k_max < work.k_max:
        work.k_max = k_max
        work.match_len = np.minimum(work.match_len, k_max)
        if work.draft_avail is not None:
            work.draft_avail = np.minimum(work.draft_avail, k_max)
    return work


def ablate(work: Workload, latency: RegressionLatency, batch_size: int, num_requests: int | None,
           objective: str, resume: bool = False) -> dict[str, float]:
    """Tokens/s of every fixed k up to the workload's cap and of adaptk with and without the hint.

    ``resume``: each adaptk first serves every trace once in another order (seed 1), as a server
    restarted with the state it saved (the vLLM adapter's ``state_file``) would have.
    """
    goodput = {f"fixed k={k}": replay(adaptk.make("fixed", k=k), work, latency, batch_size,
                                      num_requests=num_requests).token_goodput
               for k in range(work.k_max + 1)}
    for label, controller in (("adaptk", AdaptK(latency=PACKED_ONLINE, objective=objective)),
                              ("adaptk without the match length",
                               WithoutMatchLength(latency=PACKED_ONLINE, objective=objective))):
        if resume:
            replay(controller, work, latency, batch_size, seed=1)
        goodput[label] = replay(controller, work, latency, batch_size, num_requests=num_requests).token_goodput
    return goodput


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--k-max", type=int, default=8, help="the engine's K: drafts are capped here")
    parser.add_argument("--num-requests", type=int, default=None, help="replay only this many requests (default: all 90)")
    parser.add_argument("--traces", type=Path, nargs="+", default=DEFAULT_TRACES, help="prompt-lookup trace files")
    parser.add_argument("--steps-file", type=Path, default=ROOT / "benchmarks" / "results" / "vllm-steps.json")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "hint-ablation.json")
    parser.add_argument("--objective", default="throughput", choices=["throughput", "step"], help="adaptk's objective")
    parser.add_argument("--resume", action="store_true",
                        help="adaptk starts with what it learned serving every trace once in another order")
    args = parser.parse_args(argv)
    latency, base, slope = vllm_like_cost(args.steps_file, args.batch_size)
    print(f"batch {args.batch_size}, K = {args.k_max}, packed cost {base:.1f} ms + {slope:.2f} ms per drafted token "
          f"(from {args.steps_file.name})")
    results = {}
    for path in args.traces:
        traces = TraceSet.load(path)
        work = capped_workload(traces, args.k_max)
        if work.ngram_len is None or work.draft_avail is None:
            parser.error(f"{path}: not a prompt-lookup trace set (it records no n-gram match lengths)")
        meta = traces.meta
        goodput = ablate(work, latency, args.batch_size, args.num_requests, args.objective, args.resume)
        best = max(v for k, v in goodput.items() if k.startswith("fixed"))
        matched = work.ngram_len[0]
        info = results[path.stem] = {
            "traces": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
            "ngram_range": [meta.get("min_ngram"), meta.get("max_ngram")],
            "max_new_tokens": meta.get("max_new_tokens"),
            "share_of_positions_offered": float((work.draft_avail[0] > 0).mean()),
            "share_matched_by_one_token": float((matched == 1).mean()),
            "first_draft_accepted_by_match_length": {
                int(n): float((work.match_len[0][matched == n] > 0).mean()) for n in np.unique(matched) if n > 0},
            "token_goodput": goodput,
            "relative_to_best_fixed": {k: v / best for k, v in goodput.items()},
        }
        accepted = ", ".join(f"{p:.0%} after a {n}-token match" for n, p in info["first_draft_accepted_by_match_length"].items())
        print(f"\n{path.name}: n = {meta.get('min_ngram')}..{meta.get('max_ngram')}, "
              f"{info['share_of_positions_offered']:.0%} of positions offered a draft, "
              f"{info['share_matched_by_one_token']:.0%} by a one-token match; first draft accepted {accepted}")
        for label, value in goodput.items():
            print(f"  {label:34s} {value:7.1f} tok/s  {value / best:.3f} of the best fixed k")
    args.out.write_text(json.dumps({
        "command": "python benchmarks/hint_ablation.py", "batch_size": args.batch_size, "k_max": args.k_max,
        "num_requests": args.num_requests, "objective": args.objective, "resume": args.resume,
        "base_ms": base, "ms_per_drafted_token": slope, "trace_sets": results,
    }, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
