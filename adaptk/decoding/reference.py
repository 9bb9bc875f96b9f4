"""The reference batched speculative decoder: ragged per-sequence ``k``, continuous batching.

One step for the ``b`` running sequences (rows ``0..b-1``), exactly the step protocol of
:mod:`adaptk.core`::

    hints    = drafter.hints(tokens)                  # prompt lookup: n-gram search first
    decision = controller.decide(StepContext(...))    # k_i per sequence, exit layer
    drafts   = drafter.draft(k_i)                     # ragged rounds; stop rule per token
    logits   = target.forward([last, x_1..x_K])       # [b, K+1, V], one verify pass
    a_i, y_i = verify(logits, drafts)                 # greedy or rejection sampling
    emit x_1..x_{a_i}, y_i; roll back to len - 1      # position-indexed cache: free
    controller.update(Feedback(...)); on_sequence_end(...)

The target's KV frontier of a sequence is always ``len(tokens) - 1``: the last emitted token is
fed at the start of the next step together with the drafts (see :mod:`adaptk.decoding.kv`).
Requests join (at their arrival times, up to ``concurrency``) as others leave.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from adaptk.core import SpeculationController
from adaptk.decoding.drafters import DraftBatch, Drafter, EarlyExitDrafter, PromptLookupDrafter
from adaptk.decoding.kv import ModelRunner
from adaptk.decoding.sampling import greedy_verify, logits_to_probs, rejection_sample
from adaptk.guard import GuardedController
from adaptk.registry import from_spec
from adaptk.types import Feedback, StepContext

__all__ = ["SpeculativeDecoder", "GenerationResult", "RequestResult", "StepRecord"]


@dataclass
class RequestResult:
    """One request's output and statistics (times in seconds from the start of ``generate``).

    Every verification step of a sequence emits ``accepted + 1`` tokens, so
    ``num_steps + num_accepted_tokens == len(tokens) + num_truncated``, where ``num_truncated``
    counts tokens verified in the last step but dropped after an end-of-sequence token. Draft
    lengths are capped so that a step never overshoots ``max_new_tokens``.
    """

    seq_id: int
    prompt_len: int
    tokens: list[int]
    finish_reason: str  # "eos", "length" or "context"
    num_steps: int
    num_draft_tokens: int
    num_accepted_tokens: int
    num_truncated: int
    arrival_time_s: float
    start_time_s: float
    finish_time_s: float

    @property
    def latency_s(self) -> float:
        """Arrival to last token, queueing included."""
        return self.finish_time_s - self.arrival_time_s

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / max(self.finish_time_s - self.start_time_s, 1e-9)

    @property
    def mean_acceptance_length(self) -> float:
        return (self.num_accepted_tokens + self.num_steps) / max(self.num_steps, 1)


@dataclass
class StepRecord:
    step: int
    batch_size: int
    num_draft_tokens: int  # summed over the batch
    num_accepted_tokens: int
    draft_time_s: float  # n-gram search / drafting rounds
    verify_time_s: float  # verify forward + acceptance
    step_time_s: float  # the whole step, controller and bookkeeping included
    forward_time_s: float  # time inside model forwards (the rest is Python overhead)
    exit_layer: int | None = None


@dataclass
class GenerationResult:
    requests: list[RequestResult]
    steps: list[StepRecord]
    wall_time_s: float
    prefill_time_s: float
    controller_failed: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, i: int) -> RequestResult:
        return self.requests[i]

    def __iter__(self):
        return iter(self.requests)

    @property
    def num_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.requests)

    @property
    def token_goodput(self) -> float:
        """Generated tokens per second of wall time."""
        return self.num_tokens / max(self.wall_time_s, 1e-9)

    @property
    def mean_acceptance_length(self) -> float:
        steps = sum(r.num_steps for r in self.requests)
        return (sum(r.num_accepted_tokens for r in self.requests) + steps) / max(steps, 1)

    @property
    def overhead_fraction(self) -> float:
        """Share of step time spent outside model forwards (the decoder's Python overhead)."""
        total = sum(s.step_time_s for s in self.steps)
        return 1.0 - sum(s.forward_time_s for s in self.steps) / max(total, 1e-12)


@dataclass
class _Seq:
    seq_id: int
    tokens: list[int]
    prompt_len: int
    max_new: int
    arrival: float
    start: float
    num_steps: int = 0
    num_drafted: int = 0
    num_accepted: int = 0

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len


_MODEL_EOS = "model"


class SpeculativeDecoder:
    """Batched speculative decoding of a Hugging Face causal LM (Llama layout) with a controller.

    Parameters
    ----------
    model
        The target, e.g. ``LlamaForCausalLM``; put it in eval mode.
    drafter
        :class:`PromptLookupDrafter` (default), :class:`EarlyExitDrafter` or
        :class:`DraftModelDrafter`.
    controller
        A :class:`~adaptk.SpeculationController` or a registry spec (``"fixed"``,
        ``{"name": "fixed", "params": {"k": 3}}``). It is always driven through
        :class:`~adaptk.guard.GuardedController`: if it raises, decoding continues with
        ``fallback_k`` and a warning. Its learned state persists across ``generate`` calls.
    k_max
        The most draft tokens per sequence per step.
    """

    def __init__(self, model, drafter: Drafter | None = None, controller: Any = "fixed", k_max: int = 8,
                 fallback_k: int = 2) -> None:
        if isinstance(k_max, bool) or not isinstance(k_max, (int, np.integer)) or k_max < 0:
            raise ValueError(f"k_max must be a non-negative int, got {k_max!r}")
        self.target = ModelRunner(model)  # raises ValueError for non-causal / unsupported models
        self.model = model
        self.drafter = drafter if drafter is not None else PromptLookupDrafter()
        self.drafter.bind(self.target)
        self.controller: SpeculationController = from_spec(controller)
        self.k_max = int(k_max)
        self.fallback_k = fallback_k

    # -- public API ------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int | Sequence[int] = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        concurrency: int | None = None,
        arrival_times: Sequence[float] | None = None,
        eos_token_id: int | Sequence[int] | None | str = _MODEL_EOS,
    ) -> GenerationResult:
        """Generate for every prompt (lists of token ids); results come back in prompt order.

        ``max_new_tokens`` is one budget for all or one per prompt. ``temperature=0`` is greedy (token-identical to plain greedy decoding); otherwise rejection
        sampling with ``temperature``/``top_p``. ``concurrency`` bounds the running batch (default:
        all prompts at once); ``arrival_times`` (seconds from the call) admit requests over time.
        ``eos_token_id`` defaults to the model's ``generation_config``; ``None`` never stops early.
        """
        prompts, budgets = self._check_inputs(prompts, max_new_tokens, temperature, top_p, concurrency, arrival_times)
        n = len(prompts)
        concurrency = n if concurrency is None else int(concurrency)
        arrivals = [0.0] * n if arrival_times is None else [float(a) for a in arrival_times]
        eos = self._eos_ids(eos_token_id)
        generator = torch.Generator()
        generator.manual_seed(seed) if seed is not None else generator.seed()
        guard = GuardedController(self.controller, fallback_k=self.fallback_k)
        rows = min(concurrency, n)
        capacity = max(len(p) + m for p, m in zip(prompts, budgets, strict=True)) + self.k_max + 2
        runners = [self.target, *self.drafter.runners()]
        for runner in runners:
            runner.allocate(rows, capacity)

        waiting = sorted(range(n), key=lambda i: (arrivals[i], i))
        active: list[_Seq] = []
        results: list[RequestResult | None] = [None] * n
        steps: list[StepRecord] = []
        prefill_time = 0.0
        t0 = time.perf_counter()
        clock = lambda: time.perf_counter() - t0  # noqa: E731
        with torch.inference_mode():
            while waiting or active:
                now = clock()
                joined = []
                while waiting and len(active) < concurrency and arrivals[waiting[0]] <= now:
                    i = waiting.pop(0)
                    seq = _Seq(i, list(prompts[i]), len(prompts[i]), budgets[i], arrivals[i], now)
                    active.append(seq)
                    joined.append(seq)
                if not active:
                    time.sleep(max(0.0, arrivals[waiting[0]] - now))
                    continue
                if joined:
                    t = time.perf_counter()
                    self._prefill(runners, len(active) - len(joined), joined)
                    prefill_time += time.perf_counter() - t
                done = self._step(len(steps), active, guard, steps, temperature, top_p, generator, eos, len(waiting))
                now = clock()
                for row in sorted(done, reverse=True):  # compaction: the last row fills the hole
                    seq, reason, truncated = active[row], *done[row]
                    guard.on_sequence_end(seq.seq_id)
                    results[seq.seq_id] = RequestResult(
                        seq.seq_id, seq.prompt_len, seq.tokens[seq.prompt_len:], reason, seq.num_steps,
                        seq.num_drafted, seq.num_accepted, truncated, seq.arrival, seq.start, now)
                    last = len(active) - 1
                    if row != last:
                        for runner in runners:
                            runner.cache.move_row(last, row, len(active[last].tokens))
                        self.drafter.move_row(last, row)
                        active[row] = active[last]
                    active.pop()
        return GenerationResult(results, steps, clock(), prefill_time, guard.failed)

    # -- one decoding step -----------------------------------------------------------------------
    def _step(self, step, active, guard, steps, temperature, top_p, generator, eos, queue_len):
        t_step = time.perf_counter()
        fwd0 = sum(r.forward_time_s for r in (self.target, *self.drafter.runners()))
        b = len(active)
        tokens = [s.tokens for s in active]
        seq_ids = np.array([s.seq_id for s in active])
        lens = np.array([len(t) for t in tokens])
        drafter = self.drafter
        early_exit = isinstance(drafter, EarlyExitDrafter)

        t = time.perf_counter()
        hints = drafter.hints(tokens, self.k_max) if self.k_max else None
        draft_time = time.perf_counter() - t
        context = StepContext(
            step=step, seq_ids=seq_ids, context_lens=lens, k_max=self.k_max,
            num_layers=self.target.num_layers if early_exit else None,
            exit_layers=drafter.exit_layers if early_exit else None,
            draft_available=None if hints is None else hints[0],
            match_ngram_lens=None if hints is None else hints[1],
            queue_len=queue_len,
        )
        decision = guard.decide(context)
        # engine caps: never draft past max_new_tokens, the context window, or what is on offer
        room = np.array([min(s.max_new - s.num_generated, self.target.max_positions - len(s.tokens)) - 1 for s in active])
        k = np.minimum(decision.num_draft_tokens, np.maximum(room, 0))
        if hints is not None:
            k = np.minimum(k, hints[0])

        required = getattr(guard.controller, "required_signals", frozenset()) if not guard.failed else frozenset()
        has_stop = guard.stop_rule is not None and not drafter.point_mass
        exit_layer = (decision.exit_layer or drafter.default_exit_layer) if early_exit else None
        capture = tuple(drafter.exit_layers) if early_exit and "layer_agreement" in required else ()
        last = torch.tensor([t[-1] for t in tokens])
        start = torch.from_numpy(lens - 1)  # target KV frontier per row

        out = None
        if k.max(initial=0) > 0:
            t = time.perf_counter()
            out = drafter.draft(DraftBatch(
                tokens, last, start, k, temperature, top_p, generator,
                stop=(lambda r, j, p, h: guard.should_stop(seq_ids[r], j, p, h)) if has_stop else None,
                want_signals=bool({"draft_probs", "draft_entropies"} & required),
                want_logits="kl_divergences" in required, exit_layer=exit_layer, capture=capture))
            draft_time += time.perf_counter() - t
            k = out.num_draft
        K = int(k.max(initial=0))

        # verify: [b, K+1] = the last emitted token followed by the drafts
        t = time.perf_counter()
        drafts = out.tokens[:, :K] if out is not None else torch.zeros(b, 0, dtype=torch.long)
        k_t = torch.from_numpy(k)
        deep = {}
        if out is not None and out.hidden is not None:  # early exit: resume at layer L on h_L
            logits, deep = self.target.forward(start, slice(0, b), hidden=out.hidden[:, : K + 1],
                                               layers=range(out.exit_layer, self.target.num_layers), capture=capture)
        else:  # (early exit with nothing drafted still scores the exit layers: a backed-off controller needs it)
            logits, deep = self.target.forward(start, slice(0, b), input_ids=torch.cat([last[:, None], drafts], 1),
                                               capture=capture)
        if temperature <= 0:
            accepted, nxt, _ = greedy_verify(logits, drafts, k_t)
        else:
            p = logits_to_probs(logits, temperature, top_p)
            q = None if out is None or drafter.point_mass else out.probs[:, :K]
            accepted, nxt = rejection_sample(p, drafts, q, k_t, generator)
        verify_time = time.perf_counter() - t

        a = accepted.numpy()
        emitted = torch.cat([drafts, nxt[:, None]], 1)  # row i emits emitted[i, :a_i] + nxt_i
        emitted.scatter_(1, accepted[:, None], nxt[:, None])
        emitted_rows = emitted.tolist()
        signals = self._signals(required, out, logits, emitted, a, k, deep, capture)
        drafter.after_verify((lens - 1).tolist(), k, a)

        done = {}
        for i, seq in enumerate(active):
            new = emitted_rows[i][: a[i] + 1]
            seq.num_steps += 1
            seq.num_drafted += int(k[i])
            seq.num_accepted += int(a[i])
            reason = None
            cut = next((j for j, tok in enumerate(new) if tok in eos), None)
            if cut is not None:
                new, reason = new[: cut + 1], "eos"
            seq.tokens.extend(new)
            if reason is None and seq.num_generated >= seq.max_new:
                reason = "length"
            if reason is None and len(seq.tokens) >= self.target.max_positions:
                reason = "context"
            if reason is not None:
                done[i] = (reason, int(a[i]) + 1 - len(new))

        finished = np.zeros(b, dtype=bool)
        finished[list(done)] = True
        guard.update(Feedback(
            seq_ids=seq_ids, num_draft_tokens=k, num_accepted_tokens=a, draft_time_s=draft_time,
            verify_time_s=verify_time, step=step, exit_layer=exit_layer, finished=finished, **signals))
        fwd = sum(r.forward_time_s for r in (self.target, *self.drafter.runners())) - fwd0
        steps.append(StepRecord(step, b, int(k.sum()), int(a.sum()), draft_time, verify_time,
                                time.perf_counter() - t_step, fwd, exit_layer))
        return done

    def _signals(self, required, out, logits, emitted, a, k, deep, capture) -> dict[str, np.ndarray]:
        """Per-position feedback signals, computed only when the controller asks for them."""
        signals: dict[str, np.ndarray] = {}
        K = int(k.max(initial=0))
        if out is not None and out.top1 is not None and {"draft_probs", "draft_entropies"} & required:
            signals["draft_probs"], signals["draft_entropies"] = out.top1[:, :K], out.entropy[:, :K]
        if out is not None and out.logits is not None and "kl_divergences" in required:
            logp = logits[:, :K].float().log_softmax(-1)  # target, position j predicts draft j
            logq = out.logits[:, :K].log_softmax(-1)
            kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0).numpy()
            kl[np.arange(K)[None, :] >= k[:, None]] = np.nan
            signals["kl_divergences"] = kl
        if capture:
            # shadow token of layer l at verified position j = argmax lm_head(norm(h_l[j])),
            # compared with the emitted token over the a_i + 1 positions with a true prefix
            b, N = len(k), self.target.num_layers
            matches, compared = np.zeros((b, N), dtype=np.int64), np.zeros((b, N), dtype=np.int64)
            rows = torch.from_numpy(np.repeat(np.arange(b), a + 1))
            cols = torch.from_numpy(np.concatenate([np.arange(n + 1) for n in a]))
            want = emitted[rows, cols]
            L = out.exit_layer if out is not None else 0
            for layer in capture:
                h = out.hidden if layer == L else (out.captured[layer] if layer < L else deep[layer])
                hit = (self.target.head(h[rows, cols]).argmax(-1) == want).numpy()
                np.add.at(matches[:, layer - 1], rows.numpy(), hit)
                compared[:, layer - 1] = a + 1
            signals["layer_matches"], signals["layer_compared"] = matches, compared
        return signals

    # -- helpers ---------------------------------------------------------------------------------
    def _prefill(self, runners, first_row, joined) -> None:
        """Feed each new prompt except its last token (fed by the first step) into rows first_row...

        One prompt per forward: right-padding unequal prompts into one forward would compute every
        prompt at the longest one's length, and on a compute-bound device that costs more than the
        extra forward calls.
        """
        start = torch.zeros(1, dtype=torch.long)
        for r, s in enumerate(joined):
            chunk = s.tokens[:-1]
            if len(chunk):
                ids = torch.tensor([list(chunk)], dtype=torch.long)
                for runner in runners:
                    runner.forward(start, slice(first_row + r, first_row + r + 1), input_ids=ids, head=False)
            self.drafter.admit(first_row + r, len(chunk))

    def _eos_ids(self, eos_token_id) -> set[int]:
        if isinstance(eos_token_id, str) and eos_token_id == _MODEL_EOS:
            config = getattr(self.model, "generation_config", None)
            eos_token_id = getattr(config, "eos_token_id", None) if config is not None else None
        if eos_token_id is None:
            return set()
        return {int(eos_token_id)} if isinstance(eos_token_id, (int, np.integer)) else {int(e) for e in eos_token_id}

    def _check_inputs(self, prompts, max_new_tokens, temperature, top_p, concurrency, arrival_times):
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not len(prompts):
            raise ValueError("prompts must be a non-empty list of token-id lists")
        vocab, limit = self.target.vocab_size, self.target.max_positions
        checked = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, torch.Tensor):
                prompt = prompt.tolist()
            if isinstance(prompt, (str, bytes)) or not isinstance(prompt, (Sequence, np.ndarray)):
                raise ValueError(f"prompt {i} must be a list of token ids, got {type(prompt).__name__}")
            prompt = [int(t) for t in prompt]
            if not prompt:
                raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
            if min(prompt) < 0 or max(prompt) >= vocab:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab})")
            if len(prompt) >= limit:
                raise ValueError(f"prompt {i} has {len(prompt)} tokens; the model's context is {limit} positions")
            checked.append(prompt)
        budgets = [max_new_tokens] * len(checked) if isinstance(max_new_tokens, (int, np.integer)) else list(max_new_tokens)
        if len(budgets) != len(checked) or any(
                isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1 for m in budgets):
            raise ValueError(f"max_new_tokens must be an int >= 1 or one such int per prompt, got {max_new_tokens!r}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")
        if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, (int, np.integer)) or concurrency < 1):
            raise ValueError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if arrival_times is not None:
            times = np.asarray(arrival_times, dtype=float)
            if times.shape != (len(checked),) or not np.all(np.isfinite(times)) or np.any(times < 0):
                raise ValueError("arrival_times must hold one finite, non-negative time (s) per prompt")
        return checked, [int(m) for m in budgets]
