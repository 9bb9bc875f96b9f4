"""A position-indexed KV cache and a direct layer-by-layer forward for Llama-family causal LMs.

Why not Hugging Face's ``DynamicCache``: it appends every fed token to every row and crops only
the whole batch, so ragged rollback leaves holes that grow with every rejected draft. Here the
cache slot of a token **is its position**: row ``r`` writes the key/value of the token at position
``p`` into slot ``p``. Rolling a row back to ``n`` valid tokens is free — the next forward simply
starts writing at slot ``n`` and overwrites whatever the rejected drafts left there.

The one invariant that makes this exact: **every forward of a row starts at that row's valid
frontier** (``start[i]`` = number of valid slots) and writes the contiguous positions
``start[i] .. start[i] + W - 1``. A query at position ``q`` attends slots ``0..q`` (the
position-causal mask), which are either valid or written by this very forward; stale slots
beyond the frontier (rejected drafts, right padding) are never attended before being rewritten.

Rows are batch slots. The decoder keeps the running sequences in rows ``0..b-1`` so that most
forwards read plain slice views; a subset of rows (ragged drafting rounds) is gathered.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from adaptk.decoding.allocator import retain_freed_memory

__all__ = ["PositionCache", "ModelRunner", "check_supported"]

Rows = slice | torch.Tensor  # a contiguous range of rows (views) or an index tensor (gathers)


class PositionCache:
    """Per layer, keys and values of shape ``[rows, kv_heads, capacity, head_dim]``.

    Implements the one method a Llama attention layer calls: ``update(k, v, layer_idx)``.
    Before a forward, :meth:`set_step` says which rows and positions it writes.
    """

    def __init__(self, num_layers: int, rows: int, kv_heads: int, capacity: int, head_dim: int, dtype, device) -> None:
        shape = (rows, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.rows, self.capacity = rows, capacity
        self._rows: Rows = slice(0, rows)
        self._pos: torch.Tensor | None = None  # [b, W] positions written by this forward
        self._kv_len = 0

    def set_step(self, rows: Rows, positions: torch.Tensor, kv_len: int) -> None:
        self._rows, self._pos, self._kv_len = rows, positions, kv_len

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key, value: [b, kv_heads, W, head_dim] -> full keys/values [b, kv_heads, kv_len, head_dim]
        rows, pos, n = self._rows, self._pos, self._kv_len
        K, V = self.keys[layer_idx], self.values[layer_idx]
        if isinstance(rows, slice):
            Kr, Vr = K[rows], V[rows]  # views
            b_idx = torch.arange(Kr.shape[0], device=K.device)[:, None]
            Kr[b_idx, :, pos] = key.transpose(1, 2)  # advanced dims first: [b, W, kv_heads, head_dim]
            Vr[b_idx, :, pos] = value.transpose(1, 2)
            return Kr[:, :, :n], Vr[:, :, :n]
        K[rows[:, None], :, pos] = key.transpose(1, 2)
        V[rows[:, None], :, pos] = value.transpose(1, 2)
        return K[rows, :, :n], V[rows, :, :n]

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` slots of row ``src`` into row ``dst`` (batch compaction)."""
        for K, V in zip(self.keys, self.values, strict=True):
            K[dst, :, :length] = K[src, :, :length]
            V[dst, :, :length] = V[src, :, :length]


def check_supported(model: nn.Module) -> None:
    """Raise ``ValueError`` unless ``model`` is a decoder-only causal LM with the Llama layout."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{type(model).__name__} is not a decoder-only causal language model")
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, a) for a in needed) or not hasattr(model, "lm_head"):
        raise ValueError(
            f"{type(model).__name__} is not a supported causal LM: the reference decoder needs the "
            "Llama layout (model.model.embed_tokens/layers/norm/rotary_emb and model.lm_head)"
        )


class ModelRunner:
    """Runs any contiguous range of a causal LM's layers over ragged rows of a :class:`PositionCache`.

    ``forward`` is the whole model when ``layers`` is ``None``; early-exit drafting runs
    ``range(0, L)`` and verification resumes with ``range(L, N)`` on the saved hidden states,
    reusing the first ``L`` layers' KV written while drafting. Time spent inside forwards is
    accumulated in ``forward_time_s`` (the decoder's Python overhead is the rest).
    """

    def __init__(self, model: nn.Module) -> None:
        check_supported(model)
        retain_freed_memory()  # ~2x faster forwards on CPU; see adaptk.decoding.allocator
        self.model = model
        self.inner = model.model
        config = model.config
        self.num_layers = len(self.inner.layers)
        self.vocab_size = model.lm_head.out_features
        self.kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.max_positions = int(getattr(config, "max_position_embeddings", 1 << 30))
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.cache: PositionCache | None = None
        self.forward_time_s = 0.0
        self._self_check()

    def allocate(self, rows: int, capacity: int) -> None:
        """Make room for ``rows`` sequences of up to ``capacity`` positions (reuses a big enough cache)."""
        c = self.cache
        if c is None or c.rows < rows or c.capacity < capacity:
            self.cache = PositionCache(self.num_layers, rows, self.kv_heads, capacity, self.head_dim, self.dtype, self.device)

    @torch.inference_mode()
    def forward(
        self,
        start: torch.Tensor,
        rows: Rows,
        input_ids: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        layers: range | None = None,
        head: bool = True,
        capture: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Feed ``W`` tokens (or layer inputs) per row at positions ``start[i] + 0..W-1``.

        input_ids: [b, W] or hidden: [b, W, hidden]. Returns logits [b, W, V] when ``head``
        (after the final norm) else the last layer's output [b, W, hidden], plus the outputs of the
        layers numbered in ``capture`` (layer ``l`` = output of the first ``l`` layers).
        """
        t0 = time.perf_counter()
        inner = self.inner
        layers = range(self.num_layers) if layers is None else layers
        h = inner.embed_tokens(input_ids) if hidden is None else hidden  # [b, W, D]
        b, W = h.shape[:2]
        pos = start[:, None] + torch.arange(W, device=h.device)  # [b, W]
        kv_len = int(start.max()) + W
        if W == 1 and bool((start == start[0]).all()):
            mask = None  # every row sees all kv_len slots
        else:  # position-causal: query at position p sees slots 0..p; [b, 1, W, kv_len]
            mask = (torch.arange(kv_len, device=h.device)[None, None, None, :] <= pos[:, None, :, None])
        self.cache.set_step(rows, pos, kv_len)
        rope = inner.rotary_emb(h, position_ids=pos)
        captured = {}
        for i in layers:
            h = inner.layers[i](h, attention_mask=mask, position_ids=pos, past_key_values=self.cache,
                                use_cache=True, position_embeddings=rope)
            if i + 1 in capture:
                captured[i + 1] = h
        if head:
            h = self.model.lm_head(inner.norm(h))
        self.forward_time_s += time.perf_counter() - t0
        return h, captured

    @torch.inference_mode()
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Early-exit logits ``lm_head(norm(h_L))``."""
        t0 = time.perf_counter()
        out = self.model.lm_head(self.inner.norm(hidden))
        self.forward_time_s += time.perf_counter() - t0
        return out

    def _self_check(self) -> None:
        """The direct layer loop must reproduce the model's own forward (catches unsupported layouts)."""
        ids = torch.tensor([[1, 5, 9, 3, 7]], device=self.device) % self.vocab_size
        with torch.inference_mode():
            want = self.model(input_ids=ids, use_cache=False).logits
        saved, self.cache = self.cache, PositionCache(self.num_layers, 1, self.kv_heads, 8, self.head_dim, self.dtype, self.device)
        try:
            got, _ = self.forward(torch.zeros(1, dtype=torch.long, device=self.device), slice(0, 1), ids[:, :3])
            nxt, _ = self.forward(torch.full((1,), 3, dtype=torch.long, device=self.device), slice(0, 1), ids[:, 3:])
        finally:
            self.cache, self.forward_time_s = saved, 0.0
        err = (torch.cat([got, nxt], 1) - want).abs().max().item()
        scale = want.abs().max().item() + 1e-6
        if not err <= 1e-3 * scale:
            raise ValueError(
                f"{type(self.model).__name__}: the reference decoder's layer loop does not reproduce the "
                f"model's forward (max error {err:.3g}); this architecture is not supported"
            )
