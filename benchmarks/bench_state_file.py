"""What the vLLM adapter's ``state_file`` costs: one write and one load of ``adaptk``'s learned state.

``adaptk`` (priced for packed batches, as the adapter builds it) first serves every bundled
prompt-lookup trace once at batch 8 in replay, so its tables hold what a serving engine's would;
then ``save_controller_state`` (the engine's write, with 8 running sequences) and
``load_controller_state`` are timed, medians of ``--repeats``.

    python benchmarks/bench_state_file.py      # a few seconds; writes benchmarks/results/state-file.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import adaptk
from adaptk.adapters.vllm import load_controller_state, price_packed, save_controller_state
from adaptk.bench.runner import bundled_trace_paths
from adaptk.estimators.latency import get_latency_model
from adaptk.sim.replay import replay
from adaptk.sim.trace import TraceSet

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "state-file.json")
    args = parser.parse_args(argv)
    spec = price_packed({"name": "adaptk"})
    controller = adaptk.from_spec(spec)
    replay(controller, TraceSet.load(bundled_trace_paths()["smollm2-prompt-lookup"]),
           get_latency_model("smollm2-135m-cpu", drafter="prompt_lookup"), 8)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adaptk-state.json"
        saves, loads = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            save_controller_state(controller, path, live_seq_ids=range(8), next_seq_id=1000)
            saves.append(time.perf_counter() - start)
            fresh = adaptk.from_spec(spec)
            start = time.perf_counter()
            load_controller_state(fresh, path)
            loads.append(time.perf_counter() - start)
        size = path.stat().st_size
    result = {"command": "python benchmarks/bench_state_file.py", "repeats": args.repeats,
              "save_ms_median": 1e3 * statistics.median(saves), "load_ms_median": 1e3 * statistics.median(loads),
              "file_kb": size / 1e3}
    print(f"save {result['save_ms_median']:.1f} ms, load {result['load_ms_median']:.1f} ms (medians), "
          f"{result['file_kb']:.0f} kB")
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
