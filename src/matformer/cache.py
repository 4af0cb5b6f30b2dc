"""A preallocated key/value cache, passed to ``MatFormerLM.forward`` by the caller.

The cache is plain state owned by whoever decodes; it is never stored on the modules, so one
set of weights can serve as drafter and target at the same time, with one cache or two
(arXiv 2310.07707 sec. 4.1.1). Like gpt-fast's cache it is preallocated, ``(n_layer, B,
n_kv_head, max_len, head_dim)`` held as one tensor per layer (separate storages, so a compiled
forward can write a layer's slots in place), and indexed by position: a forward call at ``start_pos``
writes slots ``start_pos .. start_pos + T - 1`` and attends to slots ``0 .. start_pos + T - 1``.
Rolling back rejected draft tokens therefore costs nothing: the next call simply writes at an
earlier position and never reads the stale slots beyond its end.

Batched prompts of different lengths are left-padded: row ``b`` holds real tokens from slot
``start[b]`` on. Padded slots are masked out of attention and rotary positions are counted from
``start[b]``, so each row computes exactly what it would compute alone.

A submodel with fewer (nested) attention heads writes and reads only its first kv heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .model import MatFormerLM


class KVCache:
    """Preallocated keys and values of every layer, written at explicit positions.

    Args:
        n_layer: Number of Transformer blocks.
        batch_size: Rows decoded together.
        n_kv_head: Key/value heads per layer (the full model's count).
        max_len: Slots per row: prompt plus everything that will be generated.
        head_dim: Size of one head.
        dtype: Storage dtype; must equal the dtype the model computes K/V in.
        device: Storage device.
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int,
                 head_dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        for name, value in (("n_layer", n_layer), ("batch_size", batch_size),
                            ("n_kv_head", n_kv_head), ("max_len", max_len),
                            ("head_dim", head_dim)):
            if value < 1:
                raise ValueError(f"KVCache {name}={value} must be >= 1")
        shape = (batch_size, n_kv_head, max_len, head_dim)
        #: Keys and values of every layer, (B, n_kv_head, max_len, head_dim) each. One tensor per
        #: layer rather than views of one: torch.compile writes separate graph inputs in place,
        #: but turns a write into a view of a shared input into a copy of the whole input.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        #: First real (non-padding) slot of every row.
        self.start = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._padded = False

    @classmethod
    def for_model(cls, model: MatFormerLM, batch_size: int, max_len: int | None = None, *,
                  dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache shaped for ``model``; ``max_len`` defaults to its context length."""
        cfg = model.config
        max_len = cfg.max_seq_len if max_len is None else max_len
        if not 1 <= max_len <= cfg.max_seq_len:
            raise ValueError(f"cache max_len={max_len} must be in 1..max_seq_len="
                             f"{cfg.max_seq_len} (prompt + new tokens must fit the context)")
        p = next(model.parameters())
        return cls(cfg.n_layer, batch_size, cfg.kv_heads, max_len, cfg.head_dim,
                   dtype=p.dtype if dtype is None else dtype, device=p.device)

    # ----------------------------------------------------------------- shape
    @property
    def n_layer(self) -> int:
        return len(self.keys)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    # ----------------------------------------------------------------- padding
    def set_prompt_lengths(self, lengths: Sequence[int] | Tensor, padded_len: int) -> None:
        """Declare left-padded prompts: row ``b``'s real tokens fill the last ``lengths[b]``
        of the first ``padded_len`` slots."""
        lengths = torch.as_tensor(lengths, dtype=torch.long, device=self.start.device)
        if lengths.shape != (self.batch_size,):
            raise ValueError(f"need one prompt length per row ({self.batch_size}), "
                             f"got shape {tuple(lengths.shape)}")
        if bool((lengths < 1).any()) or bool((lengths > padded_len).any()):
            raise ValueError(f"prompt lengths {lengths.tolist()} must be in 1..{padded_len}")
        self.start = padded_len - lengths
        self._padded = bool(self.start.any())

    @property
    def padded(self) -> bool:
        """True while some row starts after slot 0 (a left-padded batch)."""
        return self._padded

    # ----------------------------------------------------------------- used by the model
    def prepare(self, start_pos: int, T: int, rope_cos: Tensor, rope_sin: Tensor
                ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Rotary tables and attention mask for a forward over slots ``start_pos..+T``.

        Returns:
            ``cos, sin`` of shape (T, 1, hd), or (B, T, 1, hd) with padding (the layout of
            :func:`~matformer.block.rotate`); and a boolean mask
            (B or 1, 1, T, start_pos + T), True where a query may attend, or None when every
            key is visible (one query, no padding).
        """
        end = start_pos + T
        if start_pos < 0 or end > self.max_len:
            raise ValueError(f"positions {start_pos}..{end - 1} do not fit the cache "
                             f"(max_len={self.max_len})")
        dev = self.start.device
        if not self._padded:
            if T == 1:
                return rope_cos[start_pos:end, None], rope_sin[start_pos:end, None], None
            q = torch.arange(start_pos, end, device=dev)[:, None]
            mask = torch.arange(end, device=dev)[None, :] <= q  # (T, end) causal
            return rope_cos[start_pos:end, None], rope_sin[start_pos:end, None], mask[None, None]
        # Rotary positions count from each row's first real token (padding slots clamp to 0).
        slots = torch.arange(start_pos, end, device=dev)
        pos = (slots[None, :] - self.start[:, None]).clamp_min(0)  # (B, T)
        cos, sin = rope_cos[pos][:, :, None], rope_sin[pos][:, :, None]  # (B, T, 1, hd)
        keys = torch.arange(end, device=dev)[None, None, :]  # (1, 1, end)
        q = slots[None, :, None]  # (1, T, 1)
        # A padding query sees only itself, so no row of the softmax is empty (NaN-free).
        mask = (keys <= q) & ((keys >= self.start[:, None, None]) | (keys == q))
        return cos, sin, mask[:, None]  # (B, 1, T, end)

    def update(self, layer: int, start_pos: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write (B, kvh, T, hd) keys/values at ``start_pos`` into the first kvh heads; return
        that layer's keys/values for slots ``0 .. start_pos + T - 1``."""
        B, kvh, T, _ = k.shape
        if k.dtype != self.dtype:
            raise ValueError(f"KVCache holds {self.dtype} but the model computed {k.dtype}; "
                             "make the cache with the compute dtype (no autocast mismatch)")
        if B != self.batch_size:
            raise ValueError(f"batch of {B} rows does not match the cache's {self.batch_size}")
        end = start_pos + T
        kl, vl = self.keys[layer], self.values[layer]
        kl[:, :kvh, start_pos:end] = k
        vl[:, :kvh, start_pos:end] = v
        return kl[:, :kvh, :end], vl[:, :kvh, :end]
