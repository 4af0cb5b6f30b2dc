"""A KV cache for continuous batching: every row (slot) at its own position.

:class:`~matformer.cache.KVCache` decodes a batch in lock step (one ``start_pos`` for every
row). A server's rows come and go: a request joins with its own prompt length while others are
half-way through theirs. :class:`SlotCache` keeps the same storage (per layer, ``(slots, n_kv_head,
max_len, head_dim)``), but records a length per slot; before each forward the
scheduler :meth:`~SlotCache.select` s the slots taking part (a contiguous range, so the K/V
read back are views) and each row writes at its own next position and attends to its own
history only. K/V shapes do not depend on FFN width, so rows of any submodel share it.

It answers the two calls :class:`~matformer.model.MatFormerLM` makes of a cache (``prepare``
and ``update``); ``start_pos`` is ignored there because the positions come from the slots.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..cache import KVCache


class SlotCache(KVCache):
    """KV cache whose rows are independent request slots (see the module docstring).

    Make one with :meth:`KVCache.for_model` (``batch_size`` = number of slots).
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        #: Filled positions of every slot.
        self.lengths = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        self._rows = slice(0, 0)
        self._pos: Tensor | None = None
        self._end = 0
        self._mask: Tensor | None = None

    def select(self, first: int, count: int, T: int) -> None:
        """Take slots ``first .. first + count - 1`` into the next forward of ``T`` tokens each:
        row ``b`` writes positions ``lengths[b] .. lengths[b] + T - 1``."""
        if count < 1 or first < 0 or first + count > self.batch_size:
            raise ValueError(f"slots {first}..{first + count - 1} outside 0..{self.batch_size - 1}")
        rows = slice(first, first + count)
        pos = self.lengths[rows, None] + torch.arange(T, device=self.device)  # (B, T)
        if int(pos.max()) >= self.max_len:
            raise ValueError(f"a slot would pass the cache's {self.max_len} positions")
        self._rows, self._pos, self._end = rows, pos, int(pos.max()) + 1
        self._mask: Tensor | None = None

    def advance(self) -> None:
        """Count the selected rows' tokens of the last forward as filled."""
        self.lengths[self._rows] += self._pos.shape[1]

    def clear(self, slot: int) -> None:
        """Free a slot (its stale K/V are never read: attention stops at the slot's length)."""
        self.lengths[slot] = 0

    def move(self, src: int, dst: int) -> None:
        """Copy slot ``src`` (its filled positions) into ``dst``; keeps active slots packed."""
        n = int(self.lengths[src])
        for kl, vl in zip(self.keys, self.values, strict=True):
            kl[dst, :, :n] = kl[src, :, :n]
            vl[dst, :, :n] = vl[src, :, :n]
        self.lengths[dst] = n

    # ----------------------------------------------------------------- used by the model
    def prepare(self, start_pos: int, T: int, rope_cos: Tensor, rope_sin: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-row rotary tables (B, T, 1, hd) and the additive mask (B, 1, T, end) of each
        row's own history; ``start_pos`` is unused (each slot knows its position)."""
        pos = self._pos
        if pos is None or pos.shape[1] != T:
            raise ValueError(f"select() the slots for a {T}-token forward first")
        if self._mask is None:  # once per forward, not once per layer
            keys = torch.arange(self._end, device=pos.device)
            visible = keys[None, None, :] <= pos[:, :, None]  # (B, T, end)
            # additive (0 / -inf) in the compute dtype: attention then skips a bool -> float
            # conversion in every layer
            mask = torch.zeros(visible.shape, dtype=rope_cos.dtype, device=pos.device)
            self._mask = mask.masked_fill_(~visible, float("-inf"))[:, None]
        return rope_cos[pos][:, :, None], rope_sin[pos][:, :, None], self._mask

    def update(self, layer: int, start_pos: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write (B, kvh, T, hd) keys/values at each selected row's positions; return the rows'
        keys/values up to the furthest position (views of the storage)."""
        B, kvh, T, _ = k.shape
        pos = self._pos
        if pos is None or pos.shape != (B, T):
            raise ValueError(f"{B}x{T} keys do not match the selected slots")
        if k.dtype != self.dtype:
            raise ValueError(f"SlotCache holds {self.dtype} but the model computed {k.dtype}")
        rows = torch.arange(B, device=pos.device)[:, None]  # (B, 1) against pos (B, T)
        kl, vl = self.keys[layer][self._rows], self.values[layer][self._rows]  # (B, H, max_len, hd)
        kl[rows, :kvh, pos] = k.transpose(1, 2)  # indexed as (B, T, kvh, hd)
        vl[rows, :kvh, pos] = v.transpose(1, 2)
        return kl[:, :kvh, : self._end], vl[:, :kvh, : self._end]
