"""benchmarks/vllm_steps.py: the drain count (the script itself needs a vLLM engine)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def vllm_steps(benchmark_script):
    before = set(os.environ)
    module = benchmark_script("vllm_steps")
    for name in set(os.environ) - before:  # the script sets vLLM's environment on import
        del os.environ[name]  # (monkeypatch.delenv would put it back at teardown)
    return module


def test_drain_counts_steps_after_the_last_admission_and_idle_rows(vllm_steps) -> None:
    step = vllm_steps.Step
    # concurrency 3: admit 3, run full, admit a 4th into a freed slot, then drain 3 -> 1 rows
    steps = [step(0.2, 0, 0, 0, True), step(0.1, 3, 6, 3, False), step(0.2, 2, 4, 1, True),
             step(0.1, 3, 3, 2, False), step(0.1, 2, 2, 0, False), step(0.1, 1, 1, 1, False)]
    assert vllm_steps.drain(steps, concurrency=3) == (3, 3 + 0 + 1 + 0 + 1 + 2)


def test_a_run_without_admissions_is_all_drain(vllm_steps) -> None:
    steps = [vllm_steps.Step(0.1, 2, 0, 0, False), vllm_steps.Step(0.1, 1, 0, 0, False)]
    assert vllm_steps.drain(steps, concurrency=2) == (2, 1)
    assert vllm_steps.drain([], concurrency=8) == (0, 0)
