"""`adaptk bench --engine reference`: controllers on real decoding, beside their exact-replay prediction.

Every controller decodes the same Spec-Bench prompts (first turn, chat template) with the real
SmolLM2-135M through :class:`~adaptk.decoding.SpeculativeDecoder`, at each batch size
(concurrency). Rows report the measured ``token_goodput`` (generated tokens per wall second,
prefill included) next to ``predicted_token_goodput``: an exact replay of the same controller on the
recorded traces of the same prompts under the measured CPU latency profile. Plain decoding
(``fixed(k=0)``) always runs too, so every row can be read relative to it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from adaptk.bench.runner import build_controller, bundled_trace_paths, spec_label

__all__ = ["run_reference_bench", "REFERENCE_SUITES"]

#: per_task: prompts per Spec-Bench task; max_new_tokens per request; by_task: one workload per
#: task (the speedup of each task) instead of all tasks mixed in one run.
REFERENCE_SUITES = {
    "quick": {"per_task": 1, "max_new_tokens": 64, "k_max": 8, "by_task": False},
    "standard": {"per_task": 3, "max_new_tokens": 128, "k_max": 8, "by_task": False},
    "tasks": {"per_task": 8, "max_new_tokens": 96, "k_max": 16, "by_task": True},
}
PLAIN = {"name": "fixed", "params": {"k": 0}}
LATENCY_PROFILE = "smollm2-135m-cpu"


def _predicted(traces, prompt_ids, max_new_tokens, spec, drafter, batch_size):
    """Exact replay of ``spec`` on the recorded traces of these prompts, cut at ``max_new_tokens``."""
    if traces is None:
        return None
    from adaptk.estimators.latency import get_latency_model
    from adaptk.sim.replay import replay
    from adaptk.sim.trace import Trace, TraceSet

    known = {t.prompt_id: t for t in traces}
    if not all(p in known for p in prompt_ids):
        return None
    cut = []
    for pid in prompt_ids:
        t = known[pid]
        n = min(t.output_len, max_new_tokens)
        # the decoder never drafts past the budget: cap m_t at the tokens left after t's own token
        match = np.minimum(t.match_len[:, :n], np.maximum(n - 1 - np.arange(n), 0)[None, :])
        fields = {f: (None if getattr(t, f) is None else getattr(t, f)[:, :n])
                  for f in ("draft_avail", "ngram_len", "draft_prob", "draft_entropy", "kl")}
        agree = None if t.layer_agree is None else t.layer_agree[:n]
        cut.append(Trace(t.prompt_id, t.category, t.prompt_len, match, layer_agree=agree, **fields))
    subset = TraceSet(cut, traces.drafter, traces.k_max, list(traces.variants), traces.num_layers, traces.model,
                      dict(traces.meta))
    layer = traces.variants[-1]
    latency = get_latency_model(LATENCY_PROFILE, drafter=drafter, **({"exit_layer": layer} if layer else {}))
    controller = build_controller(spec, LATENCY_PROFILE, drafter, layer)
    result = replay(controller, subset, latency, batch_size, num_requests=len(cut))
    return result


def _load_traces(drafter: str):
    from adaptk.sim.trace import TraceSet

    path = bundled_trace_paths().get(f"smollm2-{drafter.replace('_', '-')}")
    return None if path is None else TraceSet.load(path)


def run_reference_bench(
    controllers: list[Any],
    batch_sizes: list[int],
    drafter: str = "prompt_lookup",
    suite: str = "quick",
    out_dir: str | Path | None = None,
    *,
    model: str = "smollm2-135m-instruct",
    num_threads: int | None = None,
    per_task: int | None = None,
    max_new_tokens: int | None = None,
    log=lambda msg: print(msg, flush=True),
) -> list[dict[str, Any]]:
    """Decode Spec-Bench prompts for real with every controller at every batch size.

    ``controllers`` are registry specs (names or ``{"name", "params"}``); plain decoding is added.
    ``drafter`` is ``"prompt_lookup"`` or ``"early_exit"``. Returns one row per controller × batch
    size (and task, for the ``tasks`` suite) with ``engine="reference"``,
    ``cost_profile="measured"``, and writes ``reference.json`` to ``out_dir`` when given.
    ``per_task`` and ``max_new_tokens`` override the suite's.
    """
    import torch

    from adaptk.decoding import EarlyExitDrafter, PromptLookupDrafter, SpeculativeDecoder
    from adaptk.decoding.models import load_model
    from adaptk.record import load_prompts

    if suite not in REFERENCE_SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose from {sorted(REFERENCE_SUITES)}")
    if drafter not in ("prompt_lookup", "early_exit"):
        raise ValueError(f"drafter must be 'prompt_lookup' or 'early_exit', got {drafter!r}")
    cfg = dict(REFERENCE_SUITES[suite])
    for key, value in (("per_task", per_task), ("max_new_tokens", max_new_tokens)):
        if value is not None:
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
            cfg[key] = value
    target, tokenizer = load_model(model, num_threads=num_threads)
    prompts = load_prompts(tokenizer, per_task=cfg["per_task"])
    workload = f"smollm2-{drafter.replace('_', '-')}"
    if cfg["by_task"]:
        groups = {f"{workload}/{task}": [p for p in prompts if p.category == task]
                  for task in dict.fromkeys(p.category for p in prompts)}
    else:
        groups = {f"{workload}/{suite}": prompts}
    traces = _load_traces(drafter)
    specs = [PLAIN] + [c for c in controllers if spec_label(c) != spec_label(PLAIN)]

    def make_drafter():
        if drafter == "prompt_lookup":
            return PromptLookupDrafter()
        layers = tuple(traces.variants) if traces is not None and traces.variants[0] is not None else None
        return EarlyExitDrafter(exit_layers=layers)

    warm = SpeculativeDecoder(target, drafter=make_drafter(), controller=PLAIN, k_max=cfg["k_max"])
    warm.generate([list(prompts[0].input_ids)], max_new_tokens=4)  # first-call allocations out of the timings
    rows = []
    for batch_size, (name, group) in ((b, g) for b in batch_sizes for g in groups.items()):
        ids = [list(p.input_ids) for p in group]
        plain_goodput = None
        for spec in specs:
            layer = traces.variants[-1] if traces is not None else None
            controller = build_controller(spec, LATENCY_PROFILE, drafter, layer)
            decoder = SpeculativeDecoder(target, drafter=make_drafter(), controller=controller, k_max=cfg["k_max"])
            started = time.perf_counter()
            result = decoder.generate(ids, max_new_tokens=cfg["max_new_tokens"], concurrency=batch_size)
            wall = time.perf_counter() - started
            predicted = _predicted(traces, [p.prompt_id for p in group], cfg["max_new_tokens"], spec, drafter,
                                   batch_size)
            latencies = np.array([r.latency_s for r in result])
            label = spec_label(spec)
            plain_goodput = result.token_goodput if spec is PLAIN else plain_goodput
            rows.append({
                "engine": "reference",
                "controller": label,
                "workload": name,
                "drafter": drafter,
                "batch_size": batch_size,
                "cost_profile": "measured",
                "token_goodput": result.token_goodput,
                "predicted_token_goodput": None if predicted is None else predicted.token_goodput,
                "mean_acceptance_length": result.mean_acceptance_length,
                "predicted_mean_acceptance_length": None if predicted is None else predicted.mean_acceptance_length,
                "relative_to_plain": result.token_goodput / plain_goodput,
                "latency_mean_s": float(latencies.mean()),
                "latency_p50_s": float(np.median(latencies)),
                "num_requests": len(ids),
                "num_tokens": result.num_tokens,
                "num_steps": len(result.steps),
                "mean_num_draft_tokens": float(np.mean([s.num_draft_tokens / s.batch_size for s in result.steps])),
                "overhead_fraction": result.overhead_fraction,
                "controller_failed": result.controller_failed,
                "wall_s": wall,
                "torch_threads": torch.get_num_threads(),
            })
            r = rows[-1]
            log(f"reference {name.split('/')[-1]:<14} b={batch_size:<3} {label:<28} {r['token_goodput']:7.1f} tok/s  "
                f"x{r['relative_to_plain']:.2f} plain  acc.len {r['mean_acceptance_length']:.2f}"
                + ("" if predicted is None else f"  (replay {r['predicted_token_goodput']:.1f} tok/s)"))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "reference.json").write_text(json.dumps(rows, indent=1))
    return rows
