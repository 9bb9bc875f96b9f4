"""Drafters for the reference decoder: prompt lookup, early-exit self-speculation, a draft model.

A drafter proposes ``num_draft[i]`` tokens for each running sequence ``i``; the decoder verifies.
All three draft a whole batch at once with ragged lengths: round ``j`` feeds only the sequences
still drafting (``num_draft[i] > j``, and not stopped by the controller's stop rule).

* :class:`PromptLookupDrafter` copies the continuation of the earliest earlier occurrence of the
  longest matching suffix n-gram (:func:`adaptk.ngram.propose`); its proposal is a point mass.
* :class:`EarlyExitDrafter` drafts with the target's first ``L`` layers and ``lm_head(norm(h_L))``
  (LayerSkip-style self-speculation). The KV of those layers is written into the target's cache
  while drafting and **reused**: verification resumes at layer ``L`` from the saved ``h_L``.
* :class:`DraftModelDrafter` runs a separate small model with the same tokenizer and its own
  position-indexed KV cache (also rolled back per sequence).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from adaptk.decoding.kv import ModelRunner
from adaptk.decoding.sampling import draft_signals, logits_to_probs
from adaptk.ngram import propose

__all__ = ["Drafter", "PromptLookupDrafter", "EarlyExitDrafter", "DraftModelDrafter", "DraftBatch", "DraftOutput"]

StopFn = Callable[[np.ndarray, int, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class DraftBatch:
    """What the decoder hands a drafter each step; rows ``0..b-1`` are the running sequences."""

    tokens: list[list[int]]  # prompt + output so far, per row
    last: torch.Tensor  # [b] last emitted token (not yet fed to the target)
    start: torch.Tensor  # [b] target KV frontier = len(tokens[i]) - 1
    num_draft: np.ndarray  # [b] draft lengths the controller chose (already capped)
    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    stop: StopFn | None = None  # (rows, position, top1 probs, entropies) -> stop flags
    want_signals: bool = False  # draft top-1 probability and entropy per drafted token
    want_logits: bool = False  # raw draft logits (for KL(target || draft))
    exit_layer: int | None = None
    capture: tuple[int, ...] = ()  # early exit: layers whose outputs the decoder wants


@dataclass
class DraftOutput:
    tokens: torch.Tensor  # [b, K] drafted tokens (0 beyond num_draft[i])
    num_draft: np.ndarray  # [b] drafted per row (the stop rule may cut the request short)
    probs: torch.Tensor | None = None  # [b, K, V] sampling distributions q (None: point mass / greedy)
    logits: torch.Tensor | None = None  # [b, K, V] raw draft logits when want_logits
    top1: np.ndarray | None = None  # [b, K] draft top-1 probability (NaN beyond num_draft)
    entropy: np.ndarray | None = None  # [b, K] draft entropy in nats
    hidden: torch.Tensor | None = None  # early exit: [b, K+1, D] layer-L outputs to resume from
    exit_layer: int | None = None
    captured: dict[int, torch.Tensor] = field(default_factory=dict)  # early exit: layer -> [b, K+1, D]


class Drafter:
    """Base class. The decoder calls ``bind`` once, then per step ``hints`` (before the controller
    decides), ``draft`` and ``after_verify``; ``admit`` when sequences join."""

    name = "none"
    point_mass = False  # True when the proposal is deterministic (q = one-hot)

    def bind(self, target: ModelRunner) -> None:
        self.target = target

    def runners(self) -> list[ModelRunner]:
        """Extra KV caches the decoder must allocate, compact and prefill alongside the target."""
        return []

    def hints(self, tokens: list[list[int]], k_max: int) -> tuple[np.ndarray, np.ndarray] | None:
        """``(draft_available, match_ngram_lens)`` for the StepContext, or ``None``."""
        return None

    def draft(self, batch: DraftBatch) -> DraftOutput:
        raise NotImplementedError

    def after_verify(self, frontiers: list[int], num_draft: np.ndarray, accepted: np.ndarray) -> None:
        """Roll back drafter state once the target has accepted ``accepted[i]`` drafts."""

    def admit(self, row: int, frontier: int) -> None:
        """A sequence joined in ``row``; its prompt's first ``frontier`` tokens are prefilled."""

    def move_row(self, src: int, dst: int) -> None:
        """Batch compaction moved the sequence in row ``src`` to row ``dst``."""


def _sample_or_argmax(logits: torch.Tensor, batch: DraftBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if batch.temperature <= 0:
        return logits.argmax(-1), None
    q = logits_to_probs(logits, batch.temperature, batch.top_p)
    return torch.multinomial(q, 1, generator=batch.generator)[:, 0], q


class _RoundState:
    """Bookkeeping shared by the model-based drafters: tokens, q, signals, stop rule."""

    def __init__(self, batch: DraftBatch, vocab: int) -> None:
        b, K = len(batch.num_draft), int(batch.num_draft.max(initial=0))
        self.batch, self.K = batch, K
        self.k = batch.num_draft.copy()
        self.tokens = torch.zeros(b, K, dtype=torch.long)
        sampling = batch.temperature > 0
        self.probs = torch.zeros(b, K, vocab) if sampling and K else None
        self.logits = torch.zeros(b, K, vocab) if batch.want_logits and K else None
        signals = batch.want_signals or batch.stop is not None
        self.top1 = np.full((b, K), np.nan) if signals else None
        self.entropy = np.full((b, K), np.nan) if signals else None

    def record(self, rows: np.ndarray, j: int, logits: torch.Tensor) -> None:
        """Draft token ``j`` for ``rows`` from their draft logits [n, V]; ask the stop rule."""
        token, q = _sample_or_argmax(logits, self.batch)
        tr = torch.from_numpy(rows)
        self.tokens[tr, j] = token
        if q is not None:
            self.probs[tr, j] = q
        if self.logits is not None:
            self.logits[tr, j] = logits.float()
        if self.top1 is not None:
            top1, ent = draft_signals(logits)
            self.top1[rows, j], self.entropy[rows, j] = top1.numpy(), ent.numpy()
            if self.batch.stop is not None:
                stop = self.batch.stop(rows, j, self.top1[rows, j], self.entropy[rows, j])
                self.k[rows[stop]] = j + 1  # keep the token just drafted, draft no more

    def output(self, **kw) -> DraftOutput:
        return DraftOutput(self.tokens, self.k, self.probs, self.logits, self.top1, self.entropy, **kw)


def _rows(active: np.ndarray, b: int):
    return slice(0, b) if len(active) == b else torch.from_numpy(active)


class PromptLookupDrafter(Drafter):
    """Prompt lookup / n-gram drafting (Saxena 2023; HF ``prompt_lookup_num_tokens``).

    The n-gram search runs before the controller decides, so the StepContext carries the hint
    (``draft_available``, ``match_ngram_lens``); drafting then just slices the proposal.
    """

    name = "prompt_lookup"
    point_mass = True

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._proposals: list[np.ndarray] = []

    def hints(self, tokens, k_max):
        found = [propose(np.asarray(t), self.max_ngram, self.min_ngram, num_tokens=k_max) for t in tokens]
        self._proposals = [d for d, _ in found]
        return np.array([len(d) for d in self._proposals], dtype=np.int64), np.array([n for _, n in found], dtype=np.int64)

    def draft(self, batch):
        b, K = len(batch.num_draft), int(batch.num_draft.max(initial=0))
        tokens = torch.zeros(b, K, dtype=torch.long)
        k = np.minimum(batch.num_draft, [len(d) for d in self._proposals])
        for i in np.flatnonzero(k):
            tokens[i, : k[i]] = torch.from_numpy(self._proposals[i][: k[i]])
        return DraftOutput(tokens, k)


class EarlyExitDrafter(Drafter):
    """Self-speculation with the target's first ``exit_layer`` layers (LayerSkip, Elhoushi et al. 2024).

    ``exit_layers`` are the layers a controller may choose from (``Decision.exit_layer``); default
    ``default_exit_layer`` (or the deepest allowed layer) when it chooses none. Round ``j`` runs
    layers ``0..L-1`` on every sequence with ``num_draft[i] >= j`` — the last round only writes the
    last draft's shallow KV — so verification needs just layers ``L..N-1``.
    """

    name = "early_exit"

    def __init__(self, exit_layers: tuple[int, ...] | None = None, default_exit_layer: int | None = None) -> None:
        self.exit_layers = None if exit_layers is None else tuple(int(layer) for layer in exit_layers)
        self.default_exit_layer = default_exit_layer

    def bind(self, target):
        super().bind(target)
        n = target.num_layers
        if self.exit_layers is None:
            self.exit_layers = tuple(sorted({max(1, n * f // 4) for f in (1, 2, 3)}))
        if not self.exit_layers or any(not 1 <= layer < n for layer in self.exit_layers):
            raise ValueError(f"exit_layers must lie in [1, {n - 1}] for a {n}-layer model, got {self.exit_layers}")
        if self.default_exit_layer is None:
            self.default_exit_layer = max(self.exit_layers)
        if self.default_exit_layer not in self.exit_layers:
            raise ValueError(f"default_exit_layer {self.default_exit_layer} is not in exit_layers {self.exit_layers}")

    def draft(self, batch):
        L = batch.exit_layer or self.default_exit_layer
        runner, b = self.target, len(batch.num_draft)
        state = _RoundState(batch, runner.vocab_size)
        K, k = state.K, state.k
        hidden = None
        captured = {}
        shallow = tuple(layer for layer in batch.capture if layer < L)
        for j in range(K + 1):
            active = np.arange(b) if j == 0 else np.flatnonzero(k >= j)
            if not len(active):
                break
            ta = torch.from_numpy(active)
            ids = batch.last[:, None] if j == 0 else state.tokens[ta, j - 1 : j]
            h, cap = runner.forward(batch.start[ta] + j, _rows(active, b), input_ids=ids,
                                    layers=range(L), head=False, capture=shallow)
            if hidden is None:
                hidden = torch.zeros(b, K + 1, h.shape[-1], dtype=h.dtype)
                captured = {layer: torch.zeros_like(hidden) for layer in shallow}
            hidden[ta, j] = h[:, 0]
            for layer, hl in cap.items():
                captured[layer][ta, j] = hl[:, 0]
            more = k[active] > j
            if more.any():
                state.record(active[more], j, runner.head(h[torch.from_numpy(more), 0]))
        return state.output(hidden=hidden, exit_layer=L, captured=captured)


class DraftModelDrafter(Drafter):
    """A separate draft model sharing the target's tokenizer, with its own ragged KV cache.

    Its first round per step catches up on the tokens it has not seen (the previous step's
    accepted tokens and bonus) in one ragged forward; later rounds feed one draft each.
    """

    name = "draft_model"

    def __init__(self, model) -> None:
        self.model = model
        self.runner: ModelRunner | None = None
        self._frontier: list[int] = []  # per row: valid draft-KV slots

    def bind(self, target):
        super().bind(target)
        self.runner = ModelRunner(self.model)
        t, d = target.model.config, self.model.config
        if target.vocab_size != self.runner.vocab_size or getattr(t, "vocab_size", None) != getattr(d, "vocab_size", None):
            raise ValueError(
                f"draft model vocabulary ({getattr(d, 'vocab_size', None)}) differs from the target's "
                f"({getattr(t, 'vocab_size', None)}): drafter and target must share a tokenizer"
            )
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            a, c = getattr(t, name, None), getattr(d, name, None)
            if a is not None and c is not None and a != c:
                raise ValueError(f"draft model {name}={c} differs from the target's {a}: tokenizers do not match")

    def runners(self):
        return [self.runner]

    def admit(self, row, frontier):
        self._frontier += [0] * (row + 1 - len(self._frontier))
        self._frontier[row] = frontier

    def move_row(self, src, dst):
        self._frontier[dst] = self._frontier[src]

    def draft(self, batch):
        b = len(batch.num_draft)
        state = _RoundState(batch, self.runner.vocab_size)
        K, k = state.K, state.k
        for j in range(K):
            active = np.flatnonzero(k > j)
            if not len(active):
                break
            if j == 0:  # catch up: feed tokens[frontier:] per row, right-padded
                starts = [self._frontier[i] for i in active]
                chunks = [batch.tokens[i][s:] for i, s in zip(active, starts, strict=True)]
                width = max(map(len, chunks))
                ids = torch.zeros(len(active), width, dtype=torch.long)
                for r, c in enumerate(chunks):
                    ids[r, : len(c)] = torch.tensor(c)
                logits, _ = self.runner.forward(torch.tensor(starts), _rows(active, b), input_ids=ids)
                last_col = torch.tensor([len(c) - 1 for c in chunks])
                logits = logits[torch.arange(len(active)), last_col]  # [n, V]
                for i in active:
                    self._frontier[i] = len(batch.tokens[i])
            else:
                ta = torch.from_numpy(active)
                logits, _ = self.runner.forward(batch.start[ta] + j, _rows(active, b),
                                                input_ids=state.tokens[ta, j - 1 : j])
                logits = logits[:, 0]
            state.record(active, j, logits)
        return state.output()

    def after_verify(self, frontiers, num_draft, accepted):
        # fed positions start..start+k-1 (last token and drafts 1..k-1); the first a+1 are correct
        for i in np.flatnonzero(num_draft):
            self._frontier[i] = frontiers[i] + min(int(num_draft[i]), int(accepted[i]) + 1)
