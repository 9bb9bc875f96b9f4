"""Measure SmolLM2-135M's step costs on this CPU and write an adaptk latency profile (JSON).

Speculation pays only if verifying ``n`` tokens per sequence costs little more than one token, and
that depends on batch size, context length and hardware in ways no formula captures (the measured
curve has steps and is not monotone). Controllers and the replay simulator therefore read a table
of *measured* costs. This script produces it:

- ``verify``: one forward of ``n`` new tokens per sequence on top of ``ctx`` cached positions,
  through the reference decoder's own forward (position-indexed cache, masked path, logits for
  all new tokens), so that replay predicts what ``adaptk bench --engine reference`` measures;
- ``draft_per_token.early_exit``: one drafted token with the first ``L`` layers + final norm +
  LM head over the cache;
- ``draft_per_token.prompt_lookup``: one prompt-lookup proposal per sequence (numpy), summed over
  the batch;
- ``prefill``: one prompt's forward at batch 1 (the decoder prefills each joining request alone).

The decoder's forward keeps freed memory in the heap (``adaptk.decoding.allocator``), and so does
this script, through ``load_model``: without it a big forward page-faults its temporaries in again
every time, and the profile would time that.

Every cell is the median over its repetitions, timed as the machine runs (``--no-gate``): replay
reads this profile to predict what real decoding measures, and real decoding on this shared VM runs
5-15% slower than the best case, run after run. ``--statistic min`` (with the quiet gate) records the
best case instead: the least noisy estimate of what the hardware can do. Token contents are random;
cost does not depend on them.

Run: ``python benchmarks/profile_cpu.py --no-gate --big-batch-tokens 1,2,3,4,6,8,12,17``
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from adaptk.decoding.kv import ModelRunner
from adaptk.decoding.models import load_model
from adaptk.ngram import propose

BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64]
TOKENS_PER_SEQ = [1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 17]
CONTEXT_LENS = [128, 512, 1024, 2048]
EXIT_LAYERS = [6, 12, 18, 24]
EXIT_BATCHES = [1, 8]
LOOKUP_BATCHES = [1, 8, 64]
PREFILL_TOKENS = [32, 64, 128, 256, 512, 1024, 2048]


def cpu_model() -> str:
    """The CPU's marketing name, for the profile's ``hardware`` field."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class QuietGate:
    """Wait until the machine looks quiet before timing anything.

    With 2 torch threads on 2 cores, any other busy process makes one thread wait for the other at
    every operator: a 30 ms step becomes 300 ms or more, for as long as the other process runs, so
    the minimum over back-to-back repetitions does not help. The gate times a fixed reference step
    and lets a measurement start only when that step runs within ``factor`` of its best time
    (giving up after ``max_wait_s`` and counting the measurement as possibly disturbed).
    """

    def __init__(self, reference: Callable[[], None], factor: float = 1.25, max_wait_s: float = 30.0) -> None:
        self.reference = reference
        self.factor = factor
        self.max_wait_s = max_wait_s
        self.best = float("inf")
        self.disturbed = 0
        for _ in range(5):
            self._time_reference()

    def _time_reference(self) -> float:
        start = time.perf_counter()
        self.reference()
        elapsed = time.perf_counter() - start
        self.best = min(self.best, elapsed)
        return elapsed

    def wait(self) -> None:
        deadline = time.perf_counter() + self.max_wait_s
        while self._time_reference() > self.factor * self.best:
            if time.perf_counter() > deadline:
                self.disturbed += 1
                return
            time.sleep(0.2)


GATE: QuietGate | None = None
#: How a cell's repeated timings become one number: "median" (what a run sees on this machine, the
#: default, so that replay predicts real runs) or "min" (what the hardware can do at best).
STATISTIC = "median"


def summarize(samples: list[float]) -> float:
    return min(samples) if STATISTIC == "min" else float(np.median(samples))


def time_samples(fn: Callable[[], None], reps: int) -> list[float]:
    """Wall times of ``reps`` runs of ``fn``, after one untimed warm-up run.

    Each timed run waits for :data:`GATE` (when set) to see a quiet machine first.
    """
    fn()
    out = []
    for _ in range(reps):
        if GATE is not None:
            GATE.wait()
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def cell_time(fn: Callable[[], None], reps: int) -> float:
    """:func:`summarize` of :func:`time_samples`."""
    return summarize(time_samples(fn, reps))


def make_runner(model: torch.nn.Module, batch: int, ctx: int) -> ModelRunner:
    """The reference decoder's forward path with room for ``batch`` rows of ``ctx`` + 17 positions.

    The cache content is irrelevant to cost, so it is left as allocated (zeros): no prefill needed.
    """
    runner = ModelRunner(model)
    runner.allocate(batch, ctx + max(TOKENS_PER_SEQ) + 1)
    return runner


def step_fn(runner: ModelRunner, batch: int, ctx: int, n: int, vocab: int, gen: torch.Generator,
            layers: range | None = None) -> Callable[[], None]:
    """One forward of ``n`` tokens per row after ``ctx`` cached positions, as the decoder runs it.

    Rows sit at slightly different positions (as sequences in a running batch do), so the forward
    takes the decoder's masked path; every row attends ``ctx + n`` slots, the padded batch's cost.
    Each run rewrites the same slots, so nothing needs rolling back.
    """
    ids = torch.randint(0, vocab, (batch, n), generator=gen)
    start = torch.full((batch,), ctx, dtype=torch.long)
    start[1::2] -= 1
    rows = slice(0, batch)

    def run() -> None:
        if layers is None:
            runner.forward(start, rows, input_ids=ids)
        else:  # an early-exit draft step: the first L layers, then norm + LM head
            h, _ = runner.forward(start, rows, input_ids=ids, layers=layers, head=False)
            runner.head(h)

    return run


def reps_for(batch: int, n: int, ctx: int) -> int:
    work = batch * n * (1 + ctx / 1024)
    return 3 if work <= 48 else 2 if work <= 200 else 1


def profile_verify(model, vocab, gen, batch_sizes, ns, ctxs, skip_big, passes, budget_s) -> list:
    """Sweep the whole grid ``passes`` times and summarize each cell over all its samples.

    Separate passes (rather than back-to-back repetitions) make the statistic robust to bursts of
    contention on a shared machine: a burst spoils a few seconds of one pass, not every repetition
    of a cell. Passes after the second are skipped once ``budget_s`` is spent.
    """
    seconds = [[[None for _ in ctxs] for _ in ns] for _ in batch_sizes]
    samples: dict[tuple[int, int, int], list[float]] = {}
    started = time.perf_counter()
    for p in range(passes):
        if p >= 2 and time.perf_counter() - started > budget_s:
            print(f"verify: stopping after {p} passes (budget {budget_s:.0f} s spent)", flush=True)
            break
        for c, ctx in enumerate(ctxs):
            for b, batch in enumerate(batch_sizes):
                runner = make_runner(model, batch, ctx)
                for i, n in enumerate(ns):
                    if skip_big is not None and batch >= 64 and n not in skip_big:
                        continue
                    got = time_samples(step_fn(runner, batch, ctx, n, vocab, gen), reps_for(batch, n, ctx))
                    samples.setdefault((b, i, c), []).extend(got)
                    t = summarize(got)
                    seconds[b][i][c] = summarize(samples[(b, i, c)])
                    print(f"pass {p} verify ctx={ctx:4d} batch={batch:3d} n={n:2d}: {t * 1e3:8.1f} ms", flush=True)
    return seconds


def verify_from_log(path: Path, batch_sizes: list, ns: list, ctxs: list) -> list:
    """Verify cells (min per cell) from the printed lines of an earlier, interrupted run."""
    pattern = re.compile(r"verify ctx=\s*(\d+) batch=\s*(\d+) n=\s*(\d+):\s*([\d.]+) ms")
    seconds = [[[None for _ in ctxs] for _ in ns] for _ in batch_sizes]
    for match in pattern.finditer(path.read_text()):
        ctx, batch, n, ms = int(match[1]), int(match[2]), int(match[3]), float(match[4])
        if ctx in ctxs and batch in batch_sizes and n in ns:
            b, i, c = batch_sizes.index(batch), ns.index(n), ctxs.index(ctx)
            old = seconds[b][i][c]
            seconds[b][i][c] = ms / 1e3 if old is None else min(old, ms / 1e3)
    return seconds


def suspicious_cells(seconds: list, tolerance: float = 1.2) -> list[tuple[int, int, int]]:
    """Cells costing more than ``tolerance`` x a cell that does strictly more work.

    More sequences, more tokens or more context should not be cheaper by 20%; when they are, the
    expensive cell most likely caught a burst of contention. Re-measuring it can only lower it.
    """
    nb, nn, nc = len(seconds), len(seconds[0]), len(seconds[0][0])
    out = []
    for b in range(nb):
        for i in range(nn):
            for c in range(nc):
                x = seconds[b][i][c]
                if x is None:
                    continue
                bigger = [
                    seconds[b2][i2][c2]
                    for b2 in range(b, nb) for i2 in range(i, nn) for c2 in range(c, nc)
                    if (b2, i2, c2) != (b, i, c) and seconds[b2][i2][c2] is not None
                ]
                if bigger and x > tolerance * min(bigger):
                    out.append((b, i, c))
    return out


def repair_verify(model, vocab, gen, verify: dict, rounds: int, tolerance: float = 1.2) -> None:
    """Re-measure suspicious cells of ``verify`` in place, a few rounds at most.

    A re-measurement (under ``median``, the median of 9 fresh samples at least) can only lower the
    cell: it was flagged for costing more than a cell that does more work. A fresh sample that is
    higher still caught another burst, or the slow mode of a bimodal cell (batch 16 at 2048 tokens
    of context takes 0.8 s or 1.5 s per forward), which its neighbours show is not the usual cost.
    """
    for r in range(rounds):
        cells = suspicious_cells(verify["seconds"], tolerance)
        print(f"repair round {r}: {len(cells)} suspicious cells", flush=True)
        if not cells:
            return
        for b, i, c in cells:
            batch, n, ctx = verify["batch_sizes"][b], verify["tokens_per_seq"][i], verify["context_lens"][c]
            reps = reps_for(batch, n, ctx) + 1 if STATISTIC == "min" else max(9, reps_for(batch, n, ctx) + 1)
            t = cell_time(step_fn(make_runner(model, batch, ctx), batch, ctx, n, vocab, gen), reps)
            old = verify["seconds"][b][i][c]
            new = min(old, t)
            verify["seconds"][b][i][c] = new
            print(f"repair ctx={ctx:4d} batch={batch:3d} n={n:2d}: {old * 1e3:8.1f} -> {new * 1e3:8.1f} ms", flush=True)


def profile_early_exit(model, vocab, gen, layers, batches, ctx) -> list:
    """Cost of one drafted token with the first L layers + norm + LM head, as the drafter runs it."""
    seconds = [[None for _ in batches] for _ in layers]
    for j, batch in enumerate(batches):
        runner = make_runner(model, batch, ctx)
        for i, num in enumerate(layers):
            seconds[i][j] = cell_time(step_fn(runner, batch, ctx, 1, vocab, gen, layers=range(num)), 7)
            print(f"early exit L={num:2d} batch={batch:2d} ctx={ctx}: {seconds[i][j] * 1e3:8.1f} ms", flush=True)
    return seconds


def profile_prompt_lookup(batches, ctx, rng) -> list:
    """Proposal cost per step for a whole batch (one ``propose`` call per sequence)."""
    seconds = []
    for batch in batches:
        rows = [rng.integers(0, 2000, size=ctx) for _ in range(batch)]

        def run(rows: list[np.ndarray] = rows) -> None:
            for row in rows:
                propose(row, 3, 1, num_tokens=16)

        seconds.append(cell_time(run, 20))
        print(f"prompt lookup batch={batch:3d} ctx={ctx}: {seconds[-1] * 1e3:8.3f} ms", flush=True)
    return seconds


def profile_prefill(model, vocab, gen, lengths) -> list:
    """One prompt alone (the decoder prefills each joining request on its own), no logits."""
    seconds = []
    runner = make_runner(model, 1, max(lengths))
    start = torch.zeros(1, dtype=torch.long)
    for length in lengths:
        ids = torch.randint(0, vocab, (1, length), generator=gen)

        def run(ids: torch.Tensor = ids) -> None:
            runner.forward(start, slice(0, 1), input_ids=ids, head=False)

        seconds.append(cell_time(run, 5 if length <= 256 else 3))
        print(f"prefill {length:5d} tokens: {seconds[-1] * 1e3:8.1f} ms", flush=True)
    return seconds


def ms(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x * 1e3:.{digits}f}"


def print_table(profile: dict) -> None:
    v = profile["verify"]
    for c, ctx in enumerate(v["context_lens"]):
        print(f"\nverify ms, ctx={ctx} (rows: batch, columns: tokens per sequence)")
        print("batch " + "".join(f"{n:>8d}" for n in v["tokens_per_seq"]))
        for b, batch in enumerate(v["batch_sizes"]):
            cells = [v["seconds"][b][i][c] for i in range(len(v["tokens_per_seq"]))]
            print(f"{batch:5d} " + "".join(f"{x * 1e3:8.1f}" if x is not None else "       -" for x in cells))
    ee = profile["draft_per_token"]["early_exit"]
    print("\nearly exit ms per drafted token: " + ", ".join(
        f"L={layer}: " + "/".join(ms(s) for s in row) for layer, row in zip(ee["layers"], ee["seconds"], strict=True)
    ) + f" (batch {ee['batch_sizes']})")
    pl = profile["draft_per_token"]["prompt_lookup"]
    print("prompt lookup ms per step: " + ", ".join(f"b={b}: {ms(s, 3)}" for b, s in zip(pl["batch_sizes"], pl["seconds"], strict=True)))
    pf = profile["prefill"]
    print("prefill ms: " + ", ".join(f"{n}: {ms(s)}" for n, s in zip(pf["tokens"], pf["seconds"], strict=True)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("adaptk/sim/data/profiles/smollm2-135m-cpu.json"))
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny grid, for checking the script")
    parser.add_argument("--big-batch-tokens", default="all",
                        help="comma list of tokens per sequence measured at batch >= 64 ('all': every n)")
    parser.add_argument("--repair", action="store_true",
                        help="only re-measure suspicious verify cells of the existing --out file and rewrite it")
    parser.add_argument("--repair-rounds", type=int, default=3)
    parser.add_argument("--repair-tolerance", type=float, default=1.2,
                        help="a verify cell is suspicious above this multiple of a cell doing strictly more work")
    parser.add_argument("--fill", action="store_true",
                        help="only measure the early_exit and prefill sections that are null in the existing --out file")
    parser.add_argument("--verify-log", type=Path, default=None,
                        help="take verify cells from the output of an interrupted run instead of measuring them")
    parser.add_argument("--skip", default="", help="comma list of sections left null: early_exit, prompt_lookup, prefill")
    parser.add_argument("--no-gate", action="store_true", help="time without waiting for a quiet machine")
    parser.add_argument("--statistic", choices=["median", "min"], default="median",
                        help="per-cell summary of the repeated timings (median: what a run sees; min: best case)")
    parser.add_argument("--gate-wait", type=float, default=30.0, help="longest wait for a quiet moment per timed run (s)")
    parser.add_argument("--passes", type=int, default=2, help="sweeps of the verify grid (each cell summarizes the samples of all sweeps)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds after which no new verify pass starts (>= 2 passes always)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    global STATISTIC
    STATISTIC = args.statistic
    model, _ = load_model(args.model, num_threads=args.threads)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    global GATE
    if not args.no_gate:
        with torch.inference_mode():
            GATE = QuietGate(step_fn(make_runner(model, 1, 128), 1, 128, 1, vocab, gen), max_wait_s=args.gate_wait)
        print(f"quiet gate: reference step {GATE.best * 1e3:.1f} ms", flush=True)
    batches, ns, ctxs = (BATCH_SIZES, TOKENS_PER_SEQ, CONTEXT_LENS) if not args.quick else ([1, 2], [1, 3], [32])
    if args.repair:
        profile = json.loads(args.out.read_text())
        with torch.inference_mode():
            repair_verify(model, vocab, gen, profile["verify"], args.repair_rounds, args.repair_tolerance)
        step = " ".join(["python benchmarks/profile_cpu.py", *(argv if argv is not None else sys.argv[1:])])
        if step not in profile.get("command", ""):
            profile["command"] = f"{profile.get('command', '')} && {step}"
        args.out.write_text(json.dumps(profile, indent=1) + "\n")
        print_table(profile)
        print(f"measurements that found no quiet moment: {GATE.disturbed if GATE else 'n/a'}")
        return
    if args.fill:
        profile = json.loads(args.out.read_text())
        early = profile["draft_per_token"]["early_exit"]
        with torch.inference_mode():
            if any(x is None for row in early["seconds"] for x in row):
                early["seconds"] = profile_early_exit(model, vocab, gen, early["layers"], early["batch_sizes"], 128)
            if any(x is None for x in profile["prefill"]["seconds"]):
                profile["prefill"]["seconds"] = profile_prefill(model, vocab, gen, profile["prefill"]["tokens"])
        profile["description"] = profile["description"].replace(
            " early_exit and prefill are null: they could not be measured in a quiet moment in this session; re-run "
            "the command on a quiet machine to fill them.",
            " early_exit and prefill were measured afterwards with --fill.")
        args.out.write_text(json.dumps(profile, indent=1) + "\n")
        print_table(profile)
        return
    big_ns = None if args.big_batch_tokens == "all" else [int(x) for x in args.big_batch_tokens.split(",")]
    with torch.inference_mode():
        if args.verify_log is not None:
            verify = verify_from_log(args.verify_log, batches, ns, ctxs)
        else:
            verify = profile_verify(model, vocab, gen, batches, ns, ctxs, big_ns, args.passes, args.budget)
        exit_layers = EXIT_LAYERS if not args.quick else [6]
        skip = {x.strip() for x in args.skip.split(",") if x.strip()}
        exit_batches = EXIT_BATCHES if not args.quick else [1]
        if "early_exit" in skip:
            early = [[None for _ in exit_batches] for _ in exit_layers]
        else:
            early = profile_early_exit(model, vocab, gen, exit_layers, exit_batches, 128 if not args.quick else 32)
        lookup_batches = LOOKUP_BATCHES if not args.quick else [1]
        if "prompt_lookup" in skip:
            lookup = [None for _ in lookup_batches]
        else:
            lookup = profile_prompt_lookup(lookup_batches, 512, np.random.default_rng(0))
        prefill_tokens = PREFILL_TOKENS if not args.quick else [32]
        prefill = [None for _ in prefill_tokens] if "prefill" in skip else profile_prefill(model, vocab, gen, prefill_tokens)
        verify_table = {"batch_sizes": batches, "tokens_per_seq": ns, "context_lens": ctxs, "seconds": verify}
        repair_verify(model, vocab, gen, verify_table, args.repair_rounds)
    skipped = "" if big_ns is None else f" At batch >= 64 only n in {big_ns} were measured (null elsewhere) to keep the run short."
    missing = sum(x is None for plane in verify for row in plane for x in row)
    if missing:
        skipped += f" {missing} verify cells were not measured (null)."
    if skip:
        skipped += f" Not measured in this run (null): {', '.join(sorted(skip))}."
    profile = {
        "format": "adaptk-profile",
        "version": 1,
        "name": "smollm2-135m-cpu",
        "kind": "measured",
        "description": (
            f"Wall-clock seconds, {STATISTIC} over repetitions (verify: over several sweeps of the grid), torch "
            "inference_mode, fp32, through the reference decoder's own forward (adaptk.decoding.kv.ModelRunner, "
            "position-indexed cache, rows at unequal positions so the masked path runs). verify.seconds[b][n][c]: one "
            "forward of n new tokens per sequence after ctx cached positions (logits for all new tokens). "
            "early_exit.seconds[layer][batch]: one drafted token through the first L layers + norm + LM head on a "
            "cache of 128 tokens. prompt_lookup.seconds[batch]: one numpy proposal (max_ngram 3, 16 tokens) per "
            "sequence of 512 tokens, summed over the batch. prefill: one prompt alone, no logits. "
            + "Verify cells that cost >1.2x a cell doing strictly more work were re-measured (contention on a "
              "shared machine). "
            + ("Every timed run waited until a reference decode step ran within 1.25x of its best time." if GATE
               else "Timed as the machine ran (no waiting for quiet moments), as real decoding runs.")
            + skipped
        ),
        "hardware": f"{cpu_model()}, {args.threads} threads",
        "model": "SmolLM2-135M-Instruct fp32",
        "command": " ".join(["python benchmarks/profile_cpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": dt.date.today().isoformat(),
        "software": f"torch {torch.__version__}, numpy {np.__version__}",
        "verify": verify_table,
        "draft_per_token": {
            "prompt_lookup": {"batch_sizes": lookup_batches, "seconds": lookup},
            "early_exit": {"layers": exit_layers, "batch_sizes": exit_batches, "seconds": early},
        },
        "prefill": {"tokens": prefill_tokens, "seconds": prefill},
        "num_layers": int(model.config.num_hidden_layers),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(profile, indent=1) + "\n")
    print_table(profile)
    print(f"\nwrote {args.out} in {time.perf_counter() - started:.0f} s; "
          f"measurements that found no quiet moment: {GATE.disturbed if GATE else 'n/a'}")


if __name__ == "__main__":
    main()
