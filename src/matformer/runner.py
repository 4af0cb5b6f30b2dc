"""Decoding one fixed submodel through a KV cache, eager or compiled.

There is one implementation of the block, :func:`matformer.block.layer`, on (B * T, C) rows
multiplied by transposed weight views; :meth:`MatFormerLM.forward` runs it through each
:class:`~matformer.model.Block` (taking the views per call, as training, FSDP and mixed-width
batches need). Profiling cached decoding of the demo shape at batch 1 on one CPU thread
(docs/generation.md, "Where the time goes") showed that at that size a decode step is a few
hundred small operators, so per-call work counts. A :class:`SubmodelRunner` does the
per-submodel part once: the submodel is resolved and checked, and its weight views are taken,
when the runner is made; the rotary tables are cast and the causal mask built once; a prefill
computes the vocabulary projection for the last position only.

Left-padded batches are not handled here (``KVCache.padded``): callers use ``model.forward``
for them. :class:`RunnerPool` keeps one runner per :class:`~matformer.config.Submodel` and,
with ``compile=True``, one ``torch.compile``-d graph per submodel and per number of query
positions. The compiled variant is static-shape in the gpt-fast way: positions are a tensor,
K/V are written by index into each layer's own cache tensor (in place: a write into a view of
one shared tensor would be compiled as a copy of all of it) and attention, written out so that
inductor fuses it, runs under a causal mask over the cache slots up to the next power of two
past the last query, so a graph serves every position in its span.
Query lengths are rounded up to a few compiled lengths (:data:`COMPILED_LENGTHS`), so decoding,
drafting and verification windows of any length share a handful of graphs per submodel.
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .block import Positions, layer, rms_norm
from .cache import KVCache
from .config import Submodel, SubmodelSpec
from .model import MatFormerLM

log = logging.getLogger(__name__)

#: Query lengths a compiled runner is specialised to: a call of ``T`` tokens runs the shortest
#: that fits, padded (decoding steps, drafts and verification windows share a few graphs); a
#: longer call, or a prefill (``last_only``) of more than one token, runs eagerly.
COMPILED_LENGTHS = (1, 2, 4, 8, 16, 32)
#: Compile CPU graphs with inductor's C++ wrapper (read when a graph is compiled).
CPP_WRAPPER = True


class SubmodelRunner:
    """Logits of one fixed submodel for tokens written into a :class:`KVCache`.

    The arithmetic is the model's own (:func:`matformer.block.layer`, the function every
    :class:`~matformer.model.Block` runs); what the runner adds is doing the per-submodel work
    once (the weight views) and, with ``compile``, static shapes for ``torch.compile``.

    Args:
        model: The weights (views are taken, nothing is copied).
        sub: The submodel (anything :meth:`ModelConfig.submodel` accepts).
        compile: Compile the forward with ``torch.compile`` (static shapes, one graph per
            length in :data:`COMPILED_LENGTHS`; the first call of each pays the compile time).
    """

    def __init__(self, model: MatFormerLM, sub: SubmodelSpec = None, *,
                 compile: bool = False) -> None:
        cfg = model.config
        self.submodel = cfg.submodel(sub)
        self.eps = cfg.norm_eps
        self.layers = [block.weights(w, h) for block, w, h in
                       zip(model.blocks, self.submodel.widths, self.submodel.heads, strict=True)]
        self.embed, self.norm, self.lm_head = (model.embed.weight, model.norm.weight,
                                               model.lm_head.weight.t())
        dev, dtype = self.embed.device, self.embed.dtype
        self.cos = model.rope_cos.to(device=dev, dtype=dtype)[:, None]  # (max_len, 1, hd)
        self.sin = model.rope_sin.to(device=dev, dtype=dtype)[:, None]
        n = cfg.max_seq_len
        self.causal = torch.ones(n, n, dtype=torch.bool, device=dev).tril()  # (query, key)
        self.compiled = compile
        self._graphs: dict[tuple[int, bool, int, int, int], Callable[..., Tensor]] = {}
        self.compile_seconds = 0.0

    @property
    def widths(self) -> tuple[int, ...]:
        return self.submodel.widths

    def _forward(self, idx: Tensor, keys: list[Tensor], values: list[Tensor],
                 start_pos: int | Tensor, last_only: bool, span: int = 0) -> Tensor:
        """The model's layers on (B * T, C) rows, K/V written into each layer's cache tensor.
        ``start_pos`` an int: eager, attention over the slots in use; a 0-d tensor: static
        shapes, attention over the first ``span`` slots under the causal mask."""
        B, T = idx.shape
        if isinstance(start_pos, Tensor):
            pos = start_pos + torch.arange(T, device=idx.device)  # (T,)
            at = Positions(self.cos[pos], self.sin[pos], start=start_pos,
                           mask=self.causal[pos][:, :span], keys=keys, values=values, span=span)
        else:
            end = start_pos + T
            at = Positions(self.cos[start_pos:end], self.sin[start_pos:end], start=start_pos,
                           mask=None if T == 1 else self.causal[start_pos:end, :end],
                           keys=keys, values=values)
        x = F.embedding(idx.reshape(-1), self.embed)  # (B * T, C)
        for i, weights in enumerate(self.layers):
            x = layer(x, weights, B, T, at, i)
        if last_only:
            x = x.view(B, T, -1)[:, -1]
            T = 1
        return (rms_norm(x, self.norm, self.eps) @ self.lm_head).view(B, T, -1)  # (B, T, vocab)

    # ----------------------------------------------------------------- calls
    def __call__(self, idx: Tensor, cache: KVCache, start_pos: int, *,
                 last_only: bool = False) -> Tensor:
        """Logits (B, T, vocab), or (B, 1, vocab) with ``last_only``, of tokens ``idx`` (B, T)
        placed at cache slots ``start_pos .. start_pos + T - 1``.

        The cache must not be padded (see :attr:`KVCache.padded`); positions are checked here
        with plain integers (no device sync).
        """
        T = idx.shape[1]
        if start_pos < 0 or start_pos + T > cache.max_len:
            raise ValueError(f"positions {start_pos}..{start_pos + T - 1} do not fit the cache "
                             f"(max_len={cache.max_len})")
        if cache.padded:
            raise ValueError("SubmodelRunner does not handle left-padded caches; use "
                             "model.forward for them")
        if cache.dtype != self.embed.dtype:
            raise ValueError(f"KVCache holds {cache.dtype} but the model computes in "
                             f"{self.embed.dtype}")
        Tc = None if not self.compiled else next(
            (n for n in COMPILED_LENGTHS if n >= T and start_pos + n <= cache.max_len), None)
        if Tc is None or (last_only and Tc != T):  # eager: not compiled, or a long prefill
            return self._forward(idx, cache.keys, cache.values, start_pos, last_only)
        if Tc != T:  # pad to the graph's length; the padding's K/V land in slots after the
            # call's own, which every later call writes before it reads them
            idx = torch.cat([idx, idx.new_zeros(idx.shape[0], Tc - T)], 1)
        else:  # the graph is specialised to its inputs' strides: give it the standard ones
            idx = idx.reshape(-1).view(idx.shape)
        pos = torch.tensor(start_pos, device=idx.device)
        # Attention reads the slots up to the next power of two past the last query (at least
        # 64), not the whole cache: a few graphs per query length, and no reading of slots far
        # ahead of the sequence.
        span = _round_up(start_pos + Tc, cache.max_len)
        key = (Tc, last_only, idx.shape[0], cache.max_len, span)
        graph = self._graphs.get(key)
        if graph is None:
            # On CPU the graph's calls are made from C++ (no Python between kernels); see
            # benchmarks/decode_step.py and docs/benchmarks.md for what it buys.
            options = ({"cpp_wrapper": True} if CPP_WRAPPER and idx.device.type == "cpu"
                       else None)
            graph = torch.compile(_own_code(self._forward), dynamic=False, fullgraph=True,
                                  options=options)
            self._graphs[key] = graph
            t0 = time.perf_counter()
            out = graph(idx, cache.keys, cache.values, pos, last_only, span)
            seconds = time.perf_counter() - t0
            self.compile_seconds += seconds
            log.info("compiled %s for %d query position(s), %d cache slots, in %.1fs",
                     self.submodel, Tc, span, seconds)
        else:
            out = graph(idx, cache.keys, cache.values, pos, last_only, span)
        return out if Tc == T else out[:, :T]


def _round_up(n: int, cap: int) -> int:
    """The power of two at or above ``n`` (at least 64), at most ``cap``: the sizes compiled
    graphs are specialised to, so that a few graphs serve every length."""
    return min(max(64, 1 << (n - 1).bit_length()), cap)


def _own_code(method: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``method`` bound to a copy of its code object. Dynamo keeps compiled graphs per code
    object and checks a call against the guards of each in turn; with a code object of its own,
    every (submodel, query length, cache shape) graph is the only one there, so a call checks one
    set of guards and no graph counts against another's recompilation limit."""
    f = method.__func__  # type: ignore[attr-defined]
    own = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__,
                             f.__closure__)
    return types.MethodType(own, method.__self__)  # type: ignore[attr-defined]


class RunnerPool:
    """One :class:`SubmodelRunner` per submodel of ``model``, made on first use.

    Args:
        model: The weights.
        compile: ``torch.compile`` every runner; None (default) compiles on CUDA only.
    """

    def __init__(self, model: MatFormerLM, *, compile: bool | None = None) -> None:
        self.model = model
        device = next(model.parameters()).device
        self.compile = device.type == "cuda" if compile is None else compile
        self._runners: dict[Submodel, SubmodelRunner] = {}
        self._fingerprint = self._weights_id()
        #: Measurements tied to this model and machine, reused across calls (speculative
        #: decoding keeps its measured draft and verification costs here).
        self.measured: dict[tuple, object] = {}

    @classmethod
    def of(cls, model: MatFormerLM, runners: RunnerPool | None, *,
           compile: bool | None = None) -> RunnerPool:
        """``runners`` when given (it must run ``model``'s own weights), else a new pool."""
        if runners is None:
            return cls(model, compile=compile)
        if runners.model is not model:
            raise ValueError("runners: this RunnerPool was made for another model; pass the "
                             "pool of the model being decoded (or None)")
        return runners

    def cache_len(self, n: int) -> int:
        """Slots to allocate for a cache that must hold ``n``: ``n`` itself when eager; when
        compiled, the next power of two (at least 64, at most the context), since every cache
        length is a graph of its own and prompts of any length should share a few."""
        return _round_up(n, max(n, self.model.config.max_seq_len)) if self.compile else n

    def _weights_id(self) -> tuple:
        w = self.model.embed.weight
        return (w.data_ptr(), w.dtype, w.device)

    def get(self, sub: SubmodelSpec = None) -> SubmodelRunner:
        """The runner of this submodel (made, and compiled if asked, on first use)."""
        if self._weights_id() != self._fingerprint:  # model moved or cast: views are stale
            self._runners.clear()
            self.measured.clear()
            self._fingerprint = self._weights_id()
        key = self.model.config.submodel(sub)
        runner = self._runners.get(key)
        if runner is None:
            runner = SubmodelRunner(self.model, key, compile=self.compile)
            self._runners[key] = runner
        return runner

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling so far, over every runner."""
        return sum(r.compile_seconds for r in self._runners.values())
