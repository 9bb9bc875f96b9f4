"""Record greedy speculation traces (``adaptk record``) from a real model.

Under greedy verification the target's output does not depend on the draft length, so one greedy
generation per prompt, one teacher-forced forward and some array arithmetic give the match length
``m_t`` for every output position ``t`` and every deterministic drafter at once (design.md §5).
No speculative decoding is run; nothing here is an approximation.

Procedure per prompt:

1. Greedy generation (chat template applied to the first turn, stop at EOS). Generation is batched
   with left padding for speed; padding changes matmul shapes and can flip a near-tie argmax, so
2. one teacher-forced forward over prompt + output (batch 1, no padding) checks that the model's
   argmax equals the generated token at every position. At the first mismatch the output is
   regenerated at batch 1 from that point; if a mismatch remains, the output is truncated there.
   Both counts go into the trace set's ``meta``. The same forward returns every layer's hidden
   states.
3. Prompt lookup: :func:`adaptk.ngram.propose_all` gives the proposal at every ``t``; ``m_t`` is
   how many of its tokens equal the output from ``t`` on.
4. Early exit at layer ``L``: the shadow logits ``lm_head(norm(h_L))`` predict output token ``t``
   from the true prefix. While drafts are accepted the drafter's prefix *is* the true prefix, and
   layers below ``L`` see exactly the full model's inputs, so ``m_t`` is the run of consecutive
   agreements starting at ``t``.

``m_t`` is capped at ``k_max`` and at ``output_len - 1 - t`` (accepting ``m`` drafts plus the
bonus token must not run past the recorded output; step counts are unchanged by this cap).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adaptk.ngram import propose_all
from adaptk.sim.trace import Trace, TraceSet

__all__ = [
    "DEFAULT_PROMPTS",
    "Prompt",
    "Recording",
    "load_prompts",
    "match_lengths",
    "record",
    "record_main",
    "run_lengths",
]

DEFAULT_PROMPTS = Path(__file__).parent / "data" / "specbench_subset.jsonl"
SPEC_BENCH_TASKS = ("translation", "summarization", "qa", "math_reasoning", "rag")
DRAFTERS = ("prompt_lookup", "early_exit")


@dataclass(frozen=True)
class Prompt:
    """A prompt ready for the model: its ids already include any chat template."""

    prompt_id: str
    category: str
    input_ids: tuple[int, ...]


@dataclass
class Recording:
    """One prompt's verified greedy output and what the teacher-forced forward says about it."""

    prompt: Prompt
    output: np.ndarray  # int64 (n_out,)
    layer_argmax: np.ndarray  # int64 (n_out, num_layers): shadow top-1 of every layer at each t
    signals: dict[int, dict[str, np.ndarray]]  # exit layer -> draft_prob / draft_entropy / kl, (n_out,)


# -- prompts -------------------------------------------------------------------------------------


def task_of(category: str) -> str:
    """Spec-Bench's task for a question category (the MT-bench categories form ``mt_bench``)."""
    return category if category in SPEC_BENCH_TASKS else "mt_bench"


def load_prompts(
    tokenizer: PreTrainedTokenizerBase, path: str | Path = DEFAULT_PROMPTS, per_task: int | None = None
) -> list[Prompt]:
    """Read Spec-Bench rows and apply the chat template to each first turn.

    ``per_task`` keeps the first N rows of each task, in file order.
    """
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    seen: dict[str, int] = defaultdict(int)
    prompts = []
    for row in rows:
        task = task_of(row["category"])
        if per_task is not None and seen[task] >= per_task:
            continue
        seen[task] += 1
        messages = [{"role": "user", "content": row["turns"][0]}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        prompts.append(Prompt(str(row["question_id"]), task, tuple(int(i) for i in ids["input_ids"])))
    return prompts


# -- pure arithmetic on recorded arrays ----------------------------------------------------------


def run_lengths(agree: np.ndarray) -> np.ndarray:
    """For a bool array ``a``, the number of consecutive ``True`` starting at each index.

    >>> run_lengths(np.array([True, True, False, True])).tolist()
    [2, 1, 0, 1]
    """
    agree = np.asarray(agree, dtype=bool)
    n = agree.shape[-1]
    idx = np.arange(n)
    # index of the first False at or after i (n if none), via a reversed running minimum
    stops = np.where(agree, n, idx)
    next_false = np.minimum.accumulate(stops[..., ::-1], axis=-1)[..., ::-1]
    return next_false - idx


def cap_match(m: np.ndarray, k_max: int) -> np.ndarray:
    """Cap match lengths at ``k_max`` and at ``n_out - 1 - t`` (see the module docstring)."""
    n = m.shape[-1]
    room = np.arange(n - 1, -1, -1)
    return np.minimum(np.minimum(m, k_max), room).astype(np.uint8)


def match_lengths(drafts: np.ndarray, avail: np.ndarray, output: np.ndarray, k_max: int) -> np.ndarray:
    """How many leading tokens of each row's proposal equal the output from ``t`` on (capped).

    >>> match_lengths(np.array([[7, 8], [5, -1], [-1, -1]]), np.array([2, 1, 0]), np.array([7, 8, 9]), 4).tolist()
    [2, 0, 0]
    """
    n = output.shape[0]
    width = drafts.shape[1]
    pos = np.arange(n)[:, None] + np.arange(width)[None, :]
    target = np.where(pos < n, output[np.minimum(pos, max(n - 1, 0))], -2) if n else np.zeros((0, width), int)
    hit = (drafts == target) & (np.arange(width)[None, :] < np.asarray(avail)[:, None])
    m = np.cumprod(hit, axis=1).sum(axis=1)
    return cap_match(m, k_max)


# -- model work ----------------------------------------------------------------------------------


def _generate(
    model: PreTrainedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int | None, pad_id: int
) -> list[np.ndarray]:
    """Greedy outputs for a batch of prompts (left padded), each cut after its first EOS."""
    if max_new_tokens <= 0:
        return [np.zeros(0, dtype=np.int64) for _ in prompts]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    results = []
    for row in out[:, width:].numpy():
        if eos_id is not None:
            stops = np.flatnonzero(row == eos_id)
            if stops.size:
                row = row[: stops[0] + 1]
        results.append(row.astype(np.int64))
    return results


def _teacher_force(model: PreTrainedModel, prompt: Sequence[int], output: np.ndarray) -> tuple[np.ndarray, tuple[torch.Tensor, ...]]:
    """Full-model argmax at every output position, and all hidden states at those positions."""
    ids = torch.tensor([list(prompt) + output.tolist()], dtype=torch.long)
    res = model(input_ids=ids, output_hidden_states=True, use_cache=False, logits_to_keep=len(output) + 1)
    # logits row j predicts token j+1 of the kept tail; the last row predicts past the end
    argmax = res.logits[0, :-1].argmax(-1).numpy() if len(output) else np.zeros(0, dtype=np.int64)
    start = len(prompt) - 1
    hidden = tuple(h[0, start : start + len(output)] for h in res.hidden_states)
    return argmax, hidden


def _verified_output(
    model: PreTrainedModel, prompt: Prompt, output: np.ndarray, max_new_tokens: int, eos_id: int | None, pad_id: int, notes: dict
) -> tuple[np.ndarray, tuple[torch.Tensor, ...]]:
    """Make the output agree with teacher forcing: regenerate once at batch 1, then truncate."""
    for attempt in range(2):
        argmax, hidden = _teacher_force(model, prompt.input_ids, output)
        bad = np.flatnonzero(argmax != output)
        if not bad.size:
            return output, hidden
        j = int(bad[0])
        if attempt == 0:
            notes["regenerated"].append(prompt.prompt_id)
            head = list(prompt.input_ids) + output[:j].tolist()
            tail = _generate(model, [head], max_new_tokens - j, eos_id, pad_id)[0]
            output = np.concatenate([output[:j], tail])
        else:
            notes["truncated"].append([prompt.prompt_id, j])
            output = output[:j]
    argmax, hidden = _teacher_force(model, prompt.input_ids, output)
    return output, hidden


def _shadow_logits(model: PreTrainedModel, hidden: tuple[torch.Tensor, ...], layer: int) -> torch.Tensor:
    """Logits of the early exit after ``layer`` decoder layers (the last hidden state is already normed)."""
    h = hidden[layer]
    if layer < len(hidden) - 1:
        h = model.model.norm(h)
    return model.get_output_embeddings()(h).float()


def _layer_signals(
    model: PreTrainedModel, hidden: tuple[torch.Tensor, ...], exit_layers: Sequence[int]
) -> tuple[np.ndarray, dict[int, dict[str, np.ndarray]]]:
    """Top-1 of every layer's shadow head, plus confidence, entropy and KL for the exit layers.

    One layer at a time: the full-vocabulary logits of all layers at once would not fit comfortably.
    """
    num_layers = len(hidden) - 1
    n = hidden[0].shape[0]
    top = np.zeros((n, num_layers), dtype=np.int64)
    target_p = torch.softmax(_shadow_logits(model, hidden, num_layers), dim=-1)
    target_logp = torch.log(target_p.clamp_min(1e-8))
    signals: dict[int, dict[str, np.ndarray]] = {}
    for layer in range(1, num_layers + 1):
        logits = _shadow_logits(model, hidden, layer)
        top[:, layer - 1] = logits.argmax(-1).numpy()
        if layer in exit_layers:
            q = torch.softmax(logits, dim=-1)
            logq = torch.log(q.clamp_min(1e-8))
            signals[layer] = {
                "draft_prob": q.max(-1).values.numpy(),
                "draft_entropy": (-(q * logq).sum(-1)).numpy(),
                "kl": (target_p * (target_logp - logq)).sum(-1).clamp_min(0).numpy(),
            }
    return top, signals


def record(
    model: PreTrainedModel,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 256,
    exit_layers: Sequence[int] = (6, 12, 18, 24),
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    batch_size: int = 8,
    log: Any = None,
) -> tuple[list[Recording], dict[str, Any]]:
    """Generate, verify and teacher-force every prompt; the drafter-independent part of recording.

    Returns the recordings and notes (timings, regenerated / truncated prompts) for ``meta``.
    """
    num_layers = int(model.config.num_hidden_layers)
    for layer in exit_layers:
        if not 1 <= layer < num_layers:
            raise ValueError(f"exit layer {layer} outside [1, {num_layers - 1}]")
    pad_id = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    notes: dict[str, Any] = {"regenerated": [], "truncated": []}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].input_ids))  # less padding per batch
    outputs: dict[int, np.ndarray] = {}
    started = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, len(order), batch_size):
            chunk = order[lo : lo + batch_size]
            batch_out = _generate(model, [prompts[i].input_ids for i in chunk], max_new_tokens, eos_token_id, pad_id)
            outputs.update(zip(chunk, batch_out, strict=True))
            if log:
                log(f"generated {min(lo + batch_size, len(order))}/{len(order)} prompts ({time.perf_counter() - started:.0f} s)")
        notes["generate_s"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        recordings = []
        for i, prompt in enumerate(prompts):
            output, hidden = _verified_output(model, prompt, outputs[i], max_new_tokens, eos_token_id, pad_id, notes)
            top, signals = _layer_signals(model, hidden, exit_layers)
            recordings.append(Recording(prompt, output, top, signals))
            if log and (i + 1) % 10 == 0:
                log(f"teacher-forced {i + 1}/{len(prompts)} prompts ({time.perf_counter() - started:.0f} s)")
        notes["teacher_force_s"] = round(time.perf_counter() - started, 1)
    notes["generated_tokens"] = int(sum(len(r.output) for r in recordings))
    return recordings, notes


def prompt_lookup_traces(
    recordings: Sequence[Recording], k_max: int, max_ngram: int = 3, min_ngram: int = 1
) -> list[Trace]:
    """Prompt-lookup traces: proposals from :func:`propose_all`, matched against the output."""
    traces = []
    for rec in recordings:
        tokens = np.concatenate([np.asarray(rec.prompt.input_ids, dtype=np.int64), rec.output])
        avail, ngram_len, drafts = propose_all(tokens, len(rec.prompt.input_ids), max_ngram, min_ngram, k_max)
        traces.append(
            Trace(
                prompt_id=rec.prompt.prompt_id,
                category=rec.prompt.category,
                prompt_len=len(rec.prompt.input_ids),
                match_len=match_lengths(drafts, avail, rec.output, k_max),
                draft_avail=avail,
                ngram_len=ngram_len,
            )
        )
    return traces


def _signal_rows(rec: Recording, exit_layers: Sequence[int], name: str) -> np.ndarray:
    return np.stack([rec.signals[layer][name] for layer in exit_layers])


def early_exit_traces(recordings: Sequence[Recording], exit_layers: Sequence[int], k_max: int) -> list[Trace]:
    """Early-exit traces: one variant per exit layer, plus every layer's agreement bits."""
    traces = []
    for rec in recordings:
        agree = rec.layer_argmax == rec.output[:, None]  # (n_out, num_layers)
        match = np.stack([cap_match(run_lengths(agree[:, layer - 1]), k_max) for layer in exit_layers])

        traces.append(
            Trace(
                prompt_id=rec.prompt.prompt_id,
                category=rec.prompt.category,
                prompt_len=len(rec.prompt.input_ids),
                match_len=match,
                draft_prob=_signal_rows(rec, exit_layers, "draft_prob"),
                draft_entropy=_signal_rows(rec, exit_layers, "draft_entropy"),
                kl=_signal_rows(rec, exit_layers, "kl"),
                layer_agree=agree,
            )
        )
    return traces


# -- command line --------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adaptk record", description="Record greedy speculation traces from a real model.")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model name or local Hugging Face directory")
    p.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="Spec-Bench style jsonl (default: bundled subset)")
    p.add_argument("--per-task", type=int, default=None, help="first N prompts of each task (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--k-max", type=int, default=16)
    p.add_argument("--drafter", default="prompt_lookup",
                   help="prompt_lookup, early_exit, or both comma-separated (one generation pass serves both)")
    p.add_argument("--layers", default="6,12,18,24", help="early-exit layers (comma list)")
    p.add_argument("--max-ngram", type=int, default=3)
    p.add_argument("--min-ngram", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8, help="generation batch (outputs are verified at batch 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--out", required=True,
                   help="output .npz; with several drafters it must contain {drafter} (filled as e.g. prompt-lookup)")
    return p


def record_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``adaptk record``; returns a process exit code."""
    args = _parser().parse_args(argv)
    drafters = [d.strip() for d in args.drafter.split(",") if d.strip()]
    unknown = [d for d in drafters if d not in DRAFTERS]
    if unknown or not drafters:
        raise SystemExit(f"--drafter: unknown {unknown or drafters}; choose from {', '.join(DRAFTERS)}")
    if len(drafters) > 1 and "{drafter}" not in args.out:
        raise SystemExit("--out must contain {drafter} when recording several drafters")
    if not 1 <= args.k_max <= 255:
        raise SystemExit("--k-max must lie in [1, 255]")
    layers = [int(x) for x in args.layers.split(",")] if "early_exit" in drafters else []

    from adaptk.decoding.models import load_model  # torch/transformers only when recording

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    model, tokenizer = load_model(args.model, num_threads=args.threads)
    prompts = load_prompts(tokenizer, args.prompts, args.per_task)
    eos = tokenizer.eos_token_id
    started = time.perf_counter()
    recordings, notes = record(
        model, prompts, max_new_tokens=args.max_new_tokens, exit_layers=layers,
        eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, batch_size=args.batch_size, log=log,
    )
    meta: dict[str, Any] = {
        "command": "adaptk record " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "prompts_file": Path(args.prompts).name,
        "prompts_sha256": hashlib.sha256(Path(args.prompts).read_bytes()).hexdigest(),
        "chat_template": "first turn as a user message, add_generation_prompt=True",
        "decoding": "greedy",
        "max_new_tokens": args.max_new_tokens,
        "eos_token_id": eos,
        "match_len_cap": "min(k_max, output_len - 1 - t)",
        "software": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        **notes,
    }
    num_layers = int(model.config.num_hidden_layers)
    model_name = str(args.model)
    for drafter in drafters:
        if drafter == "prompt_lookup":
            traces = prompt_lookup_traces(recordings, args.k_max, args.max_ngram, args.min_ngram)
            extra = {"max_ngram": args.max_ngram, "min_ngram": args.min_ngram}
            variants: list[int | None] = [None]
        else:
            traces = early_exit_traces(recordings, layers, args.k_max)
            extra = {"exit_layers": layers, "layer_agree": "bit l = layer l+1's shadow top-1 equals the target token"}
            variants = list(layers)
        trace_set = TraceSet(traces, drafter, args.k_max, variants, num_layers, model_name, {**meta, **extra})
        out = Path(args.out.format(drafter=drafter.replace("_", "-")))
        trace_set.save(out)
        mean_m = float(np.mean(np.concatenate([t.match_len for t in traces], axis=1), axis=1).mean()) if traces else 0.0
        log(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB, {len(traces)} traces, mean m_t {mean_m:.2f})")
    log(f"recorded {notes['generated_tokens']} tokens in {time.perf_counter() - started:.0f} s "
        f"(generate {notes['generate_s']} s, teacher-force {notes['teacher_force_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(record_main())
