"""Decoding one fixed submodel through a KV cache, eager or compiled.

There is one implementation of the block, :func:`matformer.block.layer`, on (B * T, C) rows
multiplied by transposed weight views; :meth:`MatFormerLM.forward` runs it through each
:class:`~matformer.model.Block` (taking the views per call, as training, FSDP and mixed-width
batches need). Profiling cached decoding of the demo shape at batch 1 on one CPU thread
(docs/generation.md, "Where the time goes") showed that at that size a decode step is a few
hundred small operators, so per-call work counts. A :class:`SubmodelRunner` does the
per-submodel part once: the submodel is resolved and checked, and its weight views are taken,
when the runner is made; the rotary tables are cast once; a prefill
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

import dataclasses
import logging
import time
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .block import Int8Weight, LayerWeights, Positions, layer, matmul, rms_norm
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
        int8: Where the matrices come from as :class:`~matformer.block.Int8Weight` (weight-only
            int8, bf16 activations and cache): one quantized copy per full matrix, shared by
            every runner of a pool (see :class:`RunnerPool`). None: the weights themselves.
    """

    def __init__(self, model: MatFormerLM, sub: SubmodelSpec = None, *,
                 compile: bool | str = False,
                 int8: Callable[[Tensor], Int8Weight] | None = None) -> None:
        cfg = model.config
        self.submodel = cfg.submodel(sub)
        self.eps = cfg.norm_eps
        self.layers = [block.weights(w, h) if int8 is None else _int8_layer(block, w, h, int8)
                       for block, w, h in zip(model.blocks, self.submodel.widths,
                                              self.submodel.heads, strict=True)]
        self.embed, self.norm = model.embed.weight, model.norm.weight
        self.lm_head: Tensor | Int8Weight = (model.lm_head.weight.t() if int8 is None
                                             else int8(model.lm_head.weight))
        dev = self.embed.device
        #: What activations and the KV cache are held in.
        self.dtype = dtype = self.embed.dtype if int8 is None else torch.bfloat16
        self.cos = model.rope_cos.to(device=dev, dtype=dtype)[:, None]  # (max_len, 1, hd)
        self.sin = model.rope_sin.to(device=dev, dtype=dtype)[:, None]
        if compile not in (False, True, "regional"):
            raise ValueError(f"compile={compile!r}: choose False, True or 'regional'")
        self.compiled = compile
        self._graphs: dict[tuple[int, bool, int, int, int], Callable[..., Tensor]] = {}
        #: ``compile="regional"``: one compiled graph of a layer, called for every layer of
        #: the same shapes (compiles in seconds where a whole-model graph takes minutes)
        self._layer_graph = None if compile != "regional" else torch.compile(
            _own_code(_one_layer), dynamic=False, fullgraph=True, options=_options(dev))
        self.compile_seconds = 0.0

    def _forward(self, idx: Tensor, keys: list[Tensor], values: list[Tensor],
                 start_pos: int | Tensor, last_only: bool, span: int = 0) -> Tensor:
        """The model's layers on (B * T, C) rows, K/V written into each layer's cache tensor.
        ``start_pos`` an int: eager, attention over the slots in use; a 0-d tensor: static
        shapes, attention over the first ``span`` slots under the causal mask."""
        B, T = idx.shape
        if isinstance(start_pos, Tensor):
            pos = start_pos + torch.arange(T, device=idx.device)  # (T,)
            at = Positions(self.cos[pos], self.sin[pos], start=start_pos,
                           mask=_causal(pos, span), keys=keys, values=values, span=span)
        else:
            end = start_pos + T
            at = Positions(self.cos[start_pos:end], self.sin[start_pos:end], start=start_pos,
                           mask=None if T == 1 else _causal(
                               torch.arange(start_pos, end, device=idx.device), end),
                           keys=keys, values=values)
        x = F.embedding(idx.reshape(-1), self.embed).to(self.dtype)  # (B * T, C)
        if self._layer_graph is not None and isinstance(start_pos, Tensor):  # regional
            for i, weights in enumerate(self.layers):
                x = self._layer_graph(x, weights, keys[i], values[i], at.cos, at.sin, at.mask,
                                      start_pos, span, B, T)
        else:
            for i, weights in enumerate(self.layers):
                x = layer(x, weights, B, T, at, i)
        if last_only:
            x = x.view(B, T, -1)[:, -1]
            T = 1
        logits = matmul(rms_norm(x, self.norm, self.eps), self.lm_head)
        return logits.view(B, T, -1)  # (B, T, vocab)

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
        if cache.dtype != self.dtype:
            raise ValueError(f"KVCache holds {cache.dtype} but this runner computes in "
                             f"{self.dtype} (make caches with RunnerPool.new_cache)")
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
            graph = (self._forward if self.compiled == "regional" else torch.compile(
                _own_code(self._forward), dynamic=False, fullgraph=True,
                options=_options(idx.device)))
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


def _causal(pos: Tensor, n: int) -> Tensor:
    """The boolean (query, key) mask of queries at slots ``pos`` over key slots ``0..n-1``:
    made per call (a few values), not kept as a context x context table by every runner
    (8,192 x 8,192 booleans at SmolLM2's context)."""
    return torch.arange(n, device=pos.device)[None, :] <= pos[:, None]


def _options(device: torch.device) -> dict[str, Any] | None:
    """inductor options: on CPU the graph's calls are made from C++ (no Python between
    kernels); see benchmarks/decode_step.py and docs/benchmarks.md for what it buys."""
    return {"cpp_wrapper": True} if CPP_WRAPPER and device.type == "cpu" else None


def _one_layer(x: Tensor, weights: LayerWeights, kc: Tensor, vc: Tensor, cos: Tensor,
               sin: Tensor, mask: Tensor, start: Tensor, span: int, B: int, T: int) -> Tensor:
    """One layer at static shapes, its own cache tensors given: what a regional compile
    compiles once and runs for every layer."""
    at = Positions(cos, sin, start=start, mask=mask, keys=[kc], values=[vc], span=span)
    return layer(x, weights, B, T, at, 0)


def _int8_layer(block: Any, width: int, heads: int,
                int8: Callable[[Tensor], Int8Weight]) -> LayerWeights:
    """A layer's weights as int8 prefixes of each full matrix's quantized copy (output rows:
    views; input columns of the output and down projections: copies when narrower)."""
    views = block.weights(width, heads)
    ffn, attn = block.ffn, block.attn
    ffn_part: dict[str, Any] = {}
    if width:  # a skipped FFN keeps its empty views (the layer passes them by)
        gate = None if ffn.gate_proj is None else int8(ffn.gate_proj.weight).outputs(width)
        ffn_part = dict(gate=gate, up=int8(ffn.up_proj.weight).outputs(width),
                        down=int8(ffn.down_proj.weight).inputs(width))
    if not views.n_head:
        return dataclasses.replace(views, **ffn_part)
    hd = attn.head_dim
    q, kv = views.n_head * hd, views.n_kv_head * hd
    return dataclasses.replace(
        views, wq=int8(attn.q_proj.weight).outputs(q), wk=int8(attn.k_proj.weight).outputs(kv),
        wv=int8(attn.v_proj.weight).outputs(kv), wo=int8(attn.o_proj.weight).inputs(q),
        **ffn_part)


def _round_up(n: int, cap: int) -> int:
    """The power of two at or above ``n`` (at least 64), at most ``cap``: the sizes compiled
    graphs are specialised to, so that a few graphs serve every length."""
    return min(max(64, 1 << (n - 1).bit_length()), cap)


def _own_code(method: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``method`` (a bound method or a function) on a copy of its code object. Dynamo keeps
    compiled graphs per code object and checks a call against the guards of each in turn; with
    a code object of its own, every (submodel, query length, cache shape) graph is the only one
    there, so a call checks one set of guards and no graph counts against another's
    recompilation limit."""
    f = getattr(method, "__func__", method)
    own = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__,
                             f.__closure__)
    bound = getattr(method, "__self__", None)
    return own if bound is None else types.MethodType(own, bound)


#: Weight layouts a pool can give the model: ``stream`` (each matrix's storage transposed, see
#: :func:`streaming_layout`) or ``as-is``.
LAYOUTS = ("stream", "as-is")
#: What a pool decodes with: the model's own weights, or weight-only int8 copies.
WEIGHTS = ("model", "int8")


@torch.no_grad()
def streaming_layout(model: MatFormerLM) -> int:
    """Store every matrix of the blocks and the output head transposed in memory, in place:
    the same parameters, shapes and values, each an (out, in) view of (in, out) storage.

    Decoding one token multiplies a row by every matrix, ``x @ W.t()``; with ``W.t()`` a
    row-major matrix (this layout) the product streams the weights row by row: greedy decoding
    of SmolLM2-135M on one CPU thread went from 26.0 to 32.7 tokens/s
    (``benchmarks/decode_llamacpp.py``, docs/benchmarks.md). Prefix slices stay views. For
    fp32 CPU decoding only (bf16 products measured faster in the usual layout). Returns the
    number of matrices moved.
    """
    moved = 0
    params = [p for b in model.blocks for p in b.parameters() if p.dim() == 2]
    params.append(model.lm_head.weight)
    for p in dict.fromkeys(params):  # a tied head is the embedding: moved once
        if p.is_contiguous() and p.numel():
            p.data = p.data.t().contiguous().t()
            moved += 1
    return moved


class RunnerPool:
    """One :class:`SubmodelRunner` per submodel of ``model``, made on first use.

    Args:
        model: The weights.
        compile: ``torch.compile`` every runner; None (default) compiles on CUDA only.
        layout: ``stream`` gives the model :func:`streaming_layout` (in place: the model
            computes the same, every tool works on it); ``as-is`` leaves it. None (default):
            ``stream`` for fp32 weights on a CPU, else ``as-is``.
        weights: ``model`` (decode with the model's own weights) or ``int8`` (weight-only
            int8 copies of the matrices, a quarter of fp32's size, made once and shared by
            every runner; activations and caches in bf16; unpadded batches only).
    """

    def __init__(self, model: MatFormerLM, *, compile: bool | str | None = None,
                 layout: str | None = None, weights: str = "model") -> None:
        if weights not in WEIGHTS:
            raise ValueError(f"weights={weights!r}: choose one of {WEIGHTS}")
        self.weights = weights
        self._int8: dict[int, Int8Weight] = {}
        self.model = model
        weight = model.embed.weight
        device = weight.device
        if layout is None:
            layout = ("stream" if device.type == "cpu" and weight.dtype == torch.float32
                      and weights == "model" else "as-is")
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r}: choose one of {LAYOUTS}")
        if layout == "stream":
            streaming_layout(model)
        self.layout = layout
        self.compile = device.type == "cuda" if compile is None else compile
        self._runners: dict[Submodel, SubmodelRunner] = {}
        self._fingerprint = self._weights_id()
        #: Measurements tied to this model and machine, reused across calls (speculative
        #: decoding keeps its measured draft and verification costs here).
        self.measured: dict[tuple, object] = {}

    @classmethod
    def of(cls, model: MatFormerLM, runners: RunnerPool | None, *,
           compile: bool | str | None = None) -> RunnerPool:
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

    @property
    def dtype(self) -> torch.dtype:
        """What this pool's runners compute in (and their caches hold)."""
        return torch.bfloat16 if self.weights == "int8" else self.model.embed.weight.dtype

    def new_cache(self, batch_size: int, n: int) -> KVCache:
        """An empty cache for ``batch_size`` rows that holds ``n`` positions (rounded up as
        :meth:`cache_len` says), in this pool's compute dtype."""
        return KVCache.for_model(self.model, batch_size, self.cache_len(n), dtype=self.dtype)

    def _quantized(self, weight: Tensor) -> Int8Weight:
        """The int8 copy of a full weight matrix, made on first use."""
        found = self._int8.get(id(weight))
        if found is None:
            found = self._int8[id(weight)] = Int8Weight.of(weight)
        return found

    def _weights_id(self) -> tuple:
        w = self.model.embed.weight
        return (w.data_ptr(), w.dtype, w.device)

    def get(self, sub: SubmodelSpec = None) -> SubmodelRunner:
        """The runner of this submodel (made, and compiled if asked, on first use)."""
        if self._weights_id() != self._fingerprint:  # model moved or cast: views are stale
            self._runners.clear()
            self._int8.clear()
            self.measured.clear()
            self._fingerprint = self._weights_id()
        key = self.model.config.submodel(sub)
        runner = self._runners.get(key)
        if runner is None:
            runner = SubmodelRunner(self.model, key, compile=self.compile,
                                    int8=self._quantized if self.weights == "int8" else None)
            self._runners[key] = runner
        return runner

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling so far, over every runner."""
        return sum(r.compile_seconds for r in self._runners.values())
