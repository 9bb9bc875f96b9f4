"""Per-step anatomy of a real vLLM engine at one concurrency: what speculation costs and returns.

For each configuration (run on one adaptk engine, swapped between runs, interleaved over rounds):
engine steps, drafted and accepted tokens, wall time, and the median step time of full steps
(every slot busy) bucketed by how many tokens the step verified beyond one per request. The slope
of that curve is what one drafted token costs; accepted / drafted is what it returns.

Step counts and drafted tokens do not depend on how fast the shared machine happens to run; wall
time does, by up to 1.5× between identical runs. So each run is also priced by the steps' own
cost line, fitted over every full step of the whole benchmark (``ms = base + slope · drafted``):
``steps · base + drafted · slope``. That is an estimate (it prices the tail and prefill steps like
full ones, the same requests for every configuration), but one that host noise cannot move.

By default the untimed full batch before the timed rounds runs under the last configuration, so a
learning controller listed last starts the timed rounds trained. ``--fresh-start`` gives every
configuration a new controller after it, so round 1 is a learning controller's cold start.

Each run counts its drain: the steps after the last admission, when freed slots are no longer
refilled, and the row-steps left idle over the run (slots without a running request, or admitting
one), which is where a finite job loses part of what speculation saves at full batch.

Each run also splits its wall clock: seconds in decode steps, in steps that also ran prompt tokens
(admissions, the same for every configuration), and in the controller's decisions between steps;
the rest is the engine's own work between steps.

Run in the vLLM environment (``bash scripts/install_vllm_env.sh``), alone on the machine::

    .venv-vllm/bin/python benchmarks/vllm_steps.py            # ~4 min

Results: ``benchmarks/results/vllm-steps.json`` and a printed table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_vllm import batched_requests, chat_prompts, parse_controllers  # noqa: E402


class Step(NamedTuple):
    """One engine step as the hook saw it."""

    seconds: float
    rows: int  # requests that got feedback
    drafted: int
    accepted: int
    prefilled: bool  # the step also ran prompt tokens


def drain(steps: list[Step], concurrency: int) -> tuple[int, int]:
    """(steps after the last one that admitted a request, row-steps left idle over the run).

    Once the last request is admitted no freed slot is refilled, so the batch thins while the last
    requests finish: what speculation saves at full batch is partly lost to the idle rows there.
    A row admitting a request (its prompt step) counts as idle: it verifies nothing.

    >>> steps = [Step(0.1, 0, 0, 0, True), Step(0.1, 2, 2, 1, False), Step(0.1, 1, 1, 0, True),
    ...          Step(0.1, 2, 0, 0, False), Step(0.1, 1, 0, 0, False)]
    >>> drain(steps, concurrency=2)
    (2, 4)
    """
    last_admission = max((i for i, step in enumerate(steps) if step.prefilled), default=-1)
    return len(steps) - 1 - last_admission, sum(concurrency - step.rows for step in steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controllers", default="fixed:2,fixed:8,adaptk")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests-per-slot", type=int, default=4, help="as in bench_vllm.py")
    parser.add_argument("--k-max", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--fresh-start", action="store_true",
                        help="new controllers after the untimed full batch: round 1 is a cold start")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vllm-steps.json"))
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    import adaptk
    from adaptk.adapters import vllm as adapter
    from adaptk.decoding.models import fetch_smollm2

    adapter.allow_repeated_inprocess_engines()
    model_dir = adapter.model_dir_for_vllm(fetch_smollm2())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # the requests bench_vllm.py sends at this concurrency
    prompts = chat_prompts(tokenizer, batched_requests(max(12, args.requests_per_slot * args.concurrency), 2))
    specs, _ = parse_controllers(args.controllers, args.k_max)
    llm = LLM(model_dir, dtype="float32", enforce_eager=True, max_model_len=2048, seed=0,
              max_num_seqs=args.concurrency, kv_cache_memory_bytes=512 << 20,
              **adapter.engine_kwargs("fixed", method="ngram", k_max=args.k_max,
                                      prompt_lookup_min=2, prompt_lookup_max=4))
    hook = adapter.scheduler_hook(llm)
    steps: list[Step] = []
    schedule_started, send_feedback, decide_caps = hook.schedule_started, hook.send_feedback, hook._decide_caps
    started: list[float] = []
    deciding = [0.0]  # seconds in the controller's decisions (and the adapter around them), this run

    def timed_start() -> float:
        started.append(schedule_started())
        return started[-1]

    def logged_feedback(output, rows) -> None:
        prefilled = hook._prefilled(output)
        send_feedback(output, rows)
        rows = rows or []
        steps.append(Step(time.perf_counter() - started[-1], len(rows), sum(r[2] for r in rows),
                          sum(r[3] for r in rows), prefilled))

    def timed_decide(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return decide_caps(*args, **kwargs)
        finally:
            deciding[0] += time.perf_counter() - t0

    hook.schedule_started, hook.send_feedback, hook._decide_caps = timed_start, logged_feedback, timed_decide
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)

    def new_controllers() -> dict[str, Any]:
        return {label: adaptk.from_spec(adapter.price_packed(spec)) for label, spec in specs}

    kept = new_controllers()
    for label in kept:  # warm-up (numba compiles the n-gram drafter)
        hook.set_controller(kept[label])
        llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    llm.generate(prompts, params, use_tqdm=False)  # the first full batch runs slow (first-touch allocations)
    if args.fresh_start:
        kept = new_controllers()
    runs: dict[str, list[dict]] = defaultdict(list)
    full_steps: list[tuple[int, float]] = []  # (drafted, ms) of every full step, all runs
    for r in range(args.rounds):
        order = specs[r % len(specs):] + specs[: r % len(specs)]
        for label, _ in order:
            hook.set_controller(kept[label])
            steps.clear()
            deciding[0] = 0.0
            t0 = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - t0
            drain_steps, idle_row_steps = drain(steps, args.concurrency)
            full = defaultdict(list)
            for step in steps:
                if step.rows == args.concurrency:
                    full[min(step.drafted // 4 * 4, 24)].append(step.seconds)
                    full_steps.append((step.drafted, 1e3 * step.seconds))
            runs[label].append({
                "tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
                "wall_s": wall,
                "steps": len(steps),
                "drafted": sum(s.drafted for s in steps),
                "accepted": sum(s.accepted for s in steps),
                # where the wall clock went: decode steps, steps that also ran prompt tokens (the
                # same admissions for every configuration), the controller's decisions (between steps)
                "decode_steps_s": sum(s.seconds for s in steps if not s.prefilled),
                "prefill_steps_s": sum(s.seconds for s in steps if s.prefilled),
                "prefill_steps": sum(s.prefilled for s in steps),
                "deciding_s": deciding[0],
                "drain_steps": drain_steps,
                "idle_row_steps": idle_row_steps,
                "full_step_ms_by_drafted": {b: [len(v), 1e3 * statistics.median(v)] for b, v in sorted(full.items())},
            })
            print(f"round {r + 1}: {label}: {runs[label][-1]['tokens'] / wall:.1f} tok/s", flush=True)

    print(f"\nconcurrency {args.concurrency}, {len(prompts)} prompts, {args.max_tokens} new tokens, "
          f"{args.rounds} rounds (medians over rounds)")
    print(f"{'configuration':14s} {'tok/s':>7s} {'steps':>6s} {'drafted':>8s} {'accepted':>9s} {'acc/draft':>9s}")
    summary = {}
    for label, _ in specs:
        rs = runs[label]
        row = {key: statistics.median(x[key] for x in rs) for key in ("steps", "drafted", "accepted")}
        row["tokens_per_s"] = statistics.median(x["tokens"] / x["wall_s"] for x in rs)
        summary[label] = row
        ratio = row["accepted"] / row["drafted"] if row["drafted"] else 0.0
        print(f"{label:14s} {row['tokens_per_s']:7.1f} {row['steps']:6.0f} {row['drafted']:8.0f} "
              f"{row['accepted']:9.0f} {ratio:9.2f}")
    print("wall clock split, per run (s): decode steps / steps with prompt tokens / deciding")
    for label, rs in runs.items():
        print(f"  {label:14s} " + ", ".join(
            f"{x['decode_steps_s']:.2f} / {x['prefill_steps_s']:.2f} / {x['deciding_s']:.3f}" for x in rs))
    print("drain steps (after the last admission) / idle row-steps, per run")
    for label, rs in runs.items():
        print(f"  {label:14s} " + ", ".join(f"{x['drain_steps']} / {x['idle_row_steps']}" for x in rs))
    pooled = defaultdict(list)
    for rs in runs.values():
        for x in rs:
            for bucket, (count, ms) in x["full_step_ms_by_drafted"].items():
                pooled[bucket].extend([ms] * count)
    curve = {b: statistics.median(v) for b, v in sorted(pooled.items())}
    print("median full-step ms by drafted tokens (bucket of 4):",
          {b: round(v, 1) for b, v in curve.items()})
    drafted_per_step, step_ms = zip(*full_steps, strict=True)
    try:
        slope, base = statistics.linear_regression(drafted_per_step, step_ms)
    except statistics.StatisticsError:  # every full step drafted the same (e.g. only K = 0 runs)
        slope, base = 0.0, statistics.fmean(step_ms)
    print(f"full steps: {base:.1f} ms + {slope:.2f} ms per drafted token; priced by that line, per run (s):")
    for label, rs in runs.items():
        for x in rs:
            x["priced_s"] = (x["steps"] * base + x["drafted"] * slope) / 1e3
        print(f"  {label:14s} " + ", ".join(f"{x['priced_s']:.2f}" for x in rs))
    Path(args.out).write_text(json.dumps({
        "command": "python benchmarks/vllm_steps.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "concurrency": args.concurrency, "rounds": args.rounds, "summary": summary,
        "full_step_ms_by_drafted": curve,
        "full_step_line_ms": {"base": base, "per_drafted_token": slope}, "runs": runs,
    }, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
