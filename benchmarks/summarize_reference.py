"""Markdown tables for docs/benchmarks.md from an `adaptk bench --engine reference` results.jsonl.

    python benchmarks/summarize_reference.py benchmarks/results/reference-tasks/results.jsonl
    python benchmarks/summarize_reference.py benchmarks/results/reference-quick/results.jsonl

A run with one workload per task (``--suite tasks``) prints one row per task and batch size: plain
and flagship tokens/s, speedup, acceptance length and replay's predictions with their errors. A run
with several controllers on one workload (``--suite quick``) prints one row per controller. Both
end with how many cells replay predicted within ±15%.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

PLAIN = "fixed(k=0)"


def error(row: dict) -> float:
    return row["predicted_token_goodput"] / row["token_goodput"] - 1.0


def percent(x: float) -> str:
    return f"{100 * x:+.1f}%" if abs(x) >= 0.145 else f"{100 * x:+.0f}%"


def main(path: str) -> None:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("engine") == "reference"]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))  # run order
    if len(workloads) > 1:
        cells: dict[tuple[int, str], dict[str, dict]] = defaultdict(dict)
        for r in rows:
            cells[(r["batch_size"], r["workload"])][r["controller"]] = r
        print("| task | batch | plain tok/s | adaptk tok/s | speedup | acceptance length "
              "| replay-predicted plain / adaptk | prediction error plain / adaptk |")
        print("|---|---|---|---|---|---|---|---|")
        for (batch, workload), by in sorted(cells.items(), key=lambda kv: (kv[0][0], workloads.index(kv[0][1]))):
            plain, flag = by[PLAIN], by["adaptk"]
            print(f"| {workload.split('/')[-1]} | {batch} | {plain['token_goodput']:.1f} | {flag['token_goodput']:.1f} | "
                  f"×{flag['token_goodput'] / plain['token_goodput']:.2f} | {flag['mean_acceptance_length']:.2f} | "
                  f"{plain['predicted_token_goodput']:.1f} / {flag['predicted_token_goodput']:.1f} | "
                  f"{percent(error(plain))} / {percent(error(flag))} |")
    else:
        print("| batch | controller | measured tok/s | × plain | acceptance length | replay-predicted tok/s | prediction error |")
        print("|---|---|---|---|---|---|---|")
        for r in sorted(rows, key=lambda r: (r["batch_size"], r["controller"] != PLAIN)):
            print(f"| {r['batch_size']} | {r['controller']} | {r['token_goodput']:.1f} | {r['relative_to_plain']:.2f} | "
                  f"{r['mean_acceptance_length']:.2f} | {r['predicted_token_goodput']:.1f} | {percent(error(r))} |")
    errors = [error(r) for r in rows]
    inside = sum(abs(e) <= 0.15 for e in errors)
    worst = max(errors, key=abs)
    print(f"\nwithin ±15%: {inside} of {len(errors)} cells; largest error {percent(worst)}")


if __name__ == "__main__":
    main(sys.argv[1])
