"""adaptk controllers driving a real vLLM engine (``adaptk.adapters.vllm``).

The engine tests (marked ``vllm``) run a real vLLM engine in-process on the CPU and need the vLLM
environment (``scripts/install_vllm_env.sh``)::

    .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_adapter.py

They skip with a reason where vLLM is not importable. The argument-building tests at the top need
no vLLM and run everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

# Must be set before vLLM is imported: in-process engine core, 1 GiB of KV cache.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import adaptk  # noqa: E402
from adaptk import Decision  # noqa: E402
from adaptk.adapters import vllm as adapter  # noqa: E402
from adaptk.guard import ControllerFallbackWarning  # noqa: E402

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAVE_VLLM, reason="vllm is not importable (run in the vLLM environment: scripts/install_vllm_env.sh)"
)


# ------------------------------------------------------------------------------------------
# Deterministic test controllers (registered once; visible to the in-process engine core)
# ------------------------------------------------------------------------------------------
def _register(name):
    def decorator(cls):
        try:
            return adaptk.register(name)(cls)
        except ValueError:  # module imported twice (e.g. by doctest collection)
            return adaptk.get_class(name)

    return decorator


@_register("test-vllm-cycle")
class CycleCaps(adaptk.SpeculationController):
    """Per-sequence K = (step + seq_id) % period, capped at k_max; logs decisions and feedback."""

    def __init__(self, period: int = 4) -> None:
        super().__init__()
        self.period = period
        self._decisions: dict[int, dict[int, int]] = {}
        self._feedback: list[dict] = []
        self._contexts: list[tuple] = []
        self._offered: dict[int, dict[int, int]] = {}  # step -> seq_id -> drafts on offer (n-gram)
        self._matched: dict[int, dict[int, int]] = {}  # step -> seq_id -> matched n-gram length
        self._events: list[tuple[str, object]] = []  # ("decide", seq_ids) / ("update", step time), in order

    def _decide(self, context):
        ks = np.minimum((context.step + context.seq_ids) % self.period, context.k_max)
        self._decisions[int(context.step)] = dict(zip(context.seq_ids.tolist(), ks.tolist(), strict=True))
        if context.draft_available is not None:
            offered = context.draft_available.tolist()
            self._offered[int(context.step)] = dict(zip(context.seq_ids.tolist(), offered, strict=True))
        if context.match_ngram_lens is not None:
            matched = context.match_ngram_lens.tolist()
            self._matched[int(context.step)] = dict(zip(context.seq_ids.tolist(), matched, strict=True))
        self._contexts.append((context.seq_ids.tolist(), context.context_lens.tolist(), context.k_max))
        self._events.append(("decide", context.seq_ids.tolist()))
        return Decision(ks)

    def _update(self, feedback):
        self._feedback.append(
            {
                "seq_ids": feedback.seq_ids.tolist(),
                "drafted": feedback.num_draft_tokens.tolist(),
                "accepted": feedback.num_accepted_tokens.tolist(),
                "decision_steps": np.asarray(feedback.extra["decision_steps"]).tolist(),
                "time": feedback.step_time_s,
            }
        )
        self._events.append(("update", feedback.step_time_s))


@_register("test-vllm-raise")
class RaiseAfter(adaptk.SpeculationController):
    """Decides K=1 for ``calls`` steps, then raises in ``where`` ("decide" or "update")."""

    def __init__(self, calls: int = 4, where: str = "decide") -> None:
        super().__init__()
        self.calls = calls
        self.where = where
        self._n = 0

    def _decide(self, context):
        self._n += 1
        if self.where == "decide" and self._n > self.calls:
            raise RuntimeError("test controller failure")
        return Decision(np.ones(len(context.seq_ids), dtype=np.int64))

    def _update(self, feedback):
        if self.where == "update" and self._n > self.calls:
            raise RuntimeError("test controller failure in update")


# ------------------------------------------------------------------------------------------
# No vLLM needed: argument building
# ------------------------------------------------------------------------------------------
def test_engine_kwargs_carry_a_json_spec():
    kw = adapter.engine_kwargs("fixed", method="ngram", k_max=5, controller_params={"k": 3}, prompt_lookup_max=4)
    assert kw["scheduler_cls"] == "adaptk.adapters.vllm.AdaptkScheduler"
    spec = kw["speculative_config"]
    assert spec["method"] == "ngram" and spec["num_speculative_tokens"] == 5 and spec["prompt_lookup_max"] == 4
    settings = kw["additional_config"]["adaptk"]
    assert settings == {"controller": {"name": "fixed", "params": {"k": 3}}, "fallback_k": 2}
    json.dumps(kw["additional_config"])  # data only
    assert adaptk.from_spec(settings["controller"]).k == 3


def test_capture_schedule_lists_every_k():
    schedule = adapter.engine_kwargs("fixed", k_max=6)["speculative_config"]["num_speculative_tokens_per_batch_size"]
    assert sorted(entry[2] for entry in schedule) == list(range(7))
    assert schedule[0][0] == 1
    assert all(a[1] < b[0] for a, b in zip(schedule, schedule[1:], strict=False))


def test_serve_args_match_engine_kwargs():
    args = adapter.serve_args("hf-heuristic", method="draft_model", k_max=4, draft_model="/models/draft")
    kw = adapter.engine_kwargs("hf-heuristic", method="draft_model", k_max=4, draft_model="/models/draft")
    flags = dict(zip(args[::2], args[1::2], strict=True))
    assert flags["--scheduler-cls"] == kw["scheduler_cls"]
    assert json.loads(flags["--speculative-config"]) == kw["speculative_config"]
    assert json.loads(flags["--additional-config"]) == kw["additional_config"]
    assert kw["speculative_config"]["model"] == "/models/draft"


def _naive_matched_length(tokens, min_n, max_n):
    for n in range(max_n, min_n - 1, -1):
        if len(tokens) > n and any(tokens[i : i + n] == tokens[-n:] for i in range(len(tokens) - n)):
            return n
    return 0


def test_matched_ngram_length_agrees_with_a_direct_search():
    rng = np.random.default_rng(0)
    for trial in range(400):
        vocab = [3, 50, 70_000][trial % 3]  # large ids: byte patterns that straddle token boundaries
        tokens = rng.integers(0, vocab, rng.integers(1, 60)).tolist()
        if trial % 4 == 0 and len(tokens) > 6:  # plant a repeat of the suffix
            start = int(rng.integers(0, len(tokens) - 5))
            tokens += tokens[start : start + int(rng.integers(1, 5))]
        for min_n, max_n in ((1, 3), (2, 4), (3, 3)):
            assert adapter.matched_ngram_length(tokens, min_n, max_n) == _naive_matched_length(tokens, min_n, max_n)


_COMPARE_PROPOSERS = """
import numpy as np
from vllm.v1.spec_decode.ngram_proposer import _find_longest_matched_ngram_and_propose_tokens as vllm_propose
from adaptk.ngram import propose

rng = np.random.default_rng(1)
compared = 0
for trial in range(600):
    tokens = rng.integers(0, [3, 8, 50][trial % 3], rng.integers(1, 80)).astype(np.int32)
    for min_n, max_n in ((1, 3), (2, 4), (5, 5)):
        for k in (1, 8):
            expected, _ = propose(tokens, max_n, min_n, num_tokens=k)
            drafted = vllm_propose(tokens, min_n, max_n, 4096, k)
            assert drafted.tolist() == expected.tolist(), (tokens.tolist(), min_n, max_n, k)
            compared += 1
print("compared", compared)
"""


@pytest.mark.vllm
@needs_vllm
def test_vllm_ngram_proposer_drafts_what_adaptk_ngram_drafts():
    # hint_ablation.py's vLLM-drafter traces are recorded with adaptk.ngram; this is vLLM's own
    # proposer. In a subprocess: it imports numba, and once numba is imported a CPU engine started
    # in the same process fails (see allow_repeated_inprocess_engines).
    result = subprocess.run([sys.executable, "-c", _COMPARE_PROPOSERS], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compared 3600" in result.stdout


def test_controller_instance_becomes_spec():
    spec = adapter.controller_spec(adaptk.make("hf-heuristic", initial_k=3, carry_over=False))
    assert spec == {"name": "hf-heuristic", "params": {"initial_k": 3, "carry_over": False}}


@pytest.mark.parametrize("name", ["adaptk", "smartspec", "dsd", "sssd-budget", "analytic-table"])
def test_online_costs_are_priced_as_vllm_packs_a_step(name):
    spec = adapter.engine_kwargs(name)["additional_config"]["adaptk"]["controller"]
    assert spec["params"]["latency"] == {"name": "online", "ragged": "packed"}
    controller = adaptk.from_spec(spec)
    controller.decide(adaptk.StepContext(step=0, seq_ids=[1, 2], context_lens=[10, 20], k_max=4))
    model = controller._cost if name == "adaptk" else controller.latency_model()
    assert model.ragged == "packed"


def test_given_cost_models_are_left_alone():
    kw = adapter.engine_kwargs("adaptk", controller_params={"latency": "h100-llama3-8b"})
    assert kw["additional_config"]["adaptk"]["controller"]["params"] == {"latency": "h100-llama3-8b"}
    assert adapter.engine_kwargs("fixed")["additional_config"]["adaptk"]["controller"]["params"] == {}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"controller": "no-such-controller"}, "unknown controller"),
        ({"controller": "fixed", "controller_params": {"nope": 1}}, "no parameter"),
        ({"controller": "fixed", "method": "eagle"}, "method"),
        ({"controller": "fixed", "method": "draft_model"}, "draft_model"),
        ({"controller": "fixed", "k_max": 0}, "k_max"),
        ({"controller": "fixed", "fallback_k": -1}, "fallback_k"),
        ({"controller": "fixed", "num_speculative_tokens": 3}, "set by engine_kwargs"),
    ],
)
def test_bad_arguments_fail_early(kwargs, message):
    with pytest.raises(ValueError, match=message):
        adapter.engine_kwargs(**kwargs)


def _trained_adaptk() -> adaptk.SpeculationController:
    from adaptk.bench.runner import bundled_trace_paths
    from adaptk.sim import TraceSet
    from adaptk.sim.replay import replay

    controller = adaptk.from_spec(adapter.price_packed({"name": "adaptk"}))
    traces = TraceSet.load(bundled_trace_paths()["smollm2-prompt-lookup"])
    replay(controller, traces, adaptk.estimators.get_latency_model("smollm2-135m-cpu", drafter="prompt_lookup"), 4,
           num_requests=6)
    return controller


def test_controller_state_round_trips_through_a_file(tmp_path):
    trained = _trained_adaptk()
    path = tmp_path / "state.json"
    adapter.save_controller_state(trained, path, next_seq_id=6)
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left
    resumed = adaptk.from_spec(adapter.price_packed({"name": "adaptk"}))
    assert adapter.load_controller_state(resumed, path) == 6
    assert json.dumps(resumed.state_dict(), sort_keys=True) == json.dumps(trained.state_dict(), sort_keys=True)
    context = adaptk.StepContext(step=0, seq_ids=[100, 101], context_lens=[300, 40], k_max=8,
                                 draft_available=[8, 3], match_ngram_lens=[3, 1])
    fresh = adaptk.from_spec(adapter.price_packed({"name": "adaptk"}))
    assert list(resumed.decide(context).num_draft_tokens) == list(trained.decide(context).num_draft_tokens)
    assert fresh.state_dict() != resumed.state_dict()


def test_a_failed_state_write_raises_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "state.json"
    target.mkdir()  # the rename onto it fails after the temporary file is written
    with pytest.raises(OSError):
        adapter.save_controller_state(adaptk.make("adaptk"), target)
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    assert target.is_dir() and not any(target.iterdir())


def test_sequences_running_at_save_are_ended_on_load(tmp_path):
    controller = adaptk.make("adaptk")
    context = adaptk.StepContext(step=0, seq_ids=[0, 1], context_lens=[10, 10], k_max=8, draft_available=[8, 8])
    k = controller.decide(context).num_draft_tokens
    controller.update(adaptk.Feedback(seq_ids=[0, 1], num_draft_tokens=k, num_accepted_tokens=[int(k[0]), 0]))
    path = tmp_path / "state.json"
    adapter.save_controller_state(controller, path, live_seq_ids=[0, 1], next_seq_id=2)
    resumed = adaptk.make("adaptk")
    assert adapter.load_controller_state(resumed, path) == 2
    ended = adaptk.make("adaptk")
    ended.load_state_dict(controller.state_dict())
    ended.on_sequence_end(0)
    ended.on_sequence_end(1)
    dump = lambda c: json.dumps(c.state_dict(), sort_keys=True)  # noqa: E731
    assert dump(resumed) == dump(ended) != dump(controller)  # the per-sequence state is gone, the rest kept


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not a readable adaptk state file"),
        ('{"format": "something else"}', "not an adaptk state file"),
        ('{"format": "adaptk-vllm-state/1", "controller_state": {}, "live_seq_ids": "x", "next_seq_id": 0}',
         "live_seq_ids must be a list"),
        (None, "state is for controller 'fixed', not 'adaptk'"),
    ],
)
def test_a_state_file_that_does_not_fit_is_refused_and_changes_nothing(tmp_path, content, message):
    path = tmp_path / "state.json"
    if content is None:
        adapter.save_controller_state(adaptk.make("fixed", k=3), path)
    else:
        path.write_text(content)
    controller = _trained_adaptk()
    before = json.dumps(controller.state_dict(), sort_keys=True)
    with pytest.raises(ValueError, match=message):
        adapter.load_controller_state(controller, path)
    assert json.dumps(controller.state_dict(), sort_keys=True) == before


def test_state_file_settings_travel_and_are_checked(tmp_path):
    kw = adapter.engine_kwargs("adaptk", state_file=tmp_path / "s.json", save_state_every_s=5)
    settings = kw["additional_config"]["adaptk"]
    assert settings["state_file"] == str((tmp_path / "s.json").resolve()) and settings["save_state_every_s"] == 5.0
    assert "state_file" not in adapter.engine_kwargs("adaptk")["additional_config"]["adaptk"]
    flags = adapter.serve_args("adaptk", state_file=tmp_path / "s.json")
    assert json.loads(flags[flags.index("--additional-config") + 1]) == {
        "adaptk": {**settings, "save_state_every_s": 60.0}}
    with pytest.raises(ValueError, match="state_file must be a file in an existing directory"):
        adapter.engine_kwargs("adaptk", state_file=tmp_path / "missing-dir" / "s.json")
    with pytest.raises(ValueError, match="state_file must be a file"):
        adapter.engine_kwargs("adaptk", state_file=tmp_path)
    with pytest.raises(ValueError, match="save_state_every_s"):
        adapter.engine_kwargs("adaptk", state_file=tmp_path / "s.json", save_state_every_s=-1)


def test_module_does_not_import_vllm():
    code = "import sys, adaptk.adapters.vllm as a; a.engine_kwargs('fixed'); print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------
# Real engine helpers
# ------------------------------------------------------------------------------------------
_WORDS = (
    "the a cat dog sat on mat ran to house red blue green big small one two three four five six seven eight "
    "nine ten and or but if then when where what who why how is are was were be been have has had do does did "
    "say said go went see saw make made take took come came know knew think thought look want give use find "
    "tell ask work seem feel try leave call good new first last long great little own other old right . , ? !"
).split()

PROMPTS = [
    "the cat sat on the mat and the dog ran to the house",
    "one two three four five one two three four five one two",
    "what is the big red house and where is the small blue house",
    "the dog saw the cat and the cat saw the dog and then",
]


def _tiny_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in _WORDS:
        vocab.setdefault(word, len(vocab))
    for i in range(len(vocab), 256):
        vocab[f"w{i}"] = i
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)


def _tiny_models(root: Path) -> tuple[Path, Path]:
    """A 2-layer random Llama (head_dim 64: vLLM's CPU attention needs it) and a perturbed copy as draft.

    The draft is the target with 5% noise on its layer weights: ~50% greedy agreement, so drafts
    are partly accepted and partly rejected.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target_dir, draft_dir = root / "tiny-target", root / "tiny-draft"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(target_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layers" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05 * param.std())
    model.save_pretrained(draft_dir)
    for path in (target_dir, draft_dir):
        _tiny_tokenizer(path)
    return target_dir, draft_dir


# In-process engines share vLLM's global distributed state: shutting one down breaks the others.
# So every engine built here stays alive until the test process exits.
_ENGINES: list = []


def _make_llm(model, kv_mib=64, **kwargs):
    from vllm import LLM

    adapter.allow_repeated_inprocess_engines()  # several engines in this process: see its docstring
    options = dict(
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        seed=0,
        disable_log_stats=False,
        kv_cache_memory_bytes=kv_mib << 20,
    )
    options.update(kwargs)
    llm = LLM(str(model), **options)
    _ENGINES.append(llm)
    return llm


def _counters(llm) -> dict[str, int]:
    wanted = {
        "vllm:spec_decode_num_drafts": "drafts",
        "vllm:spec_decode_num_draft_tokens": "draft_tokens",
        "vllm:spec_decode_num_accepted_tokens": "accepted",
    }
    out = dict.fromkeys(wanted.values(), 0)
    for metric in llm.get_metrics():
        if metric.name in wanted:
            out[wanted[metric.name]] = int(metric.value)
    return out


def _greedy(llm, prompts, max_tokens=40):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def _run(llm, controller, prompts, max_tokens=40):
    """Swap in ``controller``, generate, return (outputs, controller, counter deltas)."""
    hook = adapter.scheduler_hook(llm)
    hook.set_controller(controller)
    before = _counters(llm)
    outputs = _greedy(llm, prompts, max_tokens)
    after = _counters(llm)
    return outputs, hook.controller, {k: after[k] - before[k] for k in after}


def _check_cycle_feedback(controller, delta, method: str) -> None:
    """Each verified draft came from a logged decision and respects that sequence's cap; sums match vLLM.

    A draft model drafts exactly its cap (decided at schedule time, applied the step after). The
    n-gram drafter is decided after it offered its drafts, with the offer as ``draft_available``:
    what is verified is exactly ``min(cap, offered)``.
    """
    rows = [
        (s, d, a, step)
        for fb in controller._feedback
        for s, d, a, step in zip(fb["seq_ids"], fb["drafted"], fb["accepted"], fb["decision_steps"], strict=True)
    ]
    assert rows, "the controller received no feedback"
    verified_positive = 0
    for seq_id, drafted, accepted, step in rows:
        assert 0 <= accepted <= drafted
        if step < 0:
            assert drafted == 0
            continue
        cap = controller._decisions[step][seq_id]
        assert drafted <= cap, f"seq {seq_id} drafted {drafted} > its cap {cap} (decision step {step})"
        if method == "draft_model":
            assert drafted == cap
        else:
            assert drafted == min(cap, controller._offered[step][seq_id])
        verified_positive += drafted > 0
    assert verified_positive > 0
    # the batch K varied and both small and large caps were used
    caps_used = {k for decision in controller._decisions.values() for k in decision.values()}
    assert {0, 1, 2, 3} <= caps_used
    if method == "draft_model":
        assert controller._offered == {}
    else:  # decided with the offer in hand: every decision saw one, and some offers were empty
        assert len(controller._offered) == len(controller._decisions)
        offers = [n for offered in controller._offered.values() for n in offered.values()]
        assert 0 in offers and max(offers) > 0
        # with the matched n-gram length (prompt_lookup_min..max = 1..3) exactly where something is offered
        pairs = [(offered[s], controller._matched[step][s]) for step, offered in controller._offered.items() for s in offered]
        assert all((n > 0) == (1 <= m <= 3) for n, m in pairs), pairs[:20]
    assert sum(r[1] for r in rows) == delta["draft_tokens"]
    assert sum(r[2] for r in rows) == delta["accepted"]
    assert sum(r[1] > 0 for r in rows) == delta["drafts"]
    _check_untimed_prefill_steps(controller, method)
    # StepContext: stable int ids, k_max = num_speculative_tokens, growing contexts
    last_len: dict[int, int] = {}
    for seq_ids, context_lens, k_max in controller._contexts:
        assert k_max == 3
        for seq_id, length in zip(seq_ids, context_lens, strict=True):
            assert length >= last_len.get(seq_id, 0)
            last_len[seq_id] = length
    assert controller._live_seq_ids == set(), "finished sequences were not ended"


def _check_untimed_prefill_steps(controller, method: str = "ngram") -> int:
    """Decode-only steps report their time; steps that also prefilled a request report none.

    Which feedback belongs to a request's prefill step follows from where the decision is made.
    Sync n-gram decides after the step, so a request's first decision comes right *after* the
    feedback of the step that prefilled it; a draft model decides at schedule, so the first
    decision naming a request comes right *before* that step's feedback. Returns how many
    untimed steps there were.
    """
    events = controller._events
    seen: set[int] = set()
    prefill_updates: set[int] = set()  # indices of update events of steps that prefilled
    for i, (kind, value) in enumerate(events):
        if kind == "decide":
            if not set(value) <= seen:
                j = i - 1 if method == "ngram" else i + 1
                if 0 <= j < len(events) and events[j][0] == "update":
                    prefill_updates.add(j)
            seen.update(value)
    for i, (kind, value) in enumerate(events):
        if kind == "update":
            if i in prefill_updates:
                assert value == 0.0, f"event {i}: a step that prefilled reported {value} s"
            else:
                assert value > 0, f"event {i}: a decode step reported no time"
    return len(prefill_updates)


# ------------------------------------------------------------------------------------------
# Real engine: tiny random model
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    if not HAVE_VLLM:
        pytest.skip("vllm is not importable")
    return _tiny_models(tmp_path_factory.mktemp("vllm-models"))


@pytest.fixture(scope="module")
def tiny_reference(tiny_models):
    llm = _make_llm(tiny_models[0])
    return _greedy(llm, PROMPTS)


def _spec_engine(tiny_models, method):
    if method == "ngram":
        kw = adapter.engine_kwargs("fixed", method="ngram", k_max=3, prompt_lookup_min=1, prompt_lookup_max=3)
    else:
        kw = adapter.engine_kwargs("fixed", method="draft_model", k_max=3, draft_model=tiny_models[1])
    return _make_llm(tiny_models[0], **kw)


def _check_cycling_caps(llm, method, reference):
    outputs, controller, delta = _run(llm, {"name": "test-vllm-cycle", "params": {"period": 4}}, PROMPTS)
    assert outputs == reference, "greedy outputs differ from vLLM without speculation"
    _check_cycle_feedback(controller, delta, method)
    assert delta["draft_tokens"] > 0 and delta["accepted"] > 0


def _check_builtin(llm, method, reference, spec):
    outputs, _, delta = _run(llm, spec, PROMPTS)
    assert outputs == reference, spec
    assert delta["draft_tokens"] > 0, spec
    assert not adapter.scheduler_hook(llm).fell_back
    if spec["name"] == "fixed":
        k = spec["params"]["k"]
        assert delta["draft_tokens"] <= k * delta["drafts"]
        if method == "draft_model":
            assert delta["draft_tokens"] == k * delta["drafts"]


def _check_k_zero(llm, reference):
    outputs, _, delta = _run(llm, {"name": "fixed", "params": {"k": 0}}, PROMPTS)
    assert outputs == reference
    assert delta == {"drafts": 0, "draft_tokens": 0, "accepted": 0}


def _check_raising(llm, method, reference, where):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs, _, delta = _run(llm, {"name": "test-vllm-raise", "params": {"calls": 4, "where": where}}, PROMPTS)
    fallbacks = [w for w in caught if issubclass(w.category, ControllerFallbackWarning)]
    assert len(fallbacks) == 1, [str(w.message) for w in fallbacks]
    hook = adapter.scheduler_hook(llm)
    assert hook.fell_back and hook.guard.failed and hook.active  # the controller failed, not the hook
    assert outputs == reference
    if method == "draft_model":  # after the failure the fixed fallback K=2 is drafted
        assert delta["draft_tokens"] > delta["drafts"]
    assert _greedy(llm, PROMPTS[:2]) == reference[:2]  # and the engine keeps serving


@needs_vllm
@pytest.mark.vllm
@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_controllers_drive_the_engine(tiny_models, tiny_reference, method):
    """One engine per drafter, controllers swapped between generate() calls.

    (One test, not several: vLLM's metrics registry is process-global and follows the most recently
    built engine, so the counters are only read from the engine built last.)
    """
    llm = _spec_engine(tiny_models, method)
    hook = adapter.scheduler_hook(llm)
    assert hook is not None and hook.active and hook.reason is None
    assert adapter.check_vllm() == []
    _check_cycling_caps(llm, method, tiny_reference)
    _check_builtin(llm, method, tiny_reference, {"name": "fixed", "params": {"k": 2}})
    _check_builtin(llm, method, tiny_reference, {"name": "hf-heuristic", "params": {"initial_k": 1}})
    _check_k_zero(llm, tiny_reference)
    _check_raising(llm, method, tiny_reference, "decide")
    _check_raising(llm, method, tiny_reference, "update")


@needs_vllm
@pytest.mark.vllm
def test_missing_feature_falls_back_to_fixed_k(tiny_models, tiny_reference, monkeypatch):
    monkeypatch.setattr(adapter, "check_vllm", lambda: ["Scheduler lacks update_draft_token_ids (simulated)"])
    kw = adapter.engine_kwargs(
        "test-vllm-cycle", method="draft_model", k_max=3, draft_model=tiny_models[1], fallback_k=1
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = _make_llm(tiny_models[0], **kw)
    fallbacks = [w for w in caught if issubclass(w.category, ControllerFallbackWarning)]
    assert len(fallbacks) == 1 and "simulated" in str(fallbacks[0].message)
    hook = adapter.scheduler_hook(llm)
    assert not hook.active and hook.fell_back and hook.controller is None
    before = _counters(llm)
    assert _greedy(llm, PROMPTS) == tiny_reference
    after = _counters(llm)
    drafts = after["drafts"] - before["drafts"]
    assert drafts > 0 and after["draft_tokens"] - before["draft_tokens"] == drafts  # fixed K=1


@needs_vllm
@pytest.mark.vllm
def test_scheduler_without_spec_falls_back(tiny_models, tiny_reference):
    """Naming the scheduler without engine_kwargs' settings: vLLM's fixed K, one warning."""
    spec = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = _make_llm(tiny_models[0], scheduler_cls=adapter.SCHEDULER_CLS, speculative_config=spec)
    fallbacks = [w for w in caught if issubclass(w.category, ControllerFallbackWarning)]
    assert len(fallbacks) == 1 and "no adaptk controller spec" in str(fallbacks[0].message)
    assert _greedy(llm, PROMPTS) == tiny_reference


@needs_vllm
@pytest.mark.vllm
def test_steps_that_prefill_report_no_time(tiny_models, tiny_reference):
    """Two slots, four requests: the later two are prefilled while another request decodes.

    Those steps' time includes a prompt's prefill; reported as a decode step's, it would teach an
    online cost model that plain steps cost what a prefill does (on SmolLM2 at concurrency 8 that
    made verify cost look falling in the drafted tokens, and the flagship drafted where nothing paid).
    """
    kw = adapter.engine_kwargs("fixed", method="ngram", k_max=3, prompt_lookup_min=1, prompt_lookup_max=3)
    llm = _make_llm(tiny_models[0], max_num_seqs=2, **kw)
    hook = adapter.scheduler_hook(llm)
    outputs, controller, _ = _run(llm, {"name": "test-vllm-cycle", "params": {"period": 4}}, PROMPTS)
    assert outputs == tiny_reference
    untimed = _check_untimed_prefill_steps(controller)
    assert untimed >= 1, "no request was prefilled beside a decoding one"
    assert hook.num_untimed_steps == untimed


@needs_vllm
@pytest.mark.vllm
def test_a_restarted_engine_resumes_what_the_controller_learned(tiny_models, tiny_reference, tmp_path):
    state = tmp_path / "adaptk-state.json"
    kw = adapter.engine_kwargs("adaptk", method="ngram", k_max=3, state_file=state, save_state_every_s=0,
                               prompt_lookup_min=1, prompt_lookup_max=3)
    first = _make_llm(tiny_models[0], **kw)
    assert _greedy(first, PROMPTS) == tiny_reference
    saved = json.loads(state.read_text())
    assert saved["live_seq_ids"] == [] and saved["next_seq_id"] == len(PROMPTS)
    learned = adapter.scheduler_hook(first).controller.state_dict()
    assert json.dumps(saved["controller_state"], sort_keys=True) == json.dumps(learned, sort_keys=True)

    second = _make_llm(tiny_models[0], **kw)  # a restart: the controller starts where the first left off
    resumed = adapter.scheduler_hook(second)
    assert not resumed.fell_back
    assert json.dumps(resumed.controller.state_dict(), sort_keys=True) == json.dumps(learned, sort_keys=True)
    assert _greedy(second, PROMPTS) == tiny_reference

    state.write_text("{broken")
    hourly = adapter.engine_kwargs("adaptk", method="ngram", k_max=3, state_file=state, save_state_every_s=3600,
                                   prompt_lookup_min=1, prompt_lookup_max=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        third = _make_llm(tiny_models[0], **hourly)
    assert any("not a readable adaptk state file" in str(w.message) for w in caught)
    assert (tmp_path / "adaptk-state.json.unreadable").read_text() == "{broken"  # kept, not lost
    hook = adapter.scheduler_hook(third)
    assert hook.active and not hook.fell_back
    assert _greedy(third, PROMPTS) == tiny_reference
    assert not state.exists()  # not due for an hour ...
    # what EngineCore.shutdown() calls; the whole engine is not shut down here because in-process
    # engines share vLLM's global state (shutting one down breaks the ones the later tests build)
    third.llm_engine.engine_core.engine_core.scheduler.shutdown()
    saved = json.loads(state.read_text())  # ... but written when the engine shuts down
    assert json.dumps(saved["controller_state"], sort_keys=True) == json.dumps(hook.controller.state_dict(),
                                                                                sort_keys=True)


_SUBPROCESS_SCRIPT = """
import json, os, sys
from adaptk.adapters.vllm import engine_kwargs
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    kw = engine_kwargs("fixed", method="ngram", k_max=3, controller_params={"k": 1},
                       prompt_lookup_min=1, prompt_lookup_max=3)
    llm = LLM(sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=512, seed=0, kv_cache_memory_bytes=64 << 20,
              disable_log_stats=False, **kw)
    out = llm.generate(json.loads(sys.argv[2]), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                       use_tqdm=False)
    metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics() if "spec_decode" in m.name}
    print("RESULT " + json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in out], "metrics": metrics}))
"""


@needs_vllm
@pytest.mark.vllm
def test_spec_crosses_the_process_boundary(tiny_models, tiny_reference, tmp_path):
    """The default multiprocess engine builds the controller from the spec in its own process."""
    script = tmp_path / "run_engine.py"
    script.write_text(textwrap.dedent(_SUBPROCESS_SCRIPT))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_models[0]), json.dumps(PROMPTS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["tokens"] == tiny_reference
    metrics = result["metrics"]
    drafts = metrics["vllm:spec_decode_num_drafts"]
    # fixed k=1 inside the engine process: every draft is exactly one token (vLLM alone would draft up to 3)
    assert drafts > 0 and metrics["vllm:spec_decode_num_draft_tokens"] == drafts
    assert "ControllerFallbackWarning" not in proc.stderr


# ------------------------------------------------------------------------------------------
# Real engine: SmolLM2-135M-Instruct (the testbed model)
# ------------------------------------------------------------------------------------------
SMOL_PROMPTS = [
    "Summarize: The cat sat on the mat. The mat was red. The cat liked the red mat because it was warm.",
    "Write a Python function that returns the square of a number.",
    "What is the capital of France?",
    "Repeat after me: one apple, two apples, three apples, four apples.",
]


@pytest.fixture(scope="module")
def smol_dir():
    if not HAVE_VLLM:
        pytest.skip("vllm is not importable")
    from adaptk.decoding.models import fetch_smollm2

    return adapter.model_dir_for_vllm(fetch_smollm2())


@pytest.fixture(scope="module")
def smol_reference(smol_dir):
    return _greedy(_make_llm(smol_dir, kv_mib=256), SMOL_PROMPTS, max_tokens=32)


@needs_vllm
@pytest.mark.vllm
@pytest.mark.model
def test_smollm2_ngram(smol_dir, smol_reference):
    kw = adapter.engine_kwargs("fixed", method="ngram", k_max=3, prompt_lookup_min=1, prompt_lookup_max=3)
    llm = _make_llm(smol_dir, kv_mib=256, **kw)
    outputs, controller, delta = _run(llm, {"name": "test-vllm-cycle", "params": {"period": 4}}, SMOL_PROMPTS, 32)
    assert outputs == smol_reference
    _check_cycle_feedback(controller, delta, "ngram")
    for spec in ({"name": "fixed", "params": {"k": 3}}, {"name": "hf-heuristic", "params": {"initial_k": 2}}):
        outputs, _, delta = _run(llm, spec, SMOL_PROMPTS, 32)
        assert outputs == smol_reference, spec
        assert delta["draft_tokens"] > 0 and delta["accepted"] > 0, spec
        assert not adapter.scheduler_hook(llm).fell_back
