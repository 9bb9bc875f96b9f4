"""Markdown tables for docs/benchmarks.md from an `adaptk bench` results.jsonl.

    python benchmarks/summarize_replay.py benchmarks/results/replay-standard/results.jsonl

Prints: the summary per controller (geometric mean and worst of goodput relative to the best fixed
k over every cell, worst relative to plain decoding, geometric mean relative to the clairvoyant
oracle at batch 1), then the flagship's cell-by-cell numbers.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from adaptk.bench.runner import summarize


def main(path: str) -> None:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    print("| controller | geomean vs best fixed | worst vs best fixed | worst vs plain | geomean vs oracle (b=1) |")
    print("|---|---|---|---|---|")
    for name, s in sorted(summarize(rows).items(), key=lambda kv: -kv[1]["geomean_vs_best_fixed"]):
        print(f"| {name} | {s['geomean_vs_best_fixed']:.3f} | {s['worst_vs_best_fixed']:.3f} | "
              f"{s['worst_vs_plain']:.3f} | {s['geomean_vs_oracle_b1']:.3f} |")
    print()
    best = {(r["cost_profile"], r["workload"], r["batch_size"]): r for r in rows if r["controller"] == "oracle:best-fixed"}
    by_cell = defaultdict(dict)
    for r in rows:
        by_cell[(r["cost_profile"], r["workload"], r["batch_size"])][r["controller"]] = r
    print("| cost profile | workload | batch | best fixed k | best fixed tok/s | adaptk tok/s | vs best fixed | vs plain | vs oracle |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key in sorted(by_cell):
        flagship = by_cell[key].get("adaptk")
        if flagship is None:
            continue
        b = best[key]
        k = b["best_fixed_k"] if b.get("best_fixed_exit_layer") is None else f"{b['best_fixed_k']} @L{b['best_fixed_exit_layer']}"
        oracle = "—" if flagship["relative_to_oracle"] is None else f"{flagship['relative_to_oracle']:.3f}"
        print(f"| {key[0]} | {key[1]} | {key[2]} | {k} | {b['token_goodput']:.1f} | {flagship['token_goodput']:.1f} | "
              f"{flagship['relative_to_best_fixed']:.3f} | {flagship['relative_to_plain']:.3f} | {oracle} |")


if __name__ == "__main__":
    main(sys.argv[1])
