"""A lean forward of one submodel through a KV cache, for decoding (eager or compiled).

``MatFormerLM.forward`` is the exact, general path: it validates ``widths`` on every call,
slices every weight matrix again, builds rotary tables and masks for left padding, and returns
logits for every position. Profiling cached decoding of the demo shape at batch 1 on one CPU
thread (docs/generation.md, "Where the time goes") showed that at this size a decode step is a few
hundred small operators, so per-operator dispatch, not arithmetic, sets the pace, and that cost
does not shrink with the FFN width. A :class:`SubmodelRunner` does the per-submodel work once:

* widths and heads are resolved and checked when the runner is made, never per token;
* the weight views of the submodel (prefix slices, no copies) are taken once;
* activations are (B * T, C) rows multiplied by transposed weight views with ``torch.mm`` and
  ``torch.addmm`` (the residual add fused in), no per-call reshaping of 3-D inputs;
* the rotary embedding flips the two halves of each head (the sign lives in the sin table),
  the causal mask is one preallocated table sliced per call, and a single query with no
  padding needs no mask at all;
* a prefill computes the vocabulary projection for the last position only.

Left-padded batches are not handled here (``KVCache.padded``): callers use ``model.forward``
for them. :class:`RunnerPool` keeps one runner per submodel (keyed by its widths and heads) and,
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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .cache import KVCache
from .model import HeadSpec, MatFormerLM, WidthSpec, rope_tables

log = logging.getLogger(__name__)

#: Query lengths a compiled runner is specialised to: a call of ``T`` tokens runs the shortest
#: that fits, padded (decoding steps, drafts and verification windows share a few graphs); a
#: longer call, or a prefill (``last_only``) of more than one token, runs eagerly.
COMPILED_LENGTHS = (1, 2, 4, 8, 16, 32)
#: Compile CPU graphs with inductor's C++ wrapper (read when a graph is compiled).
CPP_WRAPPER = True


@dataclass(frozen=True)
class _Layer:
    """Weight views of one block of one submodel, transposed for ``x @ w`` (views, no copies)."""

    attn_norm: Tensor | None  # None: the layer skips attention (its w* are empty)
    wq: Tensor  # (C, h * hd)
    wk: Tensor  # (C, kvh * hd)
    wv: Tensor
    wo: Tensor  # (h * hd, C)
    ffn_norm: Tensor
    gate: Tensor | None  # (C, w)
    up: Tensor
    down: Tensor  # (w, C)
    n_head: int
    n_kv_head: int


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of (B, T, h, hd) rows in the "rotate half" layout of
    ``model.apply_rope``; ``sin`` has its first half negated, so the rotation is a flip of the
    two halves (one op instead of slice, neg, slice and cat)."""
    B, T, h, hd = x.shape
    swapped = x.view(B, T, h, 2, hd // 2).flip(3).view(B, T, h, hd)
    return x * cos + swapped * sin


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Scaled dot-product attention written out: q (B, h, T, hd) over k, v (B, kvh, S, hd)
    under a boolean (T, S) mask; query head ``i`` reads kv head ``i // (h // kvh)``."""
    B, h, T, hd = q.shape
    kvh, rep = k.shape[1], h // k.shape[1]
    scores = torch.matmul(q.reshape(B, kvh, rep * T, hd), k.transpose(-1, -2)) * hd ** -0.5
    scores = scores.view(B, kvh, rep, T, -1).masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, -1).view(B, kvh, rep * T, -1)
    return torch.matmul(weights, v).view(B, h, T, hd)


class SubmodelRunner:
    """Logits of one fixed submodel for tokens written into a :class:`KVCache`.

    Args:
        model: The weights (views are taken, nothing is copied).
        widths, heads: The submodel, as in :meth:`MatFormerLM.forward`.
        compile: Compile the forward with ``torch.compile`` (static shapes, one graph per
            length in :data:`COMPILED_LENGTHS`; the first call of each pays the compile time).
    """

    def __init__(self, model: MatFormerLM, widths: WidthSpec = None, heads: HeadSpec = None,
                 *, compile: bool = False) -> None:
        cfg = model.config
        self.widths = model.resolve_widths(widths)
        self.heads = model.resolve_heads(heads)
        self.head_dim, self.eps, self.activation = cfg.head_dim, cfg.norm_eps, cfg.activation
        self.max_seq_len = cfg.max_seq_len
        hd = cfg.head_dim
        self.layers: list[_Layer] = []
        for i, block in enumerate(model.blocks):
            h = cfg.n_head if self.heads is None else self.heads[i]
            kvh = h * cfg.kv_heads // cfg.n_head
            w, attn, ffn = self.widths[i], block.attn, block.ffn
            skip = h == 0 or attn is None  # depth elasticity: no attention in this layer
            empty = ffn.up_proj.weight[:0].t()  # (C, 0): stands in for absent attention weights
            self.layers.append(_Layer(
                attn_norm=None if skip else block.attn_norm.weight,
                wq=empty if skip else attn.q_proj.weight[: h * hd].t(),
                wk=empty if skip else attn.k_proj.weight[: kvh * hd].t(),
                wv=empty if skip else attn.v_proj.weight[: kvh * hd].t(),
                wo=empty if skip else attn.o_proj.weight[:, : h * hd].t(),
                ffn_norm=block.ffn_norm.weight,
                gate=None if ffn.gate_proj is None else ffn.gate_proj.weight[:w].t(),
                up=ffn.up_proj.weight[:w].t(), down=ffn.down_proj.weight[:, :w].t(),
                n_head=0 if skip else h, n_kv_head=0 if skip else kvh))
        self.embed, self.norm, self.lm_head = (model.embed.weight, model.norm.weight,
                                               model.lm_head.weight.t())
        dev, dtype = self.embed.device, self.embed.dtype
        cos, sin = rope_tables(hd, cfg.max_seq_len, cfg.rope_theta, device=dev)
        sin = torch.cat([-sin[:, : hd // 2], sin[:, hd // 2:]], dim=-1)  # see _rotate
        self.cos, self.sin = cos.to(dtype)[:, None], sin.to(dtype)[:, None]  # (max_len, 1, hd)
        n = cfg.max_seq_len
        self.causal = torch.ones(n, n, dtype=torch.bool, device=dev).tril()  # (query, key)
        self.compiled = compile
        self._graphs: dict[tuple[int, bool, int, int, int], Callable[..., Tensor]] = {}
        self.compile_seconds = 0.0

    # ----------------------------------------------------------------- pieces
    def _rms(self, x: Tensor, weight: Tensor) -> Tensor:
        # RMSNorm.forward's arithmetic (bit for bit in fp32) without its dtype round trips;
        # F.rms_norm would be one call but copies its input on CPU.
        xf = x if x.dtype == torch.float32 else x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if x.dtype == torch.float32:
            return y * weight
        return (y * weight.float()).type_as(x)

    def _ffn_hidden(self, x: Tensor, layer: _Layer) -> Tensor:
        """The FFN's hidden activations (N, w); the caller applies the down projection."""
        up = torch.mm(x, layer.up)  # (N, w)
        if layer.gate is not None:
            hidden = F.silu(torch.mm(x, layer.gate)).mul_(up)
        elif self.activation == "gelu":
            hidden = F.gelu(up)
        else:  # relu2
            hidden = F.relu(up).square()
        return hidden

    def _forward(self, idx: Tensor, keys: list[Tensor], values: list[Tensor],
                 start_pos: int | Tensor, last_only: bool, span: int = 0) -> Tensor:
        """Shared body, on (B * T, C) rows. ``start_pos`` an int: eager, attention over the
        slots in use; a 0-d tensor: static shapes, attention over the first ``span`` slots
        under the causal mask."""
        B, T = idx.shape
        hd = self.head_dim
        static = isinstance(start_pos, Tensor)
        if static:
            pos = start_pos + torch.arange(T, device=idx.device)  # (T,)
            cos, sin, mask = self.cos[pos], self.sin[pos], self.causal[pos][:, :span]
        else:
            end = start_pos + T
            cos, sin = self.cos[start_pos:end], self.sin[start_pos:end]  # (T, 1, hd)
            mask = None if T == 1 else self.causal[start_pos:end, :end]
        x = F.embedding(idx.reshape(-1), self.embed)  # (B * T, C)
        for i, L in enumerate(self.layers):
            if L.attn_norm is None:  # a skipped attention: the residual passes to the FFN
                x = torch.addmm(x, self._ffn_hidden(self._rms(x, L.ffn_norm), L), L.down)
                continue
            h = self._rms(x, L.attn_norm)
            q = _rotate(torch.mm(h, L.wq).view(B, T, L.n_head, hd), cos, sin)
            k = _rotate(torch.mm(h, L.wk).view(B, T, L.n_kv_head, hd), cos, sin)
            v = torch.mm(h, L.wv).view(B, T, L.n_kv_head, hd)
            kc, vc = keys[i], values[i]
            if L.n_kv_head != kc.shape[1]:  # nested heads: the first kv heads only
                kc, vc = kc[:, : L.n_kv_head], vc[:, : L.n_kv_head]
            if static:  # an indexed write into a graph input: in place once compiled
                kc[:, :, pos] = k.transpose(1, 2)
                vc[:, :, pos] = v.transpose(1, 2)
            else:
                kc[:, :, start_pos:end] = k.transpose(1, 2)
                vc[:, :, start_pos:end] = v.transpose(1, 2)
                kc, vc = kc[:, :, :end], vc[:, :, :end]
            if static:  # written out, so inductor fuses it (its SDPA call is slow on CPU)
                y = _attend(q.transpose(1, 2), kc[:, :, :span], vc[:, :, :span], mask)
            else:
                y = F.scaled_dot_product_attention(q.transpose(1, 2), kc, vc, attn_mask=mask,
                                                   enable_gqa=L.n_kv_head != L.n_head)
            x = torch.addmm(x, y.transpose(1, 2).reshape(B * T, L.n_head * hd), L.wo)
            x = torch.addmm(x, self._ffn_hidden(self._rms(x, L.ffn_norm), L), L.down)
        if last_only:
            x = x.view(B, T, -1)[:, -1]
            T = 1
        return torch.mm(self._rms(x, self.norm), self.lm_head).view(B, T, -1)  # (B, T, vocab)

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
            log.info("compiled widths %s for %d query position(s), %d cache slots, in %.1fs",
                     self.widths, Tc, span, seconds)
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
        self._runners: dict[tuple, SubmodelRunner] = {}
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

    def get(self, widths: WidthSpec = None, heads: HeadSpec = None) -> SubmodelRunner:
        """The runner of this submodel (made, and compiled if asked, on first use)."""
        if self._weights_id() != self._fingerprint:  # model moved or cast: views are stale
            self._runners.clear()
            self.measured.clear()
            self._fingerprint = self._weights_id()
        key = (self.model.resolve_widths(widths), self.model.resolve_heads(heads))
        runner = self._runners.get(key)
        if runner is None:
            runner = SubmodelRunner(self.model, key[0], key[1], compile=self.compile)
            self._runners[key] = runner
        return runner

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling so far, over every runner."""
        return sum(r.compile_seconds for r in self._runners.values())
