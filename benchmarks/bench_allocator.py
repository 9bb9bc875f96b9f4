"""The decoder's forward with and without ``retain_freed_memory``, side by side.

Each setting runs in its own process (the setting is process-wide and cannot be undone), and the
two alternate for ``--rounds`` rounds. A round times ``--steps`` forwards of SmolLM2-135M through
the decoder's own path, ``--new`` tokens per row at batch ``--batch``, with the KV length growing by
one every forward as in real decoding. Reports the median forward per setting and their ratio, and
writes ``benchmarks/results/allocator.json``.

    python benchmarks/bench_allocator.py [--batch 4] [--context 832] [--new 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).parent / "results" / "allocator.json"

CHILD = """
import json, sys, time, torch
from adaptk.decoding.kv import ModelRunner
from adaptk.decoding.models import load_model
batch, context, new, steps = map(int, sys.argv[1:5])
model, _ = load_model(num_threads=2)
runner = ModelRunner(model)
runner.allocate(batch, context + steps + new + 1)
ids = torch.randint(0, model.config.vocab_size, (batch, new), generator=torch.Generator().manual_seed(0))
times = []
for step in range(steps):
    start = torch.full((batch,), context + step, dtype=torch.long)
    start[1::2] -= 1  # rows at different positions: the masked path, as in a running batch
    t0 = time.perf_counter()
    runner.forward(start, slice(0, batch), input_ids=ids)
    times.append(time.perf_counter() - t0)
print(json.dumps(times[2:]))
"""


def run(retain: bool, args: argparse.Namespace) -> list[float]:
    env = {**os.environ, "ADAPTK_RETAIN_FREED_MEMORY": "1" if retain else "0"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(args.batch), str(args.context), str(args.new),
                          str(args.steps)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=832)
    parser.add_argument("--new", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    samples: dict[str, list[float]] = {"default": [], "retain": []}
    for _ in range(args.rounds):
        samples["default"] += run(False, args)
        samples["retain"] += run(True, args)
    medians = {name: statistics.median(times) for name, times in samples.items()}
    result = {
        "command": " ".join(["python benchmarks/bench_allocator.py", *(argv if argv is not None else sys.argv[1:])]),
        "batch": args.batch, "context": args.context, "new_tokens": args.new,
        "median_forward_ms": {name: round(m * 1e3, 1) for name, m in medians.items()},
        "speedup": round(medians["default"] / medians["retain"], 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
