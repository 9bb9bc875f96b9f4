"""The ``adaptk`` command line: ``bench``, ``controllers``, ``record``."""

from __future__ import annotations

import datetime as _dt
import json
import shlex
import sys
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Adaptive speculation-length controllers.")


def _fail(message: str) -> None:
    typer.echo(f"adaptk: error: {message}", err=True)
    raise typer.Exit(2)


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _parse_controllers(text: str | None) -> list[str | dict]:
    """``a,b`` or a JSON list of specs (``[{"name": "fixed", "params": {"k": 3}}]``)."""
    import adaptk

    if text is None:
        return adaptk.available()
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            specs = json.loads(stripped)
        except json.JSONDecodeError as exc:
            _fail(f"--controllers is not valid JSON: {exc}")
        return specs
    names = _split(text)
    for name in names:
        adaptk.get_class(name)  # raises ValueError naming the unknown controller
    return names


def _parse_batch_sizes(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        sizes = tuple(int(part) for part in _split(text))
    except ValueError:
        _fail(f"--batch-sizes must be comma-separated integers, got {text!r}")
    if not sizes or min(sizes) < 1:
        _fail(f"--batch-sizes must be positive integers, got {text!r}")
    return sizes


@app.command()
def bench(
    suite: str = typer.Option("standard", help="quick | standard (reference engine also: tasks, one run per task)"),
    controllers: str | None = typer.Option(None, help="Comma-separated names, or a JSON list of specs. Default: all."),
    batch_sizes: str | None = typer.Option(None, help="Comma-separated batch sizes (default 1,4,16,64)."),
    profiles: str | None = typer.Option(None, help="Cost profiles / presets (default smollm2-135m-cpu,h100-llama3-8b)."),
    traces: list[Path] | None = typer.Option(None, "--traces", help="Trace files (default: the bundled ones)."),
    engine: str = typer.Option("replay", help="replay (exact, simulated time) | reference (real decoding, needs the hf extra)."),
    drafter: str = typer.Option("prompt_lookup", help="Drafter for --engine reference."),
    workers: int | None = typer.Option(None, help="Worker processes for replay (default: CPU count)."),
    out: Path | None = typer.Option(None, help="Output folder (default: a fresh one under ./adaptk-results/)."),
) -> None:
    """Run controllers against each other on the same work and write results.jsonl, report.md, plots."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from adaptk.bench import report
    from adaptk.bench.runner import SUITES, prepare, run_bench, summarize

    command = "adaptk " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if engine != "reference" and suite not in SUITES:
        _fail(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
    try:
        specs = _parse_controllers(controllers)
    except ValueError as exc:
        _fail(str(exc))
    sizes = _parse_batch_sizes(batch_sizes)
    if workers is not None and workers < 1:
        _fail("--workers must be >= 1")
    for path in traces or []:
        if not path.is_file():
            _fail(f"trace file {path} does not exist or is not a file")
    out_dir = out or Path("adaptk-results") / _dt.datetime.now().strftime("bench-%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)

    if engine == "reference":
        try:
            from adaptk.bench.reference import run_reference_bench
        except ImportError as exc:
            _fail(f"--engine reference needs the [hf] extra (torch, transformers): {exc}")
        try:
            rows = run_reference_bench([s if isinstance(s, str) else s["name"] for s in specs],
                                       list(sizes or (1, 4)), drafter, suite, out_dir)
        except ValueError as exc:
            _fail(str(exc))
    elif engine == "replay":
        chosen = SUITES[suite]
        try:
            prepared = prepare(specs, chosen, trace_paths=traces or None, profiles=tuple(_split(profiles)) or None)
        except ValueError as exc:  # unknown profile, unreadable trace file, bad parameters
            _fail(str(exc).splitlines()[0])
        with Progress(TextColumn("[bold]bench[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=False) as bar:
            task = bar.add_task(suite, total=None)
            try:
                rows = run_bench(
                    specs, chosen, batch_sizes=sizes, workers=workers, prepared=prepared,
                    progress=lambda done, total: bar.update(task, completed=done, total=total),
                )
            except ValueError as exc:
                _fail(str(exc).splitlines()[0])
    else:
        _fail(f"unknown engine {engine!r}; choose replay or reference")

    report.write_results(rows, out_dir)
    if engine == "replay":
        report.write_report(rows, out_dir, command)
        report.plot_goodput(rows, out_dir)
        table = Table(title=f"adaptk bench --suite {suite}: token goodput relative to the best fixed k")
        for column in ("controller", "geomean", "worst", "worst vs plain", "vs oracle (b=1)"):
            table.add_column(column, justify="left" if column == "controller" else "right")
        for name, s in sorted(summarize(rows).items(), key=lambda kv: -kv[1]["geomean_vs_best_fixed"]):
            table.add_row(name, f"{s['geomean_vs_best_fixed']:.3f}", f"{s['worst_vs_best_fixed']:.3f}",
                          f"{s['worst_vs_plain']:.3f}", f"{s['geomean_vs_oracle_b1']:.3f}")
        Console().print(table)
    typer.echo(f"wrote {out_dir}/results.jsonl" + (", report.md and plots" if engine == "replay" else ""))


@app.command("controllers")
def list_controllers() -> None:
    """List registered controllers with their parameters and defaults."""
    import adaptk

    for name in adaptk.available():
        cls = adaptk.get_class(name)
        params = ", ".join(f"{k}={v!r}" for k, v in cls.default_params().items())
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        typer.echo(f"{name:24s} {params}")
        if doc:
            typer.echo(f"{'':24s} {doc}")


@app.command(add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def record(ctx: typer.Context) -> None:
    """Record exact greedy traces from a real model (needs the hf extra); `adaptk record --help` for options."""
    try:
        from adaptk.record import record_main
    except ImportError as exc:
        _fail(f"record needs the [hf] extra (torch, transformers): {exc}")
    code = record_main(list(ctx.args))
    raise typer.Exit(code or 0)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
