"""`adaptk bench` / `adaptk controllers` end to end, through the real command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adaptk.bench.runner import bundled_trace_paths
from adaptk.sim import Trace, TraceSet

ADAPTK = [sys.executable, "-m", "adaptk.cli"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*ADAPTK, *args], capture_output=True, text=True, timeout=600)


@pytest.fixture()
def trace_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    traces = []
    for i in range(8):
        n = 40
        match = np.minimum(rng.integers(0, 6, n), n - 1 - np.arange(n)).clip(0)
        traces.append(Trace(f"q{i}", ["chat", "summarization"][i % 2], 50, match_len=match,
                            draft_avail=np.full(n, 8), ngram_len=rng.integers(0, 4, n)))
    path = tmp_path / "synthetic.npz"
    TraceSet(traces, "prompt_lookup", k_max=8).save(path)
    return path


def test_bench_writes_results_report_and_plot(tmp_path: Path, trace_file: Path):
    out = tmp_path / "out"
    result = run("bench", "--suite", "quick", "--controllers", "fixed,hf-heuristic,adaptk", "--traces", str(trace_file),
                 "--profiles", "h100-llama3-8b", "--batch-sizes", "1,4", "--workers", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    required = {"controller", "workload", "batch_size", "cost_profile", "token_goodput", "mean_acceptance_length",
                "relative_to_best_fixed", "relative_to_oracle"}
    assert all(required <= set(row) for row in rows)
    names = {row["controller"] for row in rows}
    assert {"fixed", "hf-heuristic", "adaptk", "oracle:best-fixed", "oracle:clairvoyant"} <= names
    for row in rows:
        if row["batch_size"] == 1:
            assert row["relative_to_oracle"] <= 1.0 + 1e-9
        else:
            assert row["relative_to_oracle"] is None
        if row["controller"].startswith("fixed"):
            assert row["relative_to_best_fixed"] <= 1.0 + 1e-9
    assert (out / "report.md").read_text().startswith("# adaptk bench report")
    assert list(out.glob("*.png"))


@pytest.mark.skipif(not bundled_trace_paths(), reason="bundled traces missing")
def test_quick_suite_on_bundled_traces(tmp_path: Path):
    out = tmp_path / "quick"
    result = run("bench", "--suite", "quick", "--controllers", "fixed,hf-heuristic", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    workloads = {row["workload"] for row in rows}
    assert {Path(p).name.removesuffix(".npz") + "/mixed" for p in bundled_trace_paths().values()} == workloads
    assert {"fixed", "hf-heuristic"} <= {row["controller"] for row in rows}
    assert all(row["relative_to_oracle"] is None or row["relative_to_oracle"] <= 1 + 1e-9 for row in rows)


@pytest.mark.parametrize(
    "args, message",
    [
        (["bench", "--controllers", "no-such-controller"], "unknown controller 'no-such-controller'"),
        (["bench", "--batch-sizes", "0"], "--batch-sizes must be positive"),
        (["bench", "--traces", "/nonexistent/file.npz"], "does not exist"),
        (["bench", "--suite", "huge"], "unknown suite"),
        (["bench", "--profiles", "no-such-gpu"], "unknown latency model"),
    ],
)
def test_bad_arguments_exit_nonzero_with_one_line(args, message, tmp_path: Path, trace_file: Path):
    result = run(*args, "--traces", str(trace_file), "--out", str(tmp_path / "o"))
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unreadable_trace_file_is_a_clean_error(tmp_path: Path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file at all")
    result = run("bench", "--traces", str(bad), "--controllers", "fixed", "--out", str(tmp_path / "o"))
    assert result.returncode != 0 and "not a readable adaptk trace file" in result.stderr
    assert "Traceback" not in result.stderr


def test_controllers_lists_every_registered_controller():
    import adaptk

    result = run("controllers")
    assert result.returncode == 0
    built_in = [n for n in adaptk.available() if adaptk.get_class(n).__module__.startswith("adaptk.controllers")]
    assert len(built_in) >= 20
    for name in built_in:  # other test modules may register test-only controllers in this process
        assert name in result.stdout
