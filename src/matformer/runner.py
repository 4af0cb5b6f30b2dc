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
K/V are written with ``index_copy_`` and attention runs over every cache slot under a mask, so
one graph serves every position.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .cache import KVCache
from .model import MatFormerLM, WidthSpec, rope_tables

log = logging.getLogger(__name__)

HeadSpec = None | str | int | Sequence[int]
#: Compiled graphs allowed per process for the runner's forward (submodels x query lengths).
RECOMPILE_LIMIT = 256


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


class SubmodelRunner:
    """Logits of one fixed submodel for tokens written into a :class:`KVCache`.

    Args:
        model: The weights (views are taken, nothing is copied).
        widths, heads: The submodel, as in :meth:`MatFormerLM.forward`.
        compile: Compile the forward with ``torch.compile`` (static shapes, one graph per
            query length ``T``; the first call of each ``T`` pays the compile time).
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
        self._graphs: dict[tuple[int, bool], Callable[..., Tensor]] = {}
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

    def _forward(self, idx: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: int | Tensor,
                 last_only: bool) -> Tensor:
        """Shared body, on (B * T, C) rows. ``start_pos`` an int: eager, attention over the
        slots in use; a 0-d tensor: static shapes, attention over every slot under the mask."""
        B, T = idx.shape
        hd = self.head_dim
        static = isinstance(start_pos, Tensor)
        if static:
            pos = start_pos + torch.arange(T, device=idx.device)  # (T,)
            cos, sin, mask = self.cos[pos], self.sin[pos], self.causal[pos][:, : k_cache.shape[3]]
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
            kc, vc = k_cache[i, :, : L.n_kv_head], v_cache[i, :, : L.n_kv_head]
            if static:
                kc.index_copy_(2, pos, k.transpose(1, 2))
                vc.index_copy_(2, pos, v.transpose(1, 2))
            else:
                kc[:, :, start_pos:end] = k.transpose(1, 2)
                vc[:, :, start_pos:end] = v.transpose(1, 2)
                kc, vc = kc[:, :, :end], vc[:, :, :end]
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
        if cache.k.dtype != self.embed.dtype:
            raise ValueError(f"KVCache holds {cache.k.dtype} but the model computes in "
                             f"{self.embed.dtype}")
        if not self.compiled:
            return self._forward(idx, cache.k, cache.v, start_pos, last_only)
        key = (T, last_only)
        graph = self._graphs.get(key)
        if graph is None:
            graph = torch.compile(self._forward, dynamic=False, fullgraph=True)
            t0 = time.perf_counter()
            pos = torch.tensor(start_pos, device=idx.device)
            # Every runner compiles the same method, and dynamo counts recompilations per code
            # object: allow one graph per (submodel, query length) instead of its default 8.
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                out = graph(idx, cache.k, cache.v, pos, last_only)
            self.compile_seconds += time.perf_counter() - t0
            self._graphs[key] = graph
            log.info("compiled widths %s for %d query position(s) in %.1fs", self.widths, T,
                     time.perf_counter() - t0)
            return out
        return graph(idx, cache.k, cache.v, torch.tensor(start_pos, device=idx.device),
                     last_only)


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
