"""Greedy speculation traces: the compact record that makes replay an exact counterfactual.

Under greedy verification the target's output does not depend on the draft length, and a
deterministic drafter proposes the same tokens from the same prefix. So for every output position
``t`` (``t`` tokens already generated) one number describes every schedule: the **match length**
``m_t``, how many consecutive draft tokens the target would accept if drafting started at ``t``.
Drafting ``k`` tokens at ``t`` drafts ``d = min(k, avail_t)`` (the drafter may have fewer to offer),
accepts ``min(d, m_t)`` and moves to ``t + min(d, m_t) + 1``.

A trace may hold several drafter **variants** (for early-exit self-speculation: one per exit
layer), each with its own ``match_len`` row. Per-position signals are *teacher-forced*: entry
``[v, t]`` is what variant ``v``'s drafter reports when predicting output token ``t`` from the
true prefix. Drafting from ``t`` sees the signals ``[v, t], [v, t+1], ...`` for as long as its
drafts match (exact); past the first rejection the real drafter would see its own wrong prefix,
which only affects how many tokens a stop rule lets it draft, never what is accepted.

On-disk format (``.npz``, loaded with ``allow_pickle=False`` — data only, never code):

========================  ===================  ===============================================
key                       dtype, shape         meaning
========================  ===================  ===============================================
``meta``                  uint8 (bytes)        UTF-8 JSON: format, version, drafter, k_max,
                                               variants, num_layers, model, per-trace ids,
                                               categories, prompt lengths, recording notes
``offsets``               int64 (S+1,)         trace ``s`` owns columns ``offsets[s]:offsets[s+1]``
``match_len``             uint8 (V, N)         ``m_t`` per variant, capped at ``k_max``
``draft_avail``           uint8 (V, N)         tokens the drafter can offer at ``t`` (optional)
``ngram_len``             uint8 (V, N)         prompt lookup: matched suffix length (optional)
``draft_prob``            float16 (V, N)       draft top-1 probability (optional)
``draft_entropy``         float16 (V, N)       draft entropy in nats (optional)
``kl``                    float16 (V, N)       KL(target ‖ draft) in nats (optional)
``layer_agree``           uint8 (N, ceil(L/8)) early exit: bit ``l`` set if layer ``l+1``'s shadow
                                               token equals the target token (optional, packbits)
========================  ===================  ===============================================

``N`` is the total number of output positions over all ``S`` traces.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Trace", "TraceSet", "TraceFormatError", "FORMAT", "VERSION"]

FORMAT = "adaptk-trace"
VERSION = 1

_ROW_FIELDS = ("match_len", "draft_avail", "ngram_len", "draft_prob", "draft_entropy", "kl")
_DTYPES = {
    "match_len": np.uint8,
    "draft_avail": np.uint8,
    "ngram_len": np.uint8,
    "draft_prob": np.float16,
    "draft_entropy": np.float16,
    "kl": np.float16,
}


class TraceFormatError(ValueError):
    """A trace file is truncated, corrupt, of another format or of an unsupported version."""


@dataclass
class Trace:
    """One recorded sequence. Per-position arrays have shape ``(num_variants, output_len)``.

    ``match_len`` may be given 1-D for a single-variant drafter.
    """

    prompt_id: str
    category: str
    prompt_len: int
    match_len: np.ndarray
    draft_avail: np.ndarray | None = None
    ngram_len: np.ndarray | None = None
    draft_prob: np.ndarray | None = None
    draft_entropy: np.ndarray | None = None
    kl: np.ndarray | None = None
    layer_agree: np.ndarray | None = None  # bool (output_len, num_layers)

    def __post_init__(self) -> None:
        match = np.asarray(self.match_len)
        if match.ndim == 1:
            match = match[None, :]
        if match.ndim != 2:
            raise ValueError(f"match_len must be (num_variants, output_len), got shape {match.shape}")
        if match.size and (match.min() < 0 or match.max() > 255):
            raise ValueError("match_len values must lie in [0, 255]")
        self.match_len = match.astype(np.uint8)
        for name in _ROW_FIELDS[1:]:
            value = getattr(self, name)
            if value is None:
                continue
            value = np.asarray(value)
            if value.ndim == 1:
                value = value[None, :]
            if value.shape != self.match_len.shape:
                raise ValueError(f"{name} has shape {value.shape}, match_len has {self.match_len.shape}")
            setattr(self, name, value.astype(_DTYPES[name]))
        if self.layer_agree is not None:
            agree = np.asarray(self.layer_agree, dtype=bool)
            if agree.ndim != 2 or agree.shape[0] != self.output_len:
                raise ValueError(f"layer_agree must be (output_len, num_layers), got {agree.shape}")
            self.layer_agree = agree
        if self.prompt_len < 0:
            raise ValueError("prompt_len must be >= 0")

    @property
    def output_len(self) -> int:
        return int(self.match_len.shape[1])

    @property
    def num_variants(self) -> int:
        return int(self.match_len.shape[0])


@dataclass
class TraceSet:
    """Traces recorded with one model and one drafter configuration.

    Parameters
    ----------
    traces
        The sequences.
    drafter
        ``"prompt_lookup"``, ``"early_exit"`` or ``"draft_model"`` (free-form for others).
    k_max
        The cap applied to ``match_len`` when recording; replay cannot draft more.
    variants
        One entry per variant row: the exit layer for early exit, else ``None``.
    num_layers
        Target depth (early exit).
    model
        Which target recorded it.
    meta
        Anything else worth keeping (recording command, drafter parameters, date).
    """

    traces: list[Trace]
    drafter: str
    k_max: int
    variants: list[int | None] = field(default_factory=lambda: [None])
    num_layers: int | None = None
    model: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.k_max <= 255:
            raise ValueError("k_max must lie in [0, 255]")
        for trace in self.traces:
            if trace.num_variants != len(self.variants):
                raise ValueError(
                    f"trace {trace.prompt_id!r} has {trace.num_variants} variants, the set declares {len(self.variants)}"
                )
            if trace.match_len.size and trace.match_len.max() > self.k_max:
                raise ValueError(f"trace {trace.prompt_id!r} has match_len above k_max={self.k_max}")

    def __len__(self) -> int:
        return len(self.traces)

    def __iter__(self) -> Iterator[Trace]:
        return iter(self.traces)

    @property
    def categories(self) -> list[str]:
        return sorted({t.category for t in self.traces})

    def subset(self, category: str | None = None, ids: Sequence[str] | None = None) -> TraceSet:
        """The traces of one task category and/or with the given prompt ids."""
        chosen = [
            t for t in self.traces
            if (category is None or t.category == category) and (ids is None or t.prompt_id in ids)
        ]
        return TraceSet(chosen, self.drafter, self.k_max, list(self.variants), self.num_layers, self.model, dict(self.meta))

    def variant_index(self, exit_layer: int | None) -> int:
        if exit_layer is None:
            return 0
        try:
            return self.variants.index(exit_layer)
        except ValueError:
            raise ValueError(f"exit layer {exit_layer} was not recorded; recorded: {self.variants}") from None

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the set as a compressed ``.npz`` (see the module docstring for the layout)."""
        lengths = [t.output_len for t in self.traces]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        num_variants = len(self.variants)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "drafter": self.drafter,
            "k_max": self.k_max,
            "variants": self.variants,
            "num_layers": self.num_layers,
            "model": self.model,
            "prompt_ids": [t.prompt_id for t in self.traces],
            "categories": [t.category for t in self.traces],
            "prompt_lens": [int(t.prompt_len) for t in self.traces],
            "meta": self.meta,
        }
        arrays: dict[str, np.ndarray] = {
            "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            "offsets": offsets,
        }
        for name in _ROW_FIELDS:
            present = [getattr(t, name) is not None for t in self.traces]
            if self.traces and all(present):
                arrays[name] = np.concatenate([getattr(t, name) for t in self.traces], axis=1)
            elif any(present):
                raise ValueError(f"{name} is set on some traces but not all")
            elif not self.traces and name == "match_len":
                arrays[name] = np.zeros((num_variants, 0), dtype=np.uint8)
        agree = [t.layer_agree for t in self.traces]
        if self.traces and all(a is not None for a in agree):
            widths = {a.shape[1] for a in agree}
            if len(widths) != 1:
                raise ValueError("layer_agree must have the same number of layers in every trace")
            meta["layer_agree_layers"] = widths.pop()
            arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
            arrays["layer_agree"] = np.packbits(np.concatenate(agree, axis=0), axis=1)
        elif any(a is not None for a in agree):
            raise ValueError("layer_agree is set on some traces but not all")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(buffer.getvalue())
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> TraceSet:
        """Read a set written by :meth:`save`; bad files raise :class:`TraceFormatError`."""
        path = Path(path)
        if not path.is_file():
            raise TraceFormatError(f"trace file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as exc:
            raise TraceFormatError(f"{path} is not a readable adaptk trace file (truncated or corrupt?): {exc}") from None
        try:
            meta = json.loads(arrays["meta"].tobytes().decode())
        except (KeyError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TraceFormatError(f"{path} has no valid metadata: {exc}") from None
        if meta.get("format") != FORMAT:
            raise TraceFormatError(f"{path} is not an adaptk trace file (format={meta.get('format')!r})")
        if meta.get("version") != VERSION:
            raise TraceFormatError(
                f"{path} has trace format version {meta.get('version')!r}; this adaptk reads version {VERSION}"
            )
        try:
            return cls._from_arrays(arrays, meta)
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise TraceFormatError(f"{path} is inconsistent: {exc}") from None

    @classmethod
    def _from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> TraceSet:
        offsets = arrays["offsets"]
        num = len(meta["prompt_ids"])
        if offsets.shape != (num + 1,) or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
            raise ValueError("offsets do not match the number of traces")
        total = int(offsets[-1])
        if arrays["match_len"].shape != (len(meta["variants"]), total):
            raise ValueError(f"match_len has shape {arrays['match_len'].shape}, expected ({len(meta['variants'])}, {total})")
        agree = None
        if "layer_agree" in arrays:
            agree = np.unpackbits(arrays["layer_agree"], axis=1, count=meta["layer_agree_layers"]).astype(bool)
            if agree.shape[0] != total:
                raise ValueError("layer_agree rows do not match the number of positions")
        traces = []
        for s in range(num):
            lo, hi = int(offsets[s]), int(offsets[s + 1])
            fields = {name: arrays[name][:, lo:hi] for name in _ROW_FIELDS if name in arrays}
            traces.append(
                Trace(
                    prompt_id=meta["prompt_ids"][s],
                    category=meta["categories"][s],
                    prompt_len=int(meta["prompt_lens"][s]),
                    layer_agree=None if agree is None else agree[lo:hi],
                    **fields,
                )
            )
        return cls(
            traces=traces,
            drafter=meta["drafter"],
            k_max=int(meta["k_max"]),
            variants=list(meta["variants"]),
            num_layers=meta.get("num_layers"),
            model=meta.get("model", ""),
            meta=meta.get("meta", {}),
        )
