"""Reference decoder: greedy identity with ragged k, rollback, continuous batching, bad inputs, feedback."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import adaptk  # noqa: E402
from adaptk.core import StopRule  # noqa: E402
from adaptk.decoding import DraftModelDrafter, EarlyExitDrafter, PromptLookupDrafter, SpeculativeDecoder  # noqa: E402
from adaptk.decoding.kv import ModelRunner  # noqa: E402
from adaptk.guard import ControllerFallbackWarning  # noqa: E402

VOCAB = 64


def tiny_llama(num_layers: int = 4, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    params = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    params.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**params)).eval()


def truncated_copy(model, num_layers: int):
    """A draft model: the target's first layers (same tokenizer, partial agreement)."""
    draft = tiny_llama(num_layers)
    draft.load_state_dict(model.state_dict(), strict=False)
    return draft.eval()


class RaggedRandom(adaptk.SpeculationController):
    """Test controller: seeded random k in [0, k_max] per sequence per step, random exit layer."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._feedback = []

    def _decide(self, context):
        k = self._rng.integers(0, context.k_max + 1, len(context.seq_ids))
        layer = None if context.exit_layers is None else int(self._rng.choice(context.exit_layers))
        return adaptk.Decision(k, exit_layer=layer)

    def _update(self, feedback):
        self._feedback.append(feedback)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    out = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (7, 12, 3, 20)]
    out[0] = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]  # prompt lookup finds something to copy
    return out


def hf_greedy(model, prompt, n):
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def reference(model, prompts):
    return [hf_greedy(model, p, 24) for p in prompts]


def drafters(model):
    return {
        "prompt_lookup": lambda: PromptLookupDrafter(max_ngram=3),
        "early_exit": lambda: EarlyExitDrafter(exit_layers=(1, 2, 3)),
        "draft_model": lambda: DraftModelDrafter(truncated_copy(model, 2)),
    }


@pytest.mark.parametrize("kind", ["prompt_lookup", "early_exit", "draft_model"])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_ragged_k_matches_generate(model, prompts, reference, kind, batch):
    controller = RaggedRandom(seed=batch)
    decoder = SpeculativeDecoder(model, drafter=drafters(model)[kind](), controller=controller, k_max=5)
    chosen = prompts[:batch]
    result = decoder.generate(chosen, max_new_tokens=24, eos_token_id=None)
    assert [r.tokens for r in result] == reference[:batch]
    drafted = np.concatenate([f.num_draft_tokens for f in controller._feedback])
    assert drafted.max() > 0 and len(set(drafted.tolist())) > 1  # really ragged, really speculative
    assert sum(r.num_accepted_tokens for r in result) > 0


def test_rollback_equals_clean_recompute(model):
    """Feed ragged drafts, roll rows back to different lengths, continue: logits match a clean run.

    Tolerance: 1e-5 absolute on logits of magnitude ~1 (float32; measured ~1e-7).
    """
    runner = ModelRunner(model)
    runner.allocate(rows=3, capacity=40)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g) for n in (6, 9, 4)]
    lens = torch.tensor([len(s) for s in seqs])
    width = int(lens.max())
    ids = torch.zeros(3, width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    runner.forward(torch.zeros(3, dtype=torch.long), slice(0, 3), input_ids=ids, head=False)
    # speculative step: 5 tokens per row (garbage drafts), then keep 0 / 2 / 4 of them
    junk = torch.randint(0, VOCAB, (3, 5), generator=g)
    runner.forward(lens, slice(0, 3), input_ids=junk)
    keep = [0, 2, 4]
    seqs = [torch.cat([s, junk[i, :keep[i]]]) for i, s in enumerate(seqs)]
    frontier = torch.tensor([len(s) for s in seqs])
    nxt = torch.randint(0, VOCAB, (3, 3), generator=g)
    got, _ = runner.forward(frontier, slice(0, 3), input_ids=nxt)
    for i, s in enumerate(seqs):
        with torch.inference_mode():
            want = model(torch.cat([s, nxt[i]])[None]).logits[0, -3:]
        assert torch.allclose(got[i], want, atol=1e-5), (got[i] - want).abs().max()


def test_continuous_batching_matches_running_alone(model, prompts):
    """Per-request budgets make sequences leave at different times; late arrivals join mid-run."""
    lengths = [24, 10, 17, 5]
    alone = [hf_greedy(model, p, n) for p, n in zip(prompts, lengths, strict=True)]
    decoder = SpeculativeDecoder(model, drafter=PromptLookupDrafter(), controller=RaggedRandom(seed=5), k_max=4)
    result = decoder.generate(prompts, max_new_tokens=lengths, concurrency=2, arrival_times=[0.0, 0.0, 0.05, 0.2],
                              eos_token_id=None)
    assert [r.tokens for r in result] == alone
    assert all(r.start_time_s >= r.arrival_time_s and r.finish_reason == "length" for r in result)
    assert result[3].start_time_s >= 0.2
    assert max(s.batch_size for s in result.steps) == 2


def test_sequences_finish_at_different_times_with_eos(model, prompts, reference):
    # make eos a token that appears early in one reference output: that sequence stops there
    eos = reference[1][6]
    decoder = SpeculativeDecoder(model, drafter=PromptLookupDrafter(), controller=RaggedRandom(seed=2), k_max=4)
    result = decoder.generate(prompts, max_new_tokens=24, concurrency=3, arrival_times=[0, 0.01, 0.02, 0.03],
                              eos_token_id=eos)
    for r, ref in zip(result, reference, strict=True):
        if eos in ref:
            cut = ref.index(eos) + 1
            assert r.tokens == ref[:cut] and r.finish_reason == "eos"
        else:
            assert r.tokens == ref and r.finish_reason == "length"
        # every step emits accepted + 1 tokens; only an eos cuts the last step short
        assert r.num_steps + r.num_accepted_tokens == len(r.tokens) + r.num_truncated
        assert r.num_truncated == 0 or r.finish_reason == "eos"


def test_feedback_sums_match_output(model, prompts):
    controller = RaggedRandom(seed=9)
    decoder = SpeculativeDecoder(model, drafter=EarlyExitDrafter(exit_layers=(2,)), controller=controller, k_max=4)
    result = decoder.generate(prompts, max_new_tokens=20, eos_token_id=None)
    emitted = {}
    for f in controller._feedback:
        assert np.all(f.num_accepted_tokens <= f.num_draft_tokens)
        assert f.draft_time_s >= 0 and f.verify_time_s > 0
        for sid, a in zip(f.seq_ids.tolist(), f.num_accepted_tokens.tolist(), strict=True):
            emitted[sid] = emitted.get(sid, 0) + a + 1
    for r in result:
        assert emitted[r.seq_id] == len(r.tokens) == 20
    assert len(result.steps) == len(controller._feedback)
    assert result.token_goodput > 0 and 0 <= result.overhead_fraction < 1


class SignalController(RaggedRandom):
    required_signals = frozenset({"draft_probs", "draft_entropies", "kl_divergences", "layer_agreement"})


class StopAfterFirst(StopRule):
    def __init__(self):
        self.calls = []

    def should_stop(self, seq_ids, position, draft_probs, draft_entropies=None):
        self.calls.append((position, np.asarray(draft_probs).copy()))
        return np.ones(len(seq_ids), dtype=bool)


class StoppingController(RaggedRandom):
    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self._rule = StopAfterFirst()

    @property
    def stop_rule(self):
        return self._rule


def test_signals_early_exit(model, prompts):
    controller = SignalController(seed=4)
    decoder = SpeculativeDecoder(model, drafter=EarlyExitDrafter(exit_layers=(1, 2, 3)), controller=controller, k_max=4)
    decoder.generate(prompts, max_new_tokens=16, eos_token_id=None)
    seen = 0
    for f in controller._feedback:
        assert f.exit_layer in (1, 2, 3)
        assert f.layer_matches.shape == (len(f.seq_ids), 4)
        assert np.all(f.layer_compared[:, [0, 1, 2]] == (f.num_accepted_tokens + 1)[:, None])
        assert np.all(f.layer_compared[:, 3] == 0)  # only the exit layers are scored
        # the exit layer's shadow tokens are the drafts: the accepted ones all match
        col = f.layer_matches[:, f.exit_layer - 1]
        drafted = f.num_draft_tokens > 0
        assert np.all(col[drafted] >= f.num_accepted_tokens[drafted])
        if f.num_draft_tokens.max() == 0:  # nothing drafted: no draft signals, layers still scored
            assert f.draft_probs is None
            continue
        for name in ("draft_probs", "draft_entropies"):
            sig = getattr(f, name)
            assert sig is not None and sig.shape[0] == len(f.seq_ids)
            mask = np.arange(sig.shape[1])[None, :] < f.num_draft_tokens[:, None]
            assert np.all(np.isfinite(sig[mask])) and np.all(np.isnan(sig[~mask]))
            seen += mask.sum()
        assert np.all(f.draft_probs[~np.isnan(f.draft_probs)] <= 1)
    assert seen > 0
    assert any(f.num_draft_tokens.max() == 0 for f in controller._feedback)


def test_signals_draft_model_and_stop_rule(model, prompts, reference):
    controller = SignalController(seed=6)
    decoder = SpeculativeDecoder(model, drafter=DraftModelDrafter(truncated_copy(model, 2)), controller=controller, k_max=4)
    result = decoder.generate(prompts, max_new_tokens=24, eos_token_id=None)
    assert [r.tokens for r in result] == reference
    kls = [f.kl_divergences for f in controller._feedback if f.num_draft_tokens.max() > 0]
    assert kls and all(np.all(k[~np.isnan(k)] >= 0) for k in kls)
    assert all(f.layer_matches is None for f in controller._feedback)

    stopping = StoppingController(seed=6)
    decoder = SpeculativeDecoder(model, drafter=DraftModelDrafter(truncated_copy(model, 2)), controller=stopping, k_max=4)
    result = decoder.generate(prompts, max_new_tokens=24, eos_token_id=None)
    assert [r.tokens for r in result] == reference
    assert stopping._rule.calls and all(pos == 0 for pos, _ in stopping._rule.calls)
    assert max(f.num_draft_tokens.max() for f in stopping._feedback) == 1


def test_raising_controller_falls_back_and_output_is_greedy(model, prompts, reference):
    class Broken(adaptk.SpeculationController):
        def _decide(self, context):
            if context.step >= 2:
                raise RuntimeError("boom")
            return adaptk.Decision(np.ones(len(context.seq_ids), dtype=np.int64))

    decoder = SpeculativeDecoder(model, drafter=PromptLookupDrafter(), controller=Broken(), k_max=4)
    with pytest.warns(ControllerFallbackWarning):
        result = decoder.generate(prompts, max_new_tokens=24, eos_token_id=None)
    assert result.controller_failed
    assert [r.tokens for r in result] == reference


def test_registry_specs_and_plain_decoding(model, prompts, reference):
    for spec in ("fixed", {"name": "fixed", "params": {"k": 0}}, '{"name": "fixed", "params": {"k": 3}}'):
        decoder = SpeculativeDecoder(model, drafter=EarlyExitDrafter(exit_layers=(2,)), controller=spec, k_max=4)
        result = decoder.generate(prompts[:2], max_new_tokens=24, eos_token_id=None)
        assert [r.tokens for r in result] == reference[:2]
    plain = SpeculativeDecoder(model, controller={"name": "fixed", "params": {"k": 0}})
    result = plain.generate(prompts, max_new_tokens=24, eos_token_id=None)
    assert all(s.num_draft_tokens == 0 for s in result.steps)
    assert all(r.num_steps == 24 for r in result)


# -- bad inputs ------------------------------------------------------------------------------------
def test_bad_prompts(model):
    decoder = SpeculativeDecoder(model)
    with pytest.raises(ValueError, match="empty"):
        decoder.generate([[1, 2], []])
    with pytest.raises(ValueError, match="context"):
        decoder.generate([[1] * 128])
    with pytest.raises(ValueError, match="vocabulary"):
        decoder.generate([[1, VOCAB]])
    with pytest.raises(ValueError, match="non-empty list"):
        decoder.generate([])
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoder.generate([[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="arrival_times"):
        decoder.generate([[1]], arrival_times=[0.0, 1.0])
    with pytest.raises(ValueError, match="top_p"):
        decoder.generate([[1]], top_p=0)
    with pytest.raises(ValueError, match="k_max"):
        SpeculativeDecoder(model, k_max=-1)


def test_mismatched_draft_tokenizer(model):
    with pytest.raises(ValueError, match="vocabulary"):
        SpeculativeDecoder(model, drafter=DraftModelDrafter(tiny_llama(2, vocab_size=VOCAB + 1)))
    target = tiny_llama(eos_token_id=3)
    with pytest.raises(ValueError, match="eos_token_id"):
        SpeculativeDecoder(target, drafter=DraftModelDrafter(tiny_llama(2, eos_token_id=4)))
    with pytest.raises(ValueError, match="exit_layers"):
        SpeculativeDecoder(model, drafter=EarlyExitDrafter(exit_layers=(4,)))


def test_non_causal_model_rejected():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    with pytest.raises(ValueError, match="not a supported causal LM|not a decoder-only"):
        SpeculativeDecoder(transformers.BertForMaskedLM(config).eval())
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(vocab_size=VOCAB, d_model=16, d_ff=32,
                                                                      num_layers=1, num_heads=2, d_kv=8))
    with pytest.raises(ValueError, match="decoder-only"):
        SpeculativeDecoder(t5)


# -- the real model ----------------------------------------------------------------------------------
@pytest.mark.model
@pytest.mark.parametrize("kind", ["prompt_lookup", "early_exit"])
def test_smollm2_specbench_greedy_identity(kind):
    from adaptk.decoding.models import load_model
    from adaptk.record import load_prompts

    smol, tokenizer = load_model("smollm2-135m-instruct")
    prompts = [list(p.input_ids) for p in load_prompts(tokenizer, per_task=1)][:4]
    drafter = PromptLookupDrafter() if kind == "prompt_lookup" else EarlyExitDrafter(exit_layers=(12, 24))
    decoder = SpeculativeDecoder(smol, drafter=drafter, controller=RaggedRandom(seed=0), k_max=6)
    result = decoder.generate(prompts, max_new_tokens=32)
    for p, r in zip(prompts, result, strict=True):
        with torch.inference_mode():
            want = smol.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False)[0, len(p):].tolist()
        assert r.tokens == want[: len(r.tokens)] and (len(r.tokens) == len(want))


@pytest.mark.model
def test_reference_bench_reports_each_task_beside_its_replay_prediction(tmp_path):
    from adaptk.bench.reference import run_reference_bench

    rows = run_reference_bench(["adaptk"], [2], suite="tasks", out_dir=tmp_path, per_task=2, max_new_tokens=8,
                               log=lambda msg: None)
    tasks = {r["workload"].split("/")[1] for r in rows}
    assert tasks == {"mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"}
    assert {r["controller"] for r in rows} == {"fixed(k=0)", "adaptk"}
    for r in rows:
        assert r["engine"] == "reference" and r["num_requests"] == 2 and r["num_tokens"] == 16
        assert r["token_goodput"] > 0 and r["predicted_token_goodput"] > 0
        if r["controller"] == "fixed(k=0)":
            assert r["relative_to_plain"] == 1.0 and r["mean_num_draft_tokens"] == 0
    assert (tmp_path / "reference.json").is_file()
