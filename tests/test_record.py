"""Trace recording on a tiny random Llama: every m_t checked by actually drafting from t."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from adaptk.ngram import propose  # noqa: E402
from adaptk.record import (  # noqa: E402
    Prompt,
    early_exit_traces,
    prompt_lookup_traces,
    record,
    record_main,
    run_lengths,
)
from adaptk.sim.trace import TraceSet  # noqa: E402

K_MAX = 5
LAYERS = (1, 2, 3)


@pytest.fixture(scope="module")
def tiny_model() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,  # well-separated logits: no near-ties between code paths
        eos_token_id=47,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def recordings(tiny_model):
    prompts = [
        Prompt("a", "qa", (3, 9, 4, 9, 4, 11, 20)),
        Prompt("b", "rag", (5, 6, 7, 5, 6)),
    ]
    recs, notes = record(tiny_model, prompts, max_new_tokens=24, exit_layers=LAYERS, eos_token_id=47, batch_size=2)
    return recs, notes


def _greedy_draft(model, prefix: list[int], layers: int, k: int) -> list[int]:
    """Draft k tokens greedily with the first ``layers`` layers, recomputing from scratch each time."""
    full = model.model.layers
    model.model.layers = torch.nn.ModuleList(list(full)[:layers])
    try:
        seq = list(prefix)
        with torch.inference_mode():
            for _ in range(k):
                logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
                seq.append(int(logits.argmax()))
    finally:
        model.model.layers = full
    return seq[len(prefix) :]


def _count(draft: list[int], output: np.ndarray, t: int) -> int:
    m = 0
    for j, token in enumerate(draft):
        if t + j >= len(output) or token != output[t + j]:
            break
        m += 1
    return min(m, len(output) - 1 - t)


def test_output_is_plain_greedy(tiny_model, recordings) -> None:
    recs, notes = recordings
    for rec in recs:
        expected = tiny_model.generate(
            torch.tensor([rec.prompt.input_ids]), max_new_tokens=24, do_sample=False, eos_token_id=47, pad_token_id=0
        )[0, len(rec.prompt.input_ids) :].numpy()
        assert rec.output.tolist() == expected[: len(rec.output)].tolist()
        assert rec.layer_argmax[:, -1].tolist() == rec.output.tolist()  # the last "exit" is the full model
    assert notes["generated_tokens"] == sum(len(r.output) for r in recs)


def test_prompt_lookup_match_len_brute_force(recordings) -> None:
    recs, _ = recordings
    traces = prompt_lookup_traces(recs, K_MAX, max_ngram=3, min_ngram=1)
    total_hits = 0
    for rec, trace in zip(recs, traces, strict=True):
        tokens = np.concatenate([rec.prompt.input_ids, rec.output])
        for t in range(len(rec.output)):
            draft, n = propose(tokens[: len(rec.prompt.input_ids) + t], 3, 1, num_tokens=K_MAX)
            assert trace.draft_avail[0, t] == len(draft)
            assert trace.ngram_len[0, t] == n
            assert trace.match_len[0, t] == _count(draft.tolist(), rec.output, t)
            total_hits += int(trace.match_len[0, t] > 0)
    assert total_hits > 0  # the case is not vacuous


def test_early_exit_match_len_brute_force(tiny_model, recordings) -> None:
    recs, _ = recordings
    traces = early_exit_traces(recs, LAYERS, K_MAX)
    for rec, trace in zip(recs, traces, strict=True):
        assert trace.layer_agree.shape == (len(rec.output), 4)
        for v, layer in enumerate(LAYERS):
            for t in range(len(rec.output)):
                prefix = list(rec.prompt.input_ids) + rec.output[:t].tolist()
                draft = _greedy_draft(tiny_model, prefix, layer, K_MAX)
                assert trace.match_len[v, t] == _count(draft, rec.output, t), (layer, t)
        assert np.all(trace.draft_prob > 0) and np.all(trace.draft_prob <= 1)
        assert np.all(trace.kl >= 0) and np.all(trace.draft_entropy >= 0)


def test_traces_round_trip(tmp_path, recordings) -> None:
    recs, _ = recordings
    trace_set = TraceSet(early_exit_traces(recs, LAYERS, K_MAX), "early_exit", K_MAX, list(LAYERS), 4, "tiny")
    trace_set.save(tmp_path / "t.npz")
    loaded = TraceSet.load(tmp_path / "t.npz")
    for a, b in zip(trace_set, loaded, strict=True):
        assert np.array_equal(a.match_len, b.match_len)
        assert np.array_equal(a.layer_agree, b.layer_agree)


def test_run_lengths() -> None:
    assert run_lengths(np.array([True, True, False, True, True, True])).tolist() == [2, 1, 0, 3, 2, 1]
    assert run_lengths(np.zeros(0, dtype=bool)).tolist() == []


def test_cli_rejects_unknown_drafter() -> None:
    with pytest.raises(SystemExit, match="unknown"):
        record_main(["--drafter", "medusa", "--out", "x.npz"])
    with pytest.raises(SystemExit, match="drafter"):
        record_main(["--drafter", "prompt_lookup,early_exit", "--out", "x.npz"])
