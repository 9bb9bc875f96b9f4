"""benchmarks/bench_vllm.py: a resumed controller learns on prompts the timed runs never send."""

from __future__ import annotations

import pytest


def test_resume_prompts_are_none_of_the_timed_ones(benchmark_script) -> None:
    script = benchmark_script("bench_vllm")
    timed = script.batched_requests(32, 2)  # concurrency 8, 4 requests per slot, 2 prompts per task at c=1
    timed_per_task = max(2, -(-len(timed) // len(script.TASKS)))
    other = script.other_requests(32, timed_per_task)
    assert len(other) == 32 and len({p for _, p in other}) == 32
    assert not {p for _, p in other} & ({p for _, p in timed} | {p for _, p in script.load_prompts(2)})
    assert {t for t, _ in other} == {t for t, _ in timed}  # every task, as in the timed runs


def test_asking_for_more_resume_prompts_than_exist_stops_with_a_message(benchmark_script) -> None:
    script = benchmark_script("bench_vllm")
    with pytest.raises(SystemExit, match="Spec-Bench prompts left"):
        script.other_requests(500, 6)
