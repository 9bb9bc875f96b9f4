"""Write a bench run's results: ``results.jsonl``, ``report.md`` and PNG plots."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from adaptk.bench.runner import summarize

__all__ = ["write_results", "write_report", "plot_goodput"]


def write_results(rows: list[dict[str, Any]], out_dir: Path) -> Path:
    path = out_dir / "results.jsonl"
    with path.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row, allow_nan=False, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def write_report(rows: list[dict[str, Any]], out_dir: Path, command: str) -> Path:
    """A markdown report: a summary per controller, then goodput tables per cost profile."""
    lines = [
        "# adaptk bench report",
        "",
        f"Reproduce: `{command}`",
        "",
        "Token goodput is simulated tokens/s under each cost profile (exact replay of recorded greedy",
        "traces). `vs best fixed` divides by the best single draft length in hindsight for the same cell;",
        "`vs oracle` divides by the clairvoyant batch-1 optimum (batch 1 only).",
        "",
        "## Summary over all cells",
        "",
        "| controller | geomean vs best fixed | worst vs best fixed | worst vs plain | geomean vs oracle (b=1) | cells |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in sorted(summarize(rows).items(), key=lambda kv: -kv[1]["geomean_vs_best_fixed"]):
        lines.append(
            f"| {name} | {_fmt(s['geomean_vs_best_fixed'])} | {_fmt(s['worst_vs_best_fixed'])} | "
            f"{_fmt(s['worst_vs_plain'])} | {_fmt(s['geomean_vs_oracle_b1'])} | {int(s['cells'])} |"
        )
    by_profile: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_profile[row["cost_profile"]].append(row)
    for profile, prows in sorted(by_profile.items()):
        lines += ["", f"## Cost profile `{profile}`: goodput relative to the best fixed k", ""]
        cells = sorted({(r["workload"], r["batch_size"]) for r in prows})
        header = "| controller | " + " | ".join(f"{w} b={b}" for w, b in cells) + " |"
        lines += [header, "|" + "---|" * (len(cells) + 1)]
        table: dict[str, dict[tuple[str, int], float]] = defaultdict(dict)
        for r in prows:
            table[r["controller"]][(r["workload"], r["batch_size"])] = r["relative_to_best_fixed"]
        for name in sorted(table):
            lines.append(f"| {name} | " + " | ".join(_fmt(table[name].get(c)) for c in cells) + " |")
        best = {(r["workload"], r["batch_size"]): r for r in prows if r["controller"] == "oracle:best-fixed"}
        lines.append("| *best fixed k* | " + " | ".join(
            str(best[c].get("best_fixed_k")) if c in best else "—" for c in cells) + " |")
        lines.append("| *best fixed tokens/s* | " + " | ".join(
            _fmt(best[c]["token_goodput"], 1) if c in best else "—" for c in cells) + " |")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_goodput(rows: list[dict[str, Any]], out_dir: Path, max_controllers: int = 12) -> list[Path]:
    """One PNG per (cost profile, workload ending in /mixed): goodput vs batch size per controller."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["workload"].endswith("/mixed"):
            groups[(row["cost_profile"], row["workload"])].append(row)
    for (profile, workload), grows in sorted(groups.items()):
        series: dict[str, dict[int, float]] = defaultdict(dict)
        for r in grows:
            series[r["controller"]][r["batch_size"]] = r["token_goodput"]
        ranked = sorted(
            (n for n in series if not n.startswith("oracle:")),
            key=lambda n: -sum(series[n].values()),
        )[:max_controllers]
        fig, ax = plt.subplots(figsize=(8, 5))
        for name in ranked + [n for n in series if n.startswith("oracle:")]:
            xs = sorted(series[name])
            style = "k--" if name == "oracle:best-fixed" else ("k*" if name == "oracle:clairvoyant" else "-o")
            ax.plot(xs, [series[name][x] for x in xs], style, label=name, markersize=5 if style == "-o" else 10)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("token goodput (tokens/s, simulated)")
        ax.set_title(f"{workload} — {profile}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{Path(profile).name.removesuffix('.json')}_{workload}")
        path = out_dir / f"goodput_{slug}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
