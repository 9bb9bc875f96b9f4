"""adaptk.adapters.hf: adaptive draft lengths inside Hugging Face ``model.generate``.

Tiny random Llama models (no download) cover every drafting mode, restoration and accounting;
the ``model``-marked tests repeat the output checks on the real SmolLM2-135M.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import adaptk  # noqa: E402
import adaptk.adapters.hf as ahf  # noqa: E402
from adaptk.guard import ControllerFallbackWarning  # noqa: E402

MODES = {
    "assistant": lambda draft: {"assistant_model": draft},
    "prompt_lookup": lambda draft: {"prompt_lookup_num_tokens": 6},
    "early_exit": lambda draft: {"assistant_early_exit": 2},
}


class Cycle(adaptk.SpeculationController):
    """Test controller: cycles through ``lengths``, one per step (so ``k`` changes every step)."""

    def __init__(self, lengths: tuple[int, ...] = (0, 1, 4, 2, 6, 3)) -> None:
        super().__init__()
        self.lengths = lengths
        self._i = 0
        self.contexts: list[adaptk.StepContext] = []

    def _decide(self, context):
        self.contexts.append(context)
        k = self.lengths[self._i % len(self.lengths)]
        self._i += 1
        return adaptk.Decision(np.full(len(context.seq_ids), min(k, context.k_max), dtype=np.int64))


class StopAfterFirst(adaptk.StopRule):
    def __init__(self) -> None:
        self.calls: list[tuple[int, float]] = []

    def should_stop(self, seq_ids, position, draft_probs, draft_entropies=None):
        self.calls.append((position, float(draft_probs[0])))
        return np.array([position >= 0])


class CycleWithStop(Cycle):
    required_signals = frozenset({"draft_probs", "draft_entropies"})

    def __init__(self, lengths: tuple[int, ...] = (4,)) -> None:
        super().__init__(lengths)
        self._rule = StopAfterFirst()

    @property
    def stop_rule(self):
        return self._rule


class Broken(Cycle):
    def _decide(self, context):
        if len(self.contexts) >= 3:
            raise RuntimeError("controller bug")
        return super()._decide(context)


def _tiny(seed: int, layers: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.5,  # peaked logits: no near-ties
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    # Every call here passes eos_token_id=None, yet an assistant stops drafting at its own
    # generation config's EOS (seen on transformers 5.25), so a drafter asked for k tokens could
    # deliver fewer; with no EOS anywhere it delivers k, which the tests check.
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def target():
    return _tiny(0, layers=4)


@pytest.fixture(scope="module")
def draft():
    return _tiny(1, layers=2)


@pytest.fixture(scope="module")
def prompt():
    # a repeated stretch so that prompt lookup finds matches
    rng = np.random.default_rng(3)
    body = rng.integers(2, 96, size=10).tolist()
    return torch.tensor([body + body[:6] + rng.integers(2, 96, size=4).tolist()])


GREEDY = dict(max_new_tokens=40, do_sample=False, eos_token_id=None)


def _configs(*models) -> list[dict]:
    return [copy.deepcopy(m.generation_config.to_dict()) for m in models] + [m.config.to_dict() for m in models]


def _clean(model) -> bool:
    return not ({"generate", "_get_candidate_generator", "_adaptk_session"} & set(vars(model)))


@pytest.mark.parametrize("mode", sorted(MODES))
def test_greedy_identical_with_changing_k(target, draft, prompt, mode):
    plain = target.generate(prompt, **GREEDY)
    before = _configs(target, draft)
    controller = Cycle()
    with ahf.speculate(target, controller) as session:
        out = target.generate(prompt, **GREEDY, **MODES[mode](draft))
    assert torch.equal(out, plain)
    assert _configs(target, draft) == before and _clean(target)
    # the feedback is what happened: every step emits accepted + 1 tokens
    feedback = session.feedback
    assert sum(int(f.num_accepted_tokens[0]) + 1 for f in feedback) == out.shape[1] - prompt.shape[1]
    decided = [int(c_k) for c_k in (min(controller.lengths[i % 6], c.k_max) for i, c in enumerate(controller.contexts))]
    assert len(decided) == len(feedback)
    assert all(f.num_draft_tokens[0] <= k for f, k in zip(feedback, decided, strict=False))
    # the first step also ran the prompt: untimed; every later one is a decode step's time
    assert feedback[0].draft_time_s == feedback[0].verify_time_s == 0.0
    assert all(f.draft_time_s >= 0 and f.verify_time_s > 0 for f in feedback[1:])
    assert [c.step for c in controller.contexts] == [f.step for f in feedback]
    assert all(c.context_lens[0] == prompt.shape[1] + sum(int(f.num_accepted_tokens[0]) + 1 for f in feedback[:i])
               for i, c in enumerate(controller.contexts))
    if mode != "prompt_lookup":  # model drafters always deliver what was asked
        assert [int(f.num_draft_tokens[0]) for f in feedback] == decided
    if mode == "early_exit":
        assert {c.exit_layers for c in controller.contexts} == {(2,)} and controller.contexts[0].num_layers == 4


def test_high_acceptance_and_final_truncation(target, prompt):
    """An assistant identical to the target accepts everything; the last step is cut at max_length."""
    twin = copy.deepcopy(target)
    plain = target.generate(prompt, max_new_tokens=13, do_sample=False, eos_token_id=None)
    with ahf.speculate(target, "fixed", k=5) as session:
        out = target.generate(prompt, max_new_tokens=13, do_sample=False, eos_token_id=None, assistant_model=twin)
    assert torch.equal(out, plain)
    steps = [(int(f.num_draft_tokens[0]), int(f.num_accepted_tokens[0])) for f in session.feedback]
    assert steps[:2] == [(5, 5), (5, 5)]  # 12 tokens; the last draft is capped by max_length: 0 left
    assert sum(a + 1 for _, a in steps) == 13


def test_prompt_lookup_hints_say_what_lookup_offers(target, prompt):
    controller = Cycle(lengths=(6,))
    with ahf.speculate(target, controller, k_max=6) as session:
        target.generate(prompt, **GREEDY, prompt_lookup_num_tokens=6)
    for context, feedback in zip(controller.contexts, session.feedback, strict=False):
        offered = int(context.draft_available[0])
        assert int(feedback.num_draft_tokens[0]) == min(offered, context.k_max)
        assert (context.match_ngram_lens[0] > 0) == (offered > 0)
    assert any(c.draft_available[0] > 0 for c in controller.contexts)


def test_k_max_defaults(target, draft, prompt):
    for kwargs, expected in (({"prompt_lookup_num_tokens": 5}, 5), ({"assistant_model": draft}, ahf.DEFAULT_K_MAX)):
        controller = Cycle()
        with ahf.speculate(target, controller):
            target.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, **kwargs)
        assert controller.contexts[0].k_max == expected
    controller = Cycle()
    with ahf.speculate(target, controller, k_max=3):
        target.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, assistant_model=draft)
    assert {c.k_max for c in controller.contexts} <= {3, 2, 1, 0}


def test_hf_schedule_and_confidence_stop_are_off(target, prompt):
    """HF's schedule and confidence stop would change or cut drafts; under the adapter k is exact."""
    twin = copy.deepcopy(target)  # drafts exactly the target's tokens: never an EOS, never rejected
    twin.generation_config.num_assistant_tokens_schedule = "heuristic"
    twin.generation_config.assistant_confidence_threshold = 0.99
    before = _configs(twin)
    controller = Cycle(lengths=(4,))
    with ahf.speculate(target, controller) as session:
        target.generate(prompt, **GREEDY, assistant_model=twin)
    drafted = [int(f.num_draft_tokens[0]) for f in session.feedback]
    assert drafted == [min(4, c.k_max) for c in controller.contexts] and drafted.count(4) > 3
    assert _configs(twin) == before  # HF's heuristic carry-over did not write into the assistant


@pytest.mark.parametrize("mode", ["assistant", "early_exit"])
def test_stop_rule_and_signals(target, draft, prompt, mode):
    controller = CycleWithStop()
    plain = target.generate(prompt, **GREEDY)
    with ahf.speculate(target, controller) as session:
        out = target.generate(prompt, **GREEDY, **MODES[mode](draft))
    assert torch.equal(out, plain)
    assert {int(f.num_draft_tokens[0]) for f in session.feedback[:-1]} == {1}  # stopped after one token
    assert controller.stop_rule.calls and all(0 <= p <= 1 for _, p in controller.stop_rule.calls)
    f = session.feedback[0]
    assert f.draft_probs.shape == (1, 1) and 0 < f.draft_probs[0, 0] <= 1 and f.draft_entropies[0, 0] >= 0


@pytest.mark.parametrize("mode", sorted(MODES))
def test_controller_exception_falls_back(target, draft, prompt, mode):
    plain = target.generate(prompt, **GREEDY)
    with pytest.warns(ControllerFallbackWarning, match="controller bug"):
        with ahf.speculate(target, Broken(), fallback_k=2) as session:
            out = target.generate(prompt, **GREEDY, **MODES[mode](draft))
    assert session.failed and torch.equal(out, plain)


class _Boom(transformers.StoppingCriteria):
    def __init__(self, after: int) -> None:
        self.after, self.calls = after, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt("user stop")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_everything_restored_after_an_exception(target, draft, prompt, mode):
    before = _configs(target, draft)
    layers = target.model.config.num_hidden_layers
    from transformers import StoppingCriteriaList

    with pytest.raises(KeyboardInterrupt):
        with ahf.speculate(target, Cycle()):
            target.generate(prompt, **GREEDY, stopping_criteria=StoppingCriteriaList([_Boom(3)]), **MODES[mode](draft))
    assert _configs(target, draft) == before and _clean(target)
    assert target.model.config.num_hidden_layers == layers
    assert target.generate.__func__ is type(target).generate


def test_early_exit_depth_restored_when_drafting_fails(target, prompt):
    """HF's early exit changes num_hidden_layers without try/finally; the adapter puts it back."""
    calls = {"n": 0}

    def hook(module, args):
        calls["n"] += 1
        if calls["n"] > 4:
            raise RuntimeError("layer failed")

    handle = target.model.layers[0].register_forward_pre_hook(hook)
    try:
        with pytest.raises(RuntimeError, match="layer failed"):
            with ahf.speculate(target, "fixed", k=3):
                target.generate(prompt, **GREEDY, assistant_early_exit=2)
    finally:
        handle.remove()
    assert target.model.config.num_hidden_layers == 4


def test_sampling_is_reproducible_under_a_seed(target, draft, prompt):
    for mode in ("assistant", "prompt_lookup"):
        outs = []
        for _ in range(2):
            torch.manual_seed(123)
            with ahf.speculate(target, Cycle()):
                outs.append(target.generate(prompt, max_new_tokens=30, do_sample=True, eos_token_id=None,
                                            **MODES[mode](draft)))
        assert torch.equal(outs[0], outs[1])
        assert outs[0].shape[1] == prompt.shape[1] + 30


def test_learned_state_stays_in_the_controller(target, draft, prompt):
    twin = copy.deepcopy(target)  # every draft accepted: the heuristic grows k
    controller = adaptk.make("hf-heuristic", initial_k=2)
    before = _configs(target, twin)
    with ahf.speculate(target, controller, k_max=8):
        target.generate(prompt, **GREEDY, assistant_model=twin)
    learned = controller.state_dict()["state"]["_last_k"]
    assert learned > 2
    with ahf.speculate(target, controller, k_max=8) as session:  # reused: starts from what it learned
        target.generate(prompt, max_new_tokens=5, do_sample=False, eos_token_id=None, assistant_model=twin)
    assert int(session.feedback[0].num_draft_tokens[0]) == min(learned, 4)  # capped by max_length
    assert _configs(target, twin) == before
    assert controller._k == {}  # sequences were ended


def test_one_call_generate_and_controller_specs(target, draft, prompt):
    plain = target.generate(prompt, **GREEDY)
    for controller in (adaptk.make("fixed", k=3), {"name": "fixed", "params": {"k": 3}}, '{"name": "fixed"}', None):
        out = ahf.generate(target, prompt, controller=controller, assistant_model=draft, **GREEDY)
        assert torch.equal(out, plain) and _clean(target)
    with pytest.raises(TypeError):
        with ahf.speculate(target, adaptk.make("fixed"), k=3):
            pass


def test_default_controller_is_the_flagship_only_when_registered():
    name = ahf._resolve_controller(None, {}).name
    assert name == ("adaptk" if "adaptk" in adaptk.available() else "hf-heuristic")


def test_blocks_do_not_nest_and_plain_generate_passes_through(target, prompt):
    plain = target.generate(prompt, **GREEDY)
    with ahf.speculate(target, "fixed") as session:
        with pytest.raises(RuntimeError, match="already active"):
            with ahf.speculate(target, "fixed"):
                pass
        assert torch.equal(target.generate(prompt, **GREEDY), plain)  # no drafting mode: untouched
    assert session.feedback == [] and _clean(target)


def test_version_check():
    ahf.check_transformers_version()
    ahf.check_transformers_version("5.19.0")
    for bad in ("4.57.1", "6.0.0", "5.18.0"):
        with pytest.raises(RuntimeError, match="supports transformers"):
            ahf.check_transformers_version(bad)


def _left_padded_batch(rows: list[list[int]], pad: int) -> dict:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_batch_of_four_equals_plain_batched_greedy(target, draft, prompt, mode):
    pytest.importorskip("adaptk.decoding.reference")
    base = prompt[0].tolist()
    rows = [base, base[3:], base[:12] + base[:5], base[5:17]]
    batch = _left_padded_batch(rows, pad=1)
    plain = target.generate(**batch, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=1)
    with ahf.speculate(target, Cycle()) as session:
        out = target.generate(**batch, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=1,
                              **MODES[mode](draft))
    assert torch.equal(out, plain)
    assert _clean(target)
    del session


# -- the real model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    from adaptk.decoding.models import load_model

    return load_model("smollm2-135m-instruct")


SMOL_PROMPTS = [
    "Summarize in one sentence: The Eiffel Tower was built for the 1889 World's Fair in Paris. It was the tallest "
    "man-made structure in the world until 1930 and is now one of the most visited monuments.",
    "Write a Python function that returns the factorial of n.",
]


@pytest.mark.model
@pytest.mark.parametrize("mode", ["prompt_lookup", "early_exit"])
def test_smollm2_greedy_identical(smollm2, mode):
    model, tokenizer = smollm2
    kwargs = {"prompt_lookup_num_tokens": 8} if mode == "prompt_lookup" else {"assistant_early_exit": 24}
    for text in SMOL_PROMPTS:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)
        plain = model.generate(**chat, max_new_tokens=48, do_sample=False)
        before = _configs(model)
        controller = Cycle(lengths=(0, 3, 8, 1, 5))
        with ahf.speculate(model, controller) as session:
            out = model.generate(**chat, max_new_tokens=48, do_sample=False, **kwargs)
        assert torch.equal(out, plain), tokenizer.decode(out[0, chat["input_ids"].shape[1]:])
        assert _configs(model) == before and _clean(model)
        assert sum(int(f.num_accepted_tokens[0]) + 1 for f in session.feedback) == out.shape[1] - chat["input_ids"].shape[1]


@pytest.mark.model
def test_smollm2_batch_of_four(smollm2):
    pytest.importorskip("adaptk.decoding.reference")
    model, tokenizer = smollm2
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
             for t in SMOL_PROMPTS + ["What is the capital of France?", "List three colours."]]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    plain = model.generate(**batch, max_new_tokens=32, do_sample=False)
    with ahf.speculate(model, "hf-heuristic", initial_k=4):
        out = model.generate(**batch, max_new_tokens=32, do_sample=False, prompt_lookup_num_tokens=8)
    assert torch.equal(out, plain)


def test_no_warnings_from_the_adapter_itself(target, draft, prompt):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ControllerFallbackWarning)
        with ahf.speculate(target, "fixed", k=2):
            target.generate(prompt, **GREEDY, assistant_model=draft)
