"""Adaptive vs constant speculation inside Hugging Face ``generate``: SmolLM2-135M + prompt lookup.

Side by side in one run, interleaved (every repetition runs every configuration on every prompt,
in a rotating order), batch 1, greedy:

- ``plain``: ``model.generate`` without speculation;
- ``hf-k3``, ``hf-k10``: HF prompt lookup with a constant ``prompt_lookup_num_tokens``;
- ``hf-heuristic``: HF's ``heuristic`` schedule (+2 after a fully accepted draft, -1 otherwise).
  HF applies that schedule to assistant models only (prompt lookup's length is constant in HF),
  so it runs here as adaptk's exact re-implementation, ``hf-heuristic`` (HF's initial 20, capped
  at ``k_max``), through :mod:`adaptk.adapters.hf`;
- one column per adaptk controller given with ``--controllers`` (default: ``adaptk`` if
  registered, ``hf-heuristic``, ``fixed``), through :mod:`adaptk.adapters.hf` with ``k_max``.

Prompts: the bundled Spec-Bench subset (``adaptk/data/specbench_subset.jsonl``; all 6 tasks),
``--per-task`` prompts per task. Tokens/s per task = new tokens / generate wall time summed over
the task's prompts, per repetition; the table reports the median over repetitions. Every greedy
output is checked against plain decoding (``mismatches`` in the JSON).

Run: ``nice python benchmarks/bench_hf.py`` (writes ``benchmarks/results/hf.json`` and ``hf.md``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

import adaptk
import adaptk.adapters.hf as ahf
from adaptk.decoding.models import load_model
from adaptk.record import load_prompts

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "adaptk" / "data" / "specbench_subset.jsonl"
FALLBACK = ROOT.parent / "shared" / "data" / "specbench" / "question.jsonl"
BASELINES = ("plain", "hf-k3", "hf-k10", "hf-heuristic")


def _default_controllers() -> list[str]:
    names = ["adaptk"] if "adaptk" in adaptk.available() else []
    return names + ["hf-heuristic", "fixed"]


def _run(model, ids, config: str, controllers: dict, args) -> tuple[torch.Tensor, float, list]:
    """One generate call; returns (new tokens, seconds, feedback)."""
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                  do_sample=False)
    feedback: list = []
    start = time.perf_counter()
    if config == "plain":
        out = model.generate(**kwargs)
    elif config.startswith("hf-k"):
        out = model.generate(**kwargs, prompt_lookup_num_tokens=int(config[4:]))
    else:
        with ahf.speculate(model, controllers[config], k_max=args.k_max) as session:
            out = model.generate(**kwargs, prompt_lookup_num_tokens=args.k_max)
        feedback = session.feedback
    seconds = time.perf_counter() - start
    return out[0, ids.shape[1]:], seconds, feedback


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--controllers", nargs="*", default=None, help="adaptk registry names or JSON specs")
    parser.add_argument("--per-task", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--k-max", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=Path, default=BUNDLED if BUNDLED.exists() else FALLBACK)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "hf.json")
    args = parser.parse_args(argv)

    model, tokenizer = load_model("smollm2-135m-instruct", num_threads=args.threads)
    prompts = load_prompts(tokenizer, args.prompts, per_task=args.per_task)
    specs = args.controllers if args.controllers is not None else _default_controllers()
    adaptive = {spec if isinstance(spec, str) else json.dumps(spec): spec for spec in specs}
    configs = list(BASELINES) + [name for name in adaptive if name not in BASELINES]
    make = {name: (lambda s=spec: adaptk.from_spec(s)) for name, spec in adaptive.items()}
    make["hf-heuristic"] = lambda: adaptk.make("hf-heuristic", initial_k=20)

    tokens = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))  # rep -> config -> task -> n
    seconds = defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
    steps = defaultdict(int)
    accepted = defaultdict(int)
    mismatches = defaultdict(int)
    reference: dict[str, list[int]] = {}
    with torch.inference_mode():
        warm = torch.tensor([prompts[0].input_ids])
        model.generate(input_ids=warm, attention_mask=torch.ones_like(warm), max_new_tokens=8, do_sample=False)
        for rep in range(args.reps):
            controllers = {name: make[name]() for name in configs if name in make}  # fresh per repetition
            for p_index, prompt in enumerate(prompts):
                ids = torch.tensor([prompt.input_ids])
                shift = (rep + p_index) % len(configs)
                for config in configs[shift:] + configs[:shift]:
                    new, took, feedback = _run(model, ids, config, controllers, args)
                    new = new.tolist()
                    if config == "plain" and prompt.prompt_id not in reference:
                        reference[prompt.prompt_id] = new
                    tokens[rep][config][prompt.category] += len(new)
                    seconds[rep][config][prompt.category] += took
                    if feedback:
                        steps[config] += len(feedback)
                        accepted[config] += sum(int(f.num_accepted_tokens[0]) for f in feedback)
                    if config != "plain" and prompt.prompt_id in reference and new != reference[prompt.prompt_id]:
                        mismatches[config] += 1
            print(f"rep {rep + 1}/{args.reps} done", flush=True)

    tasks = sorted({p.category for p in prompts})

    def rate(config: str, task: str | None) -> float:
        per_rep = []
        for rep in range(args.reps):
            chosen = tasks if task is None else [task]
            n = sum(tokens[rep][config][t] for t in chosen)
            s = sum(seconds[rep][config][t] for t in chosen)
            per_rep.append(n / s)
        return statistics.median(per_rep)

    table = {task: {c: rate(c, task) for c in configs} for task in tasks}
    overall = {c: rate(c, None) for c in configs}
    result = {
        "meta": {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.platform(), "processor": platform.processor(), "torch_threads": args.threads,
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "model": "smollm2-135m-instruct", "drafter": "prompt lookup (HF PromptLookupCandidateGenerator)",
            "prompts": str(args.prompts.relative_to(ROOT) if args.prompts.is_relative_to(ROOT) else args.prompts),
            "per_task": args.per_task, "max_new_tokens": args.max_new_tokens, "reps": args.reps,
            "k_max": args.k_max, "batch_size": 1, "decoding": "greedy",
            "statistic": "median over repetitions of (new tokens / generate seconds), per task and overall",
        },
        "configs": configs,
        "tokens_per_s": table,
        "overall_tokens_per_s": overall,
        "speedup_vs_plain": {c: overall[c] / overall["plain"] for c in configs},
        "mean_acceptance_length": {c: (accepted[c] + steps[c]) / steps[c] for c in configs if steps[c]},
        "mismatches_vs_plain": {c: mismatches[c] for c in configs if c != "plain"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    lines = ["| task | " + " | ".join(configs) + " |", "|---|" + "---|" * len(configs)]
    for task in tasks:
        lines.append(f"| {task} | " + " | ".join(f"{table[task][c]:.1f}" for c in configs) + " |")
    lines.append("| **overall** | " + " | ".join(f"**{overall[c]:.1f}**" for c in configs) + " |")
    lines.append("| ×plain | " + " | ".join(f"{overall[c] / overall['plain']:.2f}" for c in configs) + " |")
    text = (f"Tokens/s, SmolLM2-135M-Instruct, prompt lookup, batch 1, greedy, {args.max_new_tokens} new tokens, "
            f"{args.per_task} prompts/task, median of {args.reps} interleaved reps, {args.threads} threads\n\n"
            + "\n".join(lines) + "\n")
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
