"""Tokens/s of adaptk controllers inside a real vLLM engine (SmolLM2-135M-Instruct, ngram drafter).

Run in the vLLM environment (``bash scripts/install_vllm_env.sh``)::

    nice -n 15 .venv-vllm/bin/python benchmarks/bench_vllm.py --rounds 3  # ~20 min on 2 idle cores
    nice -n 15 .venv-vllm/bin/python benchmarks/bench_vllm.py --prompts-per-task 1 --max-tokens 64  # quicker

SmolLM2 is converted from its PyPI GGUF on first use (about a minute) and cached under
``~/.cache/adaptk``; either environment can do it.

What runs, side by side in one process (three in-process engines, built once):

* the **adaptk engine**: vLLM ngram drafting with ``num_speculative_tokens = --k-max`` and the
  adaptk scheduler; every controller in ``--controllers`` is swapped into this one engine in turn
  (``name`` or ``name:k`` for ``fixed``; unknown names are skipped with a note);
* **vllm-table**: the same drafter under vLLM's own batch-size table
  (``num_speculative_tokens_per_batch_size``, ``--vllm-table``) with vLLM's stock scheduler;
* **none**: the same model without speculative decoding.

Workload: Spec-Bench prompts (the bundled ``adaptk/data/specbench_subset.jsonl`` if present, else
``/work/shared/data/specbench/question.jsonl``), first-turn prompts in SmolLM2's chat template,
greedy, ``--max-tokens`` new tokens (EOS ignored so every configuration produces the same tokens).
Concurrency 1 sends ``--prompts-per-task`` prompts of each of the six tasks, one at a time.
Concurrency N sends ``--requests-per-slot`` × N requests (tasks interleaved) to an engine that runs
at most N at once (``max_num_seqs``): with only a little more work than slots, most of the time
would be a draining tail at a smaller batch, which is not what a server at concurrency N does.
Every configuration first runs an untimed warm-up at each concurrency (the first steps at a new
batch shape are slow, and used to be charged to whichever configuration ran first). Timed runs are
interleaved (round-robin, order rotated every round) so slow drifts of the machine hit all alike;
each cell reports total tokens / total seconds, and the median over rounds of its paired speedup
(run r against the run without speculation of the same round), which one disturbed run cannot move.
Each adaptk configuration keeps one controller across its runs at a concurrency (a serving engine
keeps its controller running); ``--fresh-controllers`` builds a new one for every run instead.

``--resumed adaptk`` adds a configuration "adaptk (resumed)": a server restarted with
``state_file``. Before the timed runs at each concurrency its controller serves
``--resume-requests`` requests of *other* Spec-Bench prompts (none of the timed ones), untimed, and
then goes through the state file (:func:`adaptk.adapters.vllm.save_controller_state`, then
``load_controller_state`` into a new controller), as a restart does.

Results: ``benchmarks/results/vllm.json`` and a printed table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ROOT = Path(__file__).resolve().parents[1]
TASKS = {
    "translation": "translation",
    "summarization": "summarization",
    "qa": "qa",
    "math_reasoning": "math_reasoning",
    "rag": "rag",
}
MT_BENCH = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}


def load_prompts(per_task: int) -> list[tuple[str, str]]:
    """(task, first-turn prompt): ``per_task`` from each of Spec-Bench's six tasks, in file order."""
    bundled = ROOT / "adaptk" / "data" / "specbench_subset.jsonl"
    source = bundled if bundled.is_file() else Path("/work/shared/data/specbench/question.jsonl")
    chosen: dict[str, list[str]] = defaultdict(list)
    for line in source.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        category = row.get("category", "")
        task = "mt_bench" if category in MT_BENCH else TASKS.get(category)
        if task and len(chosen[task]) < per_task:
            chosen[task].append(row["turns"][0])
    order = ["mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"]
    return [(task, prompt) for task in order for prompt in chosen.get(task, [])]


def interleave_tasks(tasks_prompts: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The same prompts, one of each task in turn."""
    by_task: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for item in tasks_prompts:
        by_task[item[0]].append(item)
    queues = list(by_task.values())
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def prompts_per_task(count: int, min_per_task: int = 1) -> int:
    """How many prompts of each task :func:`batched_requests` draws for ``count`` requests."""
    return max(min_per_task, -(-count // len(TASKS)))


def batched_requests(count: int, min_per_task: int = 1) -> list[tuple[str, str]]:
    """``count`` (task, prompt) requests for concurrency > 1: :func:`load_prompts`, tasks interleaved."""
    return interleave_tasks(load_prompts(prompts_per_task(count, min_per_task)))[:count]


def other_requests(count: int, skip_per_task: int) -> list[tuple[str, str]]:
    """``count`` (task, prompt) requests, tasks interleaved, none of the first ``skip_per_task`` of
    any task (the prompts :func:`batched_requests` and :func:`load_prompts` use)."""
    per_task = skip_per_task + prompts_per_task(count)
    kept: dict[str, int] = defaultdict(int)
    fresh = []
    for task, prompt in load_prompts(per_task):
        kept[task] += 1
        if kept[task] > skip_per_task:
            fresh.append((task, prompt))
    chosen = interleave_tasks(fresh)[:count]
    if len(chosen) < count:
        raise SystemExit(f"only {len(chosen)} Spec-Bench prompts left beyond the first {skip_per_task} of "
                         f"each task; ask for fewer --resume-requests")
    return chosen


def chat_prompts(tokenizer, tasks_prompts: list[tuple[str, str]]) -> list[str]:
    """:func:`load_prompts`' prompts rendered in the model's chat template, ready for ``LLM.generate``."""
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for _, p in tasks_prompts
    ]


def parse_controllers(text: str, k_max: int) -> tuple[list[tuple[str, dict]], list[str]]:
    """``"adaptk,fixed:4"`` -> [(label, spec)], plus notes for names that are not registered."""
    import adaptk

    specs, notes = [], []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, arg = item.partition(":")
        if name not in adaptk.available():
            notes.append(f"controller {name!r} is not registered in this adaptk; skipped")
            continue
        params: dict = {}
        if name == "fixed":
            params["k"] = min(int(arg or k_max), k_max)
        elif arg:
            notes.append(f"argument {arg!r} of {name!r} ignored (only fixed:K takes one)")
        cls = adaptk.get_class(name)
        if "k_max" in cls._param_names():
            params["k_max"] = k_max
        label = f"fixed K={params['k']}" if name == "fixed" else name
        specs.append((label, {"name": name, "params": params}))
    return specs, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controllers", default="adaptk,smartspec,dsd,fixed:2,fixed:4,fixed:8")
    parser.add_argument("--baselines", default="vllm-table,none", help="any of vllm-table, none")
    parser.add_argument(
        "--vllm-table",
        default="[[1,2,4],[3,4,2],[5,1024,1]]",
        help="vLLM num_speculative_tokens_per_batch_size for the vllm-table baseline (hand-set)",
    )
    parser.add_argument("--k-max", type=int, default=8)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--prompts-per-task", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--prompt-lookup-min", type=int, default=2)
    parser.add_argument("--prompt-lookup-max", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1, help="rounds at concurrency > 1")
    parser.add_argument("--requests-per-slot", type=int, default=4,
                        help="at concurrency N > 1 a round sends at least this many x N requests (more prompts "
                             "per task), so that the engine runs full most of the time, not in a draining tail")
    parser.add_argument("--fresh-controllers", action="store_true",
                        help="a new controller for every run (default: one per configuration and concurrency, "
                             "kept across its runs, as in a server that keeps running)")
    parser.add_argument("--resumed", default="", help="learning controllers to add as 'NAME (resumed)': "
                        "a restart with state_file after serving other prompts")
    parser.add_argument("--resume-requests", type=int, default=32,
                        help="requests of other prompts a resumed controller serves first, per concurrency")
    parser.add_argument("--model", default=None, help="local model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vllm.json"))
    args = parser.parse_args(argv)

    import vllm
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    import adaptk
    from adaptk.adapters import vllm as adapter

    adapter.allow_repeated_inprocess_engines()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    max_seqs = max(concurrencies)
    if args.model:
        model_dir = adapter.model_dir_for_vllm(args.model)
    else:
        from adaptk.decoding.models import fetch_smollm2

        model_dir = adapter.model_dir_for_vllm(fetch_smollm2())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tasks_prompts = load_prompts(args.prompts_per_task)
    prompts = chat_prompts(tokenizer, tasks_prompts)
    # concurrency > 1: tasks interleaved, so every batch mixes them as a server's would
    batched_tasks_prompts = batched_requests(max(len(prompts), args.requests_per_slot * max_seqs),
                                             args.prompts_per_task)
    batched_prompts = chat_prompts(tokenizer, batched_tasks_prompts)
    specs, notes = parse_controllers(args.controllers, args.k_max)
    resumed_specs, resumed_notes = parse_controllers(args.resumed, args.k_max)
    if resumed_specs and args.fresh_controllers:
        parser.error("--resumed keeps what a controller learned; it cannot go with --fresh-controllers")
    specs += [(f"{label} (resumed)", spec) for label, spec in resumed_specs]
    notes += resumed_notes
    timed_per_task = prompts_per_task(len(batched_tasks_prompts), args.prompts_per_task)
    resume_prompts = chat_prompts(tokenizer, other_requests(args.resume_requests, timed_per_task)) \
        if resumed_specs else []
    for note in notes:
        print("note:", note)
    common = dict(
        dtype="float32",
        enforce_eager=True,
        max_model_len=2048,
        seed=0,
        max_num_seqs=max_seqs,
        kv_cache_memory_bytes=512 << 20,
    )
    ngram = {"prompt_lookup_min": args.prompt_lookup_min, "prompt_lookup_max": args.prompt_lookup_max}

    # Every engine is built before anything is timed and none is shut down (in-process engines share
    # vLLM's global state; shutting one down breaks the others).
    engines: dict[str, object] = {}
    t0 = time.perf_counter()
    if specs:
        first = specs[0][1]
        engines["adaptk"] = LLM(
            model_dir, **common, **adapter.engine_kwargs(first, method="ngram", k_max=args.k_max, **ngram)
        )
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    table = json.loads(args.vllm_table)
    if "vllm-table" in baselines:
        spec_config = {
            "method": "ngram",
            "num_speculative_tokens": max(k for *_, k in table),
            "num_speculative_tokens_per_batch_size": table,
            **ngram,
        }
        engines["vllm-table"] = LLM(model_dir, **common, speculative_config=spec_config)
    if "none" in baselines:
        engines["none"] = LLM(model_dir, **common)
    print(f"engines built in {time.perf_counter() - t0:.1f} s")

    configs: list[tuple[str, str, dict | None]] = [(label, "adaptk", spec) for label, spec in specs]
    configs += [(f"vllm table {table}" if b == "vllm-table" else "no speculation", b, None) for b in baselines]
    hook = adapter.scheduler_hook(engines["adaptk"]) if "adaptk" in engines else None

    fallbacks: dict[str, str] = {}

    kept: dict[str, object] = {}  # label -> the controller this configuration keeps across runs

    def run(config, batch: list[str], max_tokens: int = args.max_tokens) -> tuple[int, float]:
        label, engine_name, spec = config
        if spec is not None:
            if args.fresh_controllers:
                hook.set_controller(spec)
            else:
                # priced for packed batches, as engine_kwargs and set_controller do with a spec
                hook.set_controller(kept.setdefault(label, adaptk.from_spec(adapter.price_packed(spec))))
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        outputs = engines[engine_name].generate(batch, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        if spec is not None and hook.fell_back:
            fallbacks[label] = str(hook.reason or hook.guard.error)
        return sum(len(o.outputs[0].token_ids) for o in outputs), elapsed

    def resumed_controller(spec: dict, requests: list[str], concurrency: int):
        """A controller that served ``requests`` at ``concurrency``, then went through a state file."""
        served = adaptk.from_spec(adapter.price_packed(spec))
        hook.set_controller(served)
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        # at concurrency 1 one request at a time; above it the engine's max_num_seqs is the concurrency
        for batch in ([r] for r in requests) if concurrency == 1 else [requests]:
            engines["adaptk"].generate(batch, params, use_tqdm=False)
        restarted = adaptk.from_spec(adapter.price_packed(spec))
        with tempfile.TemporaryDirectory() as folder:  # every request has finished: none is live
            path = Path(folder) / "state.json"
            adapter.save_controller_state(served, path)
            adapter.load_controller_state(restarted, path)
        return restarted

    samples: dict[tuple[str, int], list[tuple[int, float]]] = defaultdict(list)
    t_bench = time.perf_counter()
    for concurrency in concurrencies:
        if concurrency == 1:
            rounds = [[p] for p in prompts]
        else:
            requests = max(len(prompts), args.requests_per_slot * concurrency)
            rounds = [batched_prompts[:requests]] * args.rounds
        # Warm-up, untimed, on every configuration: the first steps at a batch shape are slow (numba
        # compiles the n-gram drafter, the CPU kernels set up per shape), and would be charged to
        # whichever configuration happened to run first.
        for config in configs:
            for batch in rounds[:2] if concurrency == 1 else [rounds[0][: 2 * concurrency]]:
                run(config, batch)
        kept.clear()  # the timed runs start from untrained controllers
        for label, _, spec in configs:
            if label.endswith(" (resumed)"):
                kept[label] = resumed_controller(spec, resume_prompts, concurrency)
        for r, batch in enumerate(rounds):
            order = configs[r % len(configs) :] + configs[: r % len(configs)]
            for config in order:
                samples[(config[0], concurrency)].append(run(config, batch))
            print(
                f"  concurrency {concurrency}: round {r + 1}/{len(rounds)} done "
                f"({time.perf_counter() - t_bench:.0f} s)",
                flush=True,
            )

    rows = []
    for concurrency in concurrencies:
        base = samples.get(("no speculation", concurrency))
        base_rate = sum(t for t, _ in base) / sum(s for _, s in base) if base else None
        for label, _, _ in configs:
            cell = samples[(label, concurrency)]
            tokens, seconds = sum(t for t, _ in cell), sum(s for _, s in cell)
            rate = tokens / seconds
            rows.append(
                {
                    "config": label,
                    "concurrency": concurrency,
                    "tokens": tokens,
                    "seconds": round(seconds, 3),
                    "tok_s": round(rate, 2),
                    "median_tok_s": round(statistics.median(t / s for t, s in cell), 2),
                    "speedup_vs_none": None if base_rate is None else round(rate / base_rate, 3),
                    # run r of every configuration did the same work in the same round: paired ratios
                    "median_paired_speedup_vs_none": None if not base else round(statistics.median(
                        (t / s) / (bt / bs) for (t, s), (bt, bs) in zip(cell, base, strict=True)), 3),
                    "runs": len(cell),
                    "run_tok_s": [round(t / s, 2) for t, s in cell],
                }
            )

    meta = {
        "model": str(model_dir),
        "vllm": vllm.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_avg_at_end": os.getloadavg(),
        "prompts": [{"task": t, "chars": len(p)} for t, p in tasks_prompts],
        "requests_at_concurrency_gt1": [{"task": t, "chars": len(p)} for t, p in batched_tasks_prompts],
        "requests_per_slot": args.requests_per_slot,
        "max_tokens": args.max_tokens,
        "k_max": args.k_max,
        "ngram": ngram,
        "vllm_table": table,
        "concurrency": concurrencies,
        "rounds_at_concurrency_gt1": args.rounds,
        "controllers_kept_across_runs": not args.fresh_controllers,
        "notes": notes,
        "fell_back_to_fixed_k": fallbacks,
        "bench_seconds": round(time.perf_counter() - t_bench, 1),
        "specs": {label: adapter.price_packed(spec) for label, _, spec in configs if spec is not None},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = ".venv-vllm/bin/python benchmarks/bench_vllm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out.write_text(json.dumps({"command": command, "meta": meta, "results": rows}, indent=2) + "\n")

    print(
        f"\nSmolLM2-135M + vLLM {vllm.__version__} ngram, {len(prompts)} Spec-Bench prompts at c=1 "
        f"(at c>1: {args.requests_per_slot} requests per slot, tasks interleaved), "
        f"{args.max_tokens} new tokens, greedy (load avg at end {os.getloadavg()[0]:.1f})"
    )
    print("tok/s = all tokens / all seconds; x none = median over rounds of the run's speedup over the same round's")
    print("run without speculation (rounds at concurrency 1: one prompt each)")
    header = f"{'configuration':<34}" + "".join(f"{f'c={c} tok/s':>14}{'x none':>8}" for c in concurrencies)
    print(header)
    print("-" * len(header))
    for label, _, _ in configs:
        line = f"{label:<34}"
        for c in concurrencies:
            row = next(r for r in rows if r["config"] == label and r["concurrency"] == c)
            speed = "" if row["median_paired_speedup_vs_none"] is None else f"{row['median_paired_speedup_vs_none']:.3f}"
            line += f"{row['tok_s']:>14.1f}{speed:>8}"
        print(line)
    for label, error in fallbacks.items():
        print(f"WARNING: {label} fell back to a fixed K: {error}")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
