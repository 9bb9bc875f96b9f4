"""The allocator setting that keeps CPU forwards from page-faulting every step."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytest.importorskip("torch")

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
PROBE = "from adaptk.decoding.allocator import retain_freed_memory as r; print(r(), r())"


def _probe(**env: str) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not GLIBC, reason="mallopt exists only in glibc")
def test_applies_once_on_glibc_and_stays_applied() -> None:
    assert _probe(ADAPTK_RETAIN_FREED_MEMORY="1") == "True True"


def test_environment_switch_turns_it_off() -> None:
    assert _probe(ADAPTK_RETAIN_FREED_MEMORY="0") == "False False"


def test_model_runner_applies_it() -> None:
    code = ("import transformers, adaptk.decoding.allocator as a; from adaptk.decoding.kv import ModelRunner; "
            "config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, "
            "num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2); "
            "ModelRunner(transformers.LlamaForCausalLM(config).eval()); print(a._applied)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(GLIBC)
