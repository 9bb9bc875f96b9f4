#!/usr/bin/env bash
# GPU checks for adaptk's vLLM adapter — NOT YET RUN: no GPU was available when this was written.
#
# The CPU build of vLLM only exercises the V1 model runner with sync scheduling. On a GPU the same
# hook also meets (1) async scheduling (the scheduler becomes AdaptkAsyncScheduler by itself and
# caps the per-request draft placeholders), (2) the V2 model runner with CUDA graphs (engine_kwargs
# lists every K in 0..k_max in num_speculative_tokens_per_batch_size so that a graph is captured for
# each), (3) V1 with CUDA graphs (vLLM switches to piecewise graphs under dynamic K). This script runs
# the repository's vLLM tests and the same checks on those paths, and the benchmark, on a CUDA GPU.
#
# Needs: a CUDA GPU, upstream vLLM in the supported range (`pip install "vllm>=0.32,<0.34"`;
# 0.33 needs torch 2.14.0), adaptk installed (`pip install -e . --no-deps` plus its light deps), and
# the SmolLM2 safetensors directory (python -c "from adaptk.decoding.models import fetch_smollm2;
# print(fetch_smollm2())"). Usage:
#
#   PYTHON=/path/to/venv/bin/python bash benchmarks/gpu_vllm_check.sh [OUT_DIR]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
OUT="${1:-$ROOT/benchmarks/results/gpu}"
mkdir -p "$OUT"
cd "$ROOT"

"$PYTHON" - <<'PY'
import sys
import torch
import vllm
import adaptk.adapters.vllm as adapter

if not torch.cuda.is_available():
    sys.exit("no CUDA GPU: this script is for GPU machines (the CPU checks are tests/test_vllm_adapter.py)")
print(f"vllm {vllm.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
problems = adapter.check_vllm()
print("check_vllm:", problems or "all hooked attributes present")
PY

echo "== 1. the CPU test-suite, on the GPU build (in-process engine, eager)"
VLLM_ENABLE_V1_MULTIPROCESSING=0 "$PYTHON" -m pytest -p no:cacheprovider -o addopts="" -m vllm \
    tests/test_vllm_adapter.py -q 2>&1 | tee "$OUT/pytest.txt"

echo "== 2. the GPU paths: async scheduling, V1 and V2 runners, CUDA graphs on and off"
"$PYTHON" - "$OUT" <<'PY'
import json, os, subprocess, sys, textwrap

out_dir = sys.argv[1]
script = textwrap.dedent('''
    import json, os, sys, warnings
    from vllm import LLM, SamplingParams
    import adaptk
    from adaptk.adapters.vllm import engine_kwargs, scheduler_hook, model_dir_for_vllm
    from adaptk.decoding.models import fetch_smollm2

    if __name__ == "__main__":
        method, eager, async_sched = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
        model = model_dir_for_vllm(fetch_smollm2())
        prompts = ["Summarize: the cat sat on the mat. The mat was red. The cat liked the mat.",
                   "Write a Python function that adds two numbers.", "What is the capital of France?",
                   "Repeat: one apple, two apples, three apples, four apples, five apples."] * 4
        params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
        ref = [o.outputs[0].token_ids for o in LLM(model, dtype="float32", enforce_eager=True, seed=0,
               gpu_memory_utilization=0.2).generate(prompts, params, use_tqdm=False)]
        results = {}
        for spec in ({"name": "fixed", "params": {"k": 3}}, {"name": "hf-heuristic", "params": {"initial_k": 2}},
                     {"name": "fixed", "params": {"k": 0}}, {"name": "adaptk", "params": {}}):
            if spec["name"] not in adaptk.available():
                continue
            extra = {"prompt_lookup_min": 2, "prompt_lookup_max": 4} if method == "ngram" else {}
            kw = engine_kwargs(spec, method=method, k_max=6,
                               draft_model=model if method == "draft_model" else None, **extra)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                llm = LLM(model, dtype="float32", enforce_eager=eager, seed=0, async_scheduling=async_sched,
                          gpu_memory_utilization=0.2, disable_log_stats=False, **kw)
                outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            hook = scheduler_hook(llm)
            metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics() if "spec_decode" in m.name}
            results[spec["name"] + str(spec["params"])] = {
                "same_as_no_spec": outs == ref,
                "scheduler": type(llm.llm_engine.engine_core.engine_core.scheduler).__name__,
                "fell_back": None if hook is None else hook.fell_back,
                "fallback_warnings": [str(w.message) for w in caught if "adaptk" in str(w.message)],
                "metrics": metrics,
            }
            del llm
        print("RESULT " + json.dumps(results))
''')
path = os.path.join(out_dir, "gpu_paths.py")
open(path, "w").write(script)
summary = {}
# ngram runs sync only in vLLM (async needs ngram_gpu / draft_model / EAGLE); draft_model uses
# SmolLM2 itself as the draft (acceptance ~100%: a mechanical check of the async and graph paths).
cases = [("ngram", "0")] + [("draft_model", a) for a in ("0", "1")]
for method, async_sched in cases:
    for v2 in ("0", "1"):
        for eager in ("1", "0"):
            env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_USE_V2_MODEL_RUNNER": v2}
            key = f"{method} v2={v2} eager={eager} async={async_sched}"
            proc = subprocess.run([sys.executable, path, method, eager, async_sched],
                                  capture_output=True, text=True, env=env, timeout=1800)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            summary[key] = json.loads(lines[-1][7:]) if lines else {"error": proc.stderr[-4000:]}
            print(key, "->", "ok" if lines else "FAILED", flush=True)
json.dump(summary, open(os.path.join(out_dir, "gpu_paths.json"), "w"), indent=2)
PY

echo "== 3. the benchmark (SmolLM2, ngram, concurrency 1 and 8)"
"$PYTHON" benchmarks/bench_vllm.py --out "$OUT/vllm_gpu.json" 2>&1 | tail -20 | tee "$OUT/bench.txt"
echo "results in $OUT"
