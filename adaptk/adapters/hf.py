"""Adaptive speculation inside Hugging Face ``model.generate``.

A controller chooses the draft length of every step of HF's assisted generation, in all three of
its drafting modes (a separate ``assistant_model``, ``prompt_lookup_num_tokens``, or
``assistant_early_exit`` self-speculation)::

    import adaptk.adapters.hf as ahf

    with ahf.speculate(model, controller="hf-heuristic", k_max=8) as session:
        out = model.generate(**inputs, prompt_lookup_num_tokens=8, max_new_tokens=128)
    session.feedback            # what the controller saw, one Feedback per step

    out = ahf.generate(model, **inputs, prompt_lookup_num_tokens=8, controller="fixed")

How it hooks in (transformers 5.x): HF's assisted loop has no public hook for a candidate
generator, so :func:`speculate` installs two *instance-level* overrides on ``model`` and removes them
on exit (also after an exception), in one place (:func:`_installed`):

* ``model._get_candidate_generator`` builds HF's own generator and wraps it. Each step the wrapper
  asks the controller for ``k``, sets the generator's draft length (assistant / early exit:
  ``num_assistant_tokens`` of the generator's private copy of the config; prompt lookup:
  ``num_output_tokens``, which HF re-reads every step), times the draft, and turns HF's
  ``update_candidate_strategy(input_ids, scores, num_matches)`` into a :class:`~adaptk.Feedback`.
  ``k = 0`` skips drafting: that step is plain decoding. A call's first step also runs the prompt
  through the target (and an assistant), so its feedback carries no timing (0 s): taken as a decode
  step's cost it would mislead a cost model learned online.
* ``model.generate`` ends the controller's sequence after each call, puts the model's, the
  assistant's and their generation configs back exactly as they were, and routes a *batched*
  assisted call (which HF refuses) through ``generate(custom_generate=...)`` to the bundled
  reference decoder, with the same controller.

While a controller is in charge HF's own length schedule (``num_assistant_tokens_schedule``) and its
hidden confidence stop (``assistant_confidence_threshold``, 0.4 by default) are off, in the
generator's private copies only. The controller's :attr:`~adaptk.SpeculationController.stop_rule`,
if it has one, replaces the latter. Learned state lives in the controller: reuse the controller
object across calls (or across ``speculate`` blocks) to keep what it learned.

Accounting: the feedback of a step reports ``num_accepted_tokens = num_matches`` as HF computes it,
which is *after* HF truncates the step's tokens at ``max_length`` and at the first EOS. So over a
call, ``sum(accepted + 1) == number of new tokens`` exactly; on the final step the accepted count
can be smaller than what verification agreed with (the surplus was never emitted).

A controller that raises is replaced by a fixed draft length (``fallback_k``) with a
:class:`~adaptk.guard.ControllerFallbackWarning`; generation completes, with the correct output.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import adaptk
from adaptk.core import SpeculationController
from adaptk.guard import GuardedController
from adaptk.ngram import propose
from adaptk.types import Feedback, StepContext

try:  # the adapter needs the `hf` extra; fail with a clear message, not deep inside generate
    import torch
    import transformers
    from transformers.generation.candidate_generator import (
        AssistedCandidateGenerator,
        CandidateGenerator,
        EarlyExitCandidateGenerator,
        PromptLookupCandidateGenerator,
        _prepare_attention_mask,
        _prepare_position_ids,
        _prepare_token_type_ids,
    )
    from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "adaptk.adapters.hf needs torch and transformers: pip install 'adaptk[hf]'"
    ) from exc

__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "DEFAULT_K_MAX",
    "HFSpeculation",
    "check_transformers_version",
    "generate",
    "speculate",
]

#: transformers versions this adapter is tested against: ``(lowest, first unsupported)``. Both ends
#: of the hook (``_get_candidate_generator``, the generators' length attributes, callable
#: ``custom_generate``, and from 5.25 ``num_drafting_tokens``) were read in the 5.19, 5.23 and 5.25
#: sources; the tests ran on 5.19, 5.23, 5.24 and 5.25.
SUPPORTED_TRANSFORMERS = ("5.19", "6")
#: ``k_max`` when neither the caller nor ``prompt_lookup_num_tokens`` sets one.
DEFAULT_K_MAX = 8

_OVERRIDDEN = ("generate", "_get_candidate_generator")
_MISSING = object()
_SIGNALS = frozenset({"draft_probs", "draft_entropies"})


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        parts.append(int(digits or 0))
    return tuple(parts)


def check_transformers_version(version: str | None = None) -> None:
    """Raise ``RuntimeError`` unless ``version`` (default: the installed one) is supported.

    >>> check_transformers_version("5.23.0")
    >>> check_transformers_version("4.57.1")
    Traceback (most recent call last):
    ...
    RuntimeError: adaptk.adapters.hf supports transformers >=5.19,<6; found 4.57.1 ...
    """
    version = transformers.__version__ if version is None else version
    low, high = SUPPORTED_TRANSFORMERS
    if not _version_tuple(low) <= _version_tuple(version) < _version_tuple(high):
        raise RuntimeError(
            f"adaptk.adapters.hf supports transformers >={low},<{high}; found {version} "
            f"(it hooks transformers' assisted-generation internals, which change between major versions). "
            f"Install a supported version: pip install 'transformers>={low},<{high}'"
        )


def _resolve_controller(controller: Any, params: dict[str, Any]) -> SpeculationController:
    """A controller object, a registry name (+ ``params``), or a ``{"name", "params"}`` spec."""
    if controller is None:
        controller = "adaptk" if "adaptk" in adaptk.available() else "hf-heuristic"
    if isinstance(controller, SpeculationController):
        if params:
            raise TypeError(f"controller parameters {sorted(params)} given with a controller object {controller!r}")
        return controller
    if isinstance(controller, str) and not controller.strip().startswith("{"):
        return adaptk.make(controller, **params)
    if params:
        raise TypeError("give controller parameters either as keyword arguments with a name, or inside the spec")
    return adaptk.from_spec(controller)


@dataclass
class HFSpeculation:
    """One :func:`speculate` block: the controller in charge and what it was told.

    ``feedback`` holds every :class:`~adaptk.Feedback` given to the controller at batch size 1, in
    order; ``batched_results`` the reference decoder's
    :class:`~adaptk.decoding.reference.GenerationResult` of each batched call. ``failed`` is true once
    the controller raised and a fixed ``fallback_k`` took over.
    """

    model: Any
    controller: SpeculationController
    k_max: int | None = None
    fallback_k: int = 2
    feedback: list[Feedback] = field(default_factory=list)
    batched_results: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.guarded = GuardedController(self.controller, fallback_k=self.fallback_k)
        self._step = itertools.count()
        self._seq = itertools.count()
        self._open: list[int] = []
        self._in_call = False

    @property
    def failed(self) -> bool:
        return self.guarded.failed

    # -- the two overrides -------------------------------------------------------------------
    def _get_candidate_generator(self, original, *args, **kwargs) -> CandidateGenerator:
        inner = original(*args, **kwargs)
        generation_config = kwargs["generation_config"] if "generation_config" in kwargs else args[0]
        seq_id = next(self._seq)
        self._open.append(seq_id)
        return _AdaptiveCandidateGenerator(self, inner, generation_config, seq_id)

    def _generate(self, original, *args, **kwargs):
        if self._in_call:  # early exit drafts by calling model.generate on the model itself
            return original(*args, **kwargs)
        assistant = kwargs.get("assistant_model")
        self._in_call = True
        try:
            with _preserved(self.model), _preserved(assistant):
                if _batch_size(args, kwargs) > 1 and _is_assisted(self.model, kwargs):
                    return self._generate_batched(original, args, kwargs)
                return original(*args, **kwargs)
        finally:
            self._in_call = False
            while self._open:
                self.guarded.on_sequence_end(self._open.pop())

    # -- batch > 1: the reference decoder via custom_generate --------------------------------
    def _generate_batched(self, original, args, kwargs):
        kwargs = dict(kwargs)
        drafter = _batched_drafter(self.model, kwargs)
        return original(*args, custom_generate=_reference_generate, adaptk_session=self, adaptk_drafter=drafter, **kwargs)


class _AdaptiveCandidateGenerator(CandidateGenerator):
    """Wraps one of HF's candidate generators; the controller sets its draft length each step."""

    def __init__(self, session: HFSpeculation, inner: CandidateGenerator, generation_config, seq_id: int) -> None:
        self.session = session
        self.inner = inner
        self.seq_id = seq_id
        self.requires_model_outputs = getattr(inner, "requires_model_outputs", False)
        self.max_length = int(generation_config.max_length)
        self.is_lookup = isinstance(inner, PromptLookupCandidateGenerator)
        self.is_assisted = isinstance(inner, AssistedCandidateGenerator)
        if not (self.is_lookup or hasattr(inner, "num_assistant_tokens")):
            raise NotImplementedError(
                f"adaptk.adapters.hf cannot set the draft length of {type(inner).__name__}; supported are "
                "assistant_model=..., prompt_lookup_num_tokens=... and assistant_early_exit=..."
            )
        k_max = session.k_max
        if k_max is None:
            k_max = inner.num_output_tokens if self.is_lookup else DEFAULT_K_MAX
        self.k_max = int(k_max)
        self.exit_layers = self.num_layers = None
        eos = getattr(generation_config, "_eos_token_tensor", None)
        self.eos_ids = None if eos is None else np.atleast_1d(eos.detach().cpu().numpy())
        if self.is_assisted:
            # HF's own schedule and hidden confidence stop off, in the generator's private copies.
            inner.assistant_generation_config.num_assistant_tokens_schedule = "constant"
            inner.assistant_generation_config.assistant_confidence_threshold = 0.0
            inner.generation_config.assistant_confidence_threshold = 0.0
            if session.guarded.stop_rule is not None:
                _add_stopping_criterion(inner, _StopRuleCriterion(session.guarded, seq_id))
        if isinstance(inner, EarlyExitCandidateGenerator):
            self.num_layers = int(session.model.config.get_text_config().num_hidden_layers)
            self.exit_layers = (int(inner.assistant_early_exit),)
        self.want_signals = bool(_SIGNALS & session.controller.required_signals) or session.guarded.stop_rule is not None
        self._drafted = 0
        self._draft_time_s = 0.0
        self._verify_start = 0.0
        self._signals: dict[str, np.ndarray] = {}
        self._prefilled = False  # the first verify (and an assistant's first draft) also runs the prompt

    @property
    def num_drafting_tokens(self) -> int:
        # transformers >= 5.25 asks every candidate generator how many tokens one step may draft
        # (models with recurrent layers keep that many past states to roll back rejected drafts);
        # the controller never drafts more than k_max
        return self.k_max

    def _hints(self, input_ids: torch.LongTensor, k_max: int) -> tuple[list[int], list[int]]:
        """Prompt lookup: how many tokens the lookup offers now and the matched n-gram length.

        Mirrors HF's ``PromptLookupCandidateGenerator`` (same n-gram search via
        :func:`adaptk.ngram.propose`, draft cut at the first EOS). HF additionally drops draft
        tokens a logits processor forbids (bad words, no-repeat n-grams); with such processors the
        hint can over-state by those tokens.
        """
        tokens = input_ids[0].detach().cpu().numpy()
        draft, ngram = propose(tokens, max_ngram=self.inner.max_matching_ngram_size, min_ngram=1, num_tokens=k_max)
        available = len(draft)
        if available and self.eos_ids is not None:
            is_eos = np.isin(draft, self.eos_ids)
            if is_eos.any():
                available = int(np.argmax(is_eos))
        return [available], [ngram if available else 0]

    def _set_length(self, k: int) -> None:
        if self.is_lookup:
            self.inner.num_output_tokens = k
        else:
            self.inner.num_assistant_tokens = k
            if hasattr(self.inner, "assistant_generation_config"):
                self.inner.assistant_generation_config.num_assistant_tokens = k

    def _sync_first_draft(self, length: int) -> None:
        # HF's assistant extends its masks only once it has a cache; after plain (k=0) steps its
        # first draft starts past the prompt, so bring its mask and positions up to ``length``.
        kwargs, is_enc_dec = self.inner.assistant_kwargs, self.inner.assistant_model.config.is_encoder_decoder
        kwargs = _prepare_attention_mask(kwargs, length, is_enc_dec)
        kwargs = _prepare_position_ids(kwargs, length, is_enc_dec)
        self.inner.assistant_kwargs = _prepare_token_type_ids(kwargs, length)

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs) -> tuple[torch.LongTensor, torch.Tensor | None]:
        session = self.session
        cur_len = input_ids.shape[1]
        k_max = max(0, min(self.k_max, self.max_length - cur_len - 1))
        available = ngram = None
        if self.is_lookup:
            available, ngram = self._hints(input_ids, k_max)
        context = StepContext(
            step=next(session._step),
            seq_ids=[self.seq_id],
            context_lens=[cur_len],
            k_max=k_max,
            num_layers=self.num_layers,
            exit_layers=self.exit_layers,
            draft_available=available,
            match_ngram_lens=ngram,
        )
        self._step = context.step
        k = int(session.guarded.decide(context).num_draft_tokens[0])
        start = time.perf_counter()
        if k > 0:
            self._set_length(k)
            if self.is_assisted and self.inner.assistant_kwargs.get("past_key_values") is None:
                self._sync_first_draft(cur_len)
            candidate_ids, candidate_logits = self.inner.get_candidates(input_ids, **kwargs)
        else:
            candidate_ids, candidate_logits = input_ids, None
        self._verify_start = time.perf_counter()
        self._draft_time_s = self._verify_start - start
        self._drafted = candidate_ids.shape[1] - cur_len
        self._signals = {}
        if candidate_logits is not None and self._drafted and self.want_signals:
            self._signals = _draft_signals(candidate_logits[:, : self._drafted])
        return candidate_ids, candidate_logits

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int) -> None:
        verify_time_s = time.perf_counter() - self._verify_start
        draft_time_s = self._draft_time_s
        if not self._prefilled:
            # the step also ran the prompt: no decode step's cost, so it is reported untimed (0)
            verify_time_s = draft_time_s = 0.0
            self._prefilled = True
        self.inner.update_candidate_strategy(input_ids, scores, num_matches)
        feedback = Feedback(
            seq_ids=[self.seq_id],
            num_draft_tokens=[self._drafted],
            num_accepted_tokens=[int(num_matches)],
            draft_time_s=draft_time_s,
            verify_time_s=verify_time_s,
            step=self._step,
            exit_layer=self.exit_layers[0] if self.exit_layers else None,
            **self._signals,
        )
        self.session.guarded.update(feedback)
        self.session.feedback.append(feedback)


def _draft_signals(logits: torch.Tensor) -> dict[str, np.ndarray]:
    """Per drafted position: the draft's top-1 probability and its entropy (nats), ``(1, k)``."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    probs = log_probs.exp()
    entropy = -(probs * log_probs).nan_to_num().sum(-1)
    return {
        "draft_probs": probs.amax(-1).clamp(0, 1).cpu().numpy().astype(np.float64),
        "draft_entropies": entropy.clamp_min(0).cpu().numpy().astype(np.float64),
    }


class _StopRuleCriterion(StoppingCriteria):
    """Asks the controller's stop rule after every token the assistant drafts (batch 1)."""

    def __init__(self, guarded: GuardedController, seq_id: int) -> None:
        self.guarded = guarded
        self.seq_ids = np.array([seq_id])

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        signals = _draft_signals(scores[-1][:, None, :])
        stop = self.guarded.should_stop(
            self.seq_ids, len(scores) - 1, signals["draft_probs"][:, 0], signals["draft_entropies"][:, 0]
        )
        return torch.as_tensor(stop, device=input_ids.device)


def _add_stopping_criterion(inner: AssistedCandidateGenerator, criterion: StoppingCriteria) -> None:
    """Pass ``criterion`` to the assistant's ``generate`` call (on this one generator object only)."""
    prepare = inner._prepare_generation_args

    def prepare_with_stop(*args, **kwargs):
        generation_args = prepare(*args, **kwargs)
        generation_args["stopping_criteria"] = StoppingCriteriaList([criterion])
        return generation_args

    inner._prepare_generation_args = prepare_with_stop


# -- restoring state ----------------------------------------------------------------------------
@contextmanager
def _preserved(model) -> Iterator[None]:
    """Put ``model.generation_config`` (in place) and its depth back as they were on exit.

    HF writes into the assistant's config in places (the ``heuristic`` schedule's carry-over,
    ``repetition_penalty`` for universal assisted generation) and early exit changes
    ``num_hidden_layers`` without ``try/finally``; none of that may leak out of an adapter call.
    """
    if model is None:
        yield
        return
    config = getattr(model, "generation_config", None)
    saved = copy.deepcopy(vars(config)) if config is not None else None
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    base_config = getattr(base, "config", None)
    depth = getattr(base_config, "num_hidden_layers", _MISSING)
    try:
        yield
    finally:
        if config is not None and vars(config) != saved:
            vars(config).clear()
            vars(config).update(saved)
        if depth is not _MISSING and base_config.num_hidden_layers != depth:
            base_config.num_hidden_layers = depth


@contextmanager
def _installed(session: HFSpeculation) -> Iterator[None]:
    """The one place where ``model`` is changed: two instance-level overrides, removed on exit."""
    model = session.model
    if getattr(model, "_adaptk_session", None) is not None:
        raise RuntimeError("adaptk.adapters.hf.speculate is already active on this model (blocks do not nest)")
    if not callable(getattr(model, "_get_candidate_generator", None)):
        raise TypeError(f"{type(model).__name__} has no assisted generation (_get_candidate_generator); "
                        "adaptk.adapters.hf needs a transformers generative model")
    saved = {name: vars(model).get(name, _MISSING) for name in _OVERRIDDEN}
    originals = {name: getattr(model, name) for name in _OVERRIDDEN}
    try:
        model._adaptk_session = session
        model._get_candidate_generator = lambda *a, **kw: session._get_candidate_generator(
            originals["_get_candidate_generator"], *a, **kw
        )
        model.generate = lambda *a, **kw: session._generate(originals["generate"], *a, **kw)
        yield
    finally:
        for name, value in saved.items():
            if value is _MISSING:
                vars(model).pop(name, None)
            else:
                setattr(model, name, value)
        vars(model).pop("_adaptk_session", None)


@contextmanager
def speculate(
    model,
    controller: SpeculationController | str | dict | None = None,
    *,
    k_max: int | None = None,
    fallback_k: int = 2,
    **params: Any,
) -> Iterator[HFSpeculation]:
    """Let ``controller`` choose the draft length of every ``model.generate`` call inside the block.

    Parameters
    ----------
    model
        A transformers ``PreTrainedModel`` with a language-modelling head.
    controller
        A :class:`~adaptk.SpeculationController`, a registry name (its parameters as ``**params``),
        or a spec ``{"name": ..., "params": {...}}``. Default: ``"adaptk"`` if registered, else
        ``"hf-heuristic"``.
    k_max
        The most tokens drafted per step. Default: ``prompt_lookup_num_tokens`` for prompt lookup,
        else :data:`DEFAULT_K_MAX`. Near ``max_length`` it shrinks so that no draft overshoots. If
        the controller itself takes a ``k_max`` parameter and none is in ``params``, it gets this one.
    fallback_k
        Draft length used after the controller raised (see :class:`~adaptk.guard.GuardedController`).

    Yields an :class:`HFSpeculation`; ``model`` and every assistant passed to ``generate`` are
    exactly as before once the block exits, also after an exception.
    """
    check_transformers_version()
    if k_max is not None and isinstance(controller, str) and not controller.strip().startswith("{"):
        if "k_max" in adaptk.get_class(controller)._param_names():
            params.setdefault("k_max", k_max)
    session = HFSpeculation(model, _resolve_controller(controller, params), k_max=k_max, fallback_k=fallback_k)
    with _installed(session):
        yield session


def generate(
    model,
    *args: Any,
    controller: SpeculationController | str | dict | None = None,
    k_max: int | None = None,
    fallback_k: int = 2,
    **generate_kwargs: Any,
):
    """One call: ``model.generate(*args, **generate_kwargs)`` with ``controller`` choosing the lengths.

    Controller parameters go in a spec: ``controller={"name": "fixed", "params": {"k": 3}}``.
    """
    with speculate(model, controller, k_max=k_max, fallback_k=fallback_k):
        return model.generate(*args, **generate_kwargs)


# -- helpers for the generate override -----------------------------------------------------------
def _batch_size(args: tuple, kwargs: dict) -> int:
    inputs = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids", kwargs.get("inputs_embeds")))
    return int(inputs.shape[0]) if isinstance(inputs, torch.Tensor) and inputs.ndim >= 2 else 1


def _is_assisted(model, kwargs: dict) -> bool:
    return kwargs.get("assistant_model") is not None or any(
        _setting(model, kwargs, key) is not None for key in ("prompt_lookup_num_tokens", "assistant_early_exit")
    )


def _setting(model, kwargs: dict, key: str):
    """``key`` as ``generate`` will see it: its kwargs, else its ``generation_config``, else the model's."""
    for source in (kwargs, kwargs.get("generation_config"), model.generation_config):
        value = source.get(key) if isinstance(source, dict) else getattr(source, key, None)
        if value is not None:
            return value
    return None


def _batched_drafter(model, kwargs: dict):
    """The reference decoder's drafter for the HF drafting mode requested in ``kwargs`` (popped)."""
    from adaptk.decoding import drafters  # noqa: PLC0415 - optional, torch-heavy

    assistant = kwargs.pop("assistant_model", None)
    exit_layer = _setting(model, kwargs, "assistant_early_exit")
    if exit_layer is not None:
        return drafters.EarlyExitDrafter(exit_layers=(int(exit_layer),), default_exit_layer=int(exit_layer))
    if _setting(model, kwargs, "prompt_lookup_num_tokens") is not None:
        return drafters.PromptLookupDrafter(max_ngram=int(_setting(model, kwargs, "max_matching_ngram_size") or 2))
    return drafters.DraftModelDrafter(assistant)


def _reference_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    adaptk_session: HFSpeculation | None = None,
    adaptk_drafter=None,
    **model_kwargs,
):
    """``custom_generate`` for batched assisted calls: the bundled reference decoder does the work.

    The rows of ``input_ids`` are left-padded prompts; the output has HF's layout: the padded
    prompts followed by each row's new tokens, padded with ``pad_token_id`` after it finished.
    """
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

    from adaptk.decoding.reference import SpeculativeDecoder  # noqa: PLC0415 - optional, torch-heavy

    config, session = generation_config, adaptk_session
    allowed = (TemperatureLogitsWarper, TopPLogitsWarper) if config.do_sample else ()
    unsupported = [type(p).__name__ for p in logits_processor or [] if not isinstance(p, allowed)]
    unsupported += [type(c).__name__ for c in stopping_criteria or [] if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))]
    if config.num_beams > 1 or config.output_scores or config.output_logits:
        unsupported.append("num_beams > 1 / output_scores / output_logits")
    if unsupported:
        raise NotImplementedError(
            f"batched generation under adaptk.adapters.hf runs on adaptk's reference decoder, which supports greedy "
            f"decoding and temperature/top-p sampling only; not {sorted(set(unsupported))}"
        )
    mask = model_kwargs.get("attention_mask")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    prompts = [row[keep].tolist() for row, keep in zip(input_ids, mask, strict=False)]
    k_max = session.k_max
    if k_max is None:
        k_max = config.prompt_lookup_num_tokens or DEFAULT_K_MAX
    controller = adaptk.make("fixed", k=session.fallback_k) if session.failed else session.controller
    decoder = SpeculativeDecoder(model, drafter=adaptk_drafter, controller=controller, k_max=int(k_max),
                                 fallback_k=session.fallback_k)
    result = decoder.generate(
        prompts,
        max_new_tokens=int(config.max_length) - input_ids.shape[1],
        temperature=float(config.temperature or 1.0) if config.do_sample else 0.0,
        top_p=float(config.top_p or 1.0) if config.do_sample else 1.0,
        seed=int(torch.randint(0, 2**62, (1,)).item()),  # reproducible under torch.manual_seed
        eos_token_id=config.eos_token_id,
    )
    new = [r.tokens for r in result.requests]
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    pad = pad[0] if isinstance(pad, (list, tuple)) else pad
    out = torch.full((len(new), max(map(len, new))), int(pad), dtype=input_ids.dtype)
    for i, tokens in enumerate(new):
        out[i, : len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
    sequences = torch.cat([input_ids, out.to(input_ids.device)], dim=1)
    session.batched_results.append(result)
    if config.return_dict_in_generate:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=sequences)
    return sequences
