"""The model side of serving: one weight copy, one slot cache, mixed-width forwards, sampling.

The :class:`~matformer.serve.scheduler.Scheduler` decides which request sits in which slot and
when; an :class:`Executor` runs what it decided. A prefill puts one request's prompt into its
slot at the request's own submodel; a decode step runs every active row at once through the
model's one forward with a :class:`~matformer.model.RowWidths` (attention, norms, embeddings
and the head once for the whole batch, each layer's FFN once per distinct width on the rows
that use it). The cached K/V do not depend on FFN width, so a row may change submodel between
steps and continue from them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..config import Submodel
from ..generate import sample_next
from ..model import MatFormerLM, RowWidths
from .cache import SlotCache


class Executor:
    """Runs prefills and batched decode steps over the slots of one :class:`SlotCache`.

    Args:
        model: The one model (put in eval mode, never copied).
        slots: Rows decoded together (the cache's batch size).
        context: Positions each slot holds (prompt + generated tokens); None: the model's
            whole context. The cache takes ``slots x context`` positions of K/V in every layer:
            at SmolLM2-135M's 8,192 that is 3 GB for 8 slots.
    """

    def __init__(self, model: MatFormerLM, slots: int, context: int | None = None) -> None:
        if model.config.nest_heads:  # one forward runs one set of heads for every row
            raise ValueError("serving a model with nested attention heads (nest_heads) is not "
                             "supported yet: its submodels differ in heads, not only FFN widths")
        self.model = model.eval()
        self.cache = SlotCache.for_model(model, slots, context)
        self._batch: tuple[tuple[Submodel, ...], RowWidths] | None = None

    @property
    def context(self) -> int:
        """Positions a slot holds (``context``, or the model's whole context)."""
        return self.cache.max_len

    @torch.no_grad()
    def prefill(self, slot: int, prompt: Sequence[int], sub: Submodel) -> Tensor:
        """Write ``prompt`` into ``slot`` (emptied first) with submodel ``sub``; the last
        position's logits (1, vocab)."""
        self.cache.clear(slot)
        self.cache.select(slot, 1, len(prompt))
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=self.cache.device)
        logits = self.model(ids, widths=sub, cache=self.cache)[:, -1]
        self.cache.advance()
        return logits

    @torch.no_grad()
    def decode(self, last: Sequence[int], subs: Sequence[Submodel]) -> Tensor:
        """One step of slots ``0 .. len(last) - 1``: row ``b`` feeds token ``last[b]`` through
        submodel ``subs[b]``. Returns (rows, vocab) logits."""
        key = tuple(subs)
        if self._batch is None or self._batch[0] != key:  # the batch changed: regroup rows
            self._batch = (key, RowWidths(key))
        self.cache.select(0, len(last), 1)
        ids = torch.tensor([[t] for t in last], dtype=torch.long, device=self.cache.device)
        logits = self.model(ids, widths=self._batch[1], cache=self.cache)[:, -1]
        self.cache.advance()
        return logits

    def move(self, src: int, dst: int) -> None:
        """Copy slot ``src`` into ``dst`` (keeps the active slots packed)."""
        self.cache.move(src, dst)

    def free(self, slot: int) -> None:
        self.cache.clear(slot)


def sample(logits: Tensor, greedy: int, temperature: float, top_p: float | None,
           generator: torch.Generator) -> int:
    """One request's next token from its (1, vocab) logits with its own sampling settings and
    generator; ``greedy`` (the argmax, computed for the whole batch at once) at temperature 0."""
    if temperature == 0:
        return greedy
    return int(sample_next(logits, temperature=temperature, top_p=top_p, generator=generator)[0])
