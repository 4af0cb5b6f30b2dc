"""The MatFormer language model: a decoder-only Transformer whose FFNs are nested.

Every block's FFN hidden layer is ordered so that its first ``w`` units form a smaller FFN on
their own. A submodel is picked per call by a tuple of per-layer widths; the forward pass then
runs on *slices* (views) of the full weight matrices, so a smaller submodel really does less
work, and no copy of the weights is ever made. Attention, norms, embeddings and the head are
shared by every submodel. With ``nest_heads`` the attention heads are nested the same way.

Weight names follow the Llama convention (``q_proj``, ``gate_proj`` ...) so that export to other
toolkits is a renaming, not a reshuffle.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import HeadSpec, ModelConfig, Submodel, SubmodelSpec

if TYPE_CHECKING:
    from .cache import KVCache


class RowWidths:
    """One submodel per batch row, for serving a mixed batch from one set of weights.

    ``rows[b]`` is row ``b``'s submodel (anything :meth:`ModelConfig.submodel` accepts); every
    row must use the same attention heads. Attention and every shared part run once for the
    whole batch. Because widths are prefixes, a layer's FFN runs in chunks of hidden units:
    units ``0..u1`` for every row, ``u1..u2`` for the rows at least ``u2`` wide, and so on (rows
    ordered widest first, so each chunk's rows are a leading slice). Every weight is read once,
    as for the widest row alone, and every row does the work of its own width; each row
    computes what it would compute alone (up to float summation order).
    """

    def __init__(self, rows: Sequence[SubmodelSpec]) -> None:
        if not rows:
            raise ValueError("RowWidths needs at least one row")
        self.rows = tuple(rows)
        self._plans: dict[tuple, tuple[Submodel, list[RowChunks | None]]] = {}

    def plan(self, cfg: ModelConfig, device: torch.device
             ) -> tuple[Submodel, list[RowChunks | None]]:
        """The widest row's submodel (whose weight views every row reads) and, per layer, a
        :data:`RowChunks` plan where rows differ (None where they share the width). Built
        once per batch composition and device, reused every step."""
        key = (cfg, device)
        if key not in self._plans:
            subs = [cfg.submodel(r) for r in self.rows]
            if len({s.heads for s in subs}) > 1:
                raise ValueError("RowWidths: every row must use the same attention heads "
                                 f"(got {sorted({s.heads for s in subs})})")
            layers: list[RowChunks | None] = []
            for i in range(cfg.n_layer):
                ws = [s.widths[i] for s in subs]
                if len(set(ws)) == 1:
                    layers.append(None)
                    continue
                order = sorted(range(len(ws)), key=lambda b: -ws[b])  # widest first
                perm = (None if order == list(range(len(ws)))
                        else torch.tensor(order, device=device))
                units = sorted(set(ws))
                chunks = [(lo, hi, sum(w >= hi for w in ws))
                          for lo, hi in zip([0, *units[:-1]], units, strict=True)]
                layers.append((perm, chunks))
            widest = Submodel(tuple(max(s.widths[i] for s in subs) for i in range(cfg.n_layer)),
                              subs[0].heads)
            self._plans[key] = (widest, layers)
        return self._plans[key]


#: A mixed-width FFN plan: an optional row permutation (widest rows first) and chunks
#: ``(lo, hi, n)``: hidden units ``lo..hi-1`` apply to the first ``n`` (permuted) rows.
RowChunks = tuple[Tensor | None, list[tuple[int, int, int]]]


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm, normalised in fp32 (stable under bf16 autocast) and cast back; no dtype round
    trip when ``x`` is fp32 (``F.rms_norm`` would be one call but copies its input on CPU)."""
    if x.dtype == torch.float32:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).type_as(x)


def rope_tables(head_dim: int, max_len: int, theta: float, device: torch.device | None = None
                ) -> tuple[Tensor, Tensor]:
    """cos/sin tables (max_len, head_dim) in the "rotate half" layout used by Llama."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    freqs = torch.outer(torch.arange(max_len, device=device).float(), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def signed_rope_tables(head_dim: int, max_len: int, theta: float,
                       device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """The tables :func:`rotate` reads: :func:`rope_tables` with the first half of ``sin``
    negated, so that rotating a head is a swap of its two halves (one op, no slice/neg/cat)."""
    cos, sin = rope_tables(head_dim, max_len, theta, device)
    return cos, torch.cat([-sin[:, : head_dim // 2], sin[:, head_dim // 2:]], dim=-1)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of (B, T, h, hd) queries or keys in the "rotate half" layout; ``cos``
    and ``sin`` (from :func:`signed_rope_tables`) are (T, 1, hd) or per row (B, T, 1, hd)."""
    B, T, h, hd = x.shape
    swapped = x.view(B, T, h, 2, hd // 2).flip(3).view(B, T, h, hd)
    return (x * cos + swapped * sin).type_as(x)


@dataclass(frozen=True)
class LayerWeights:
    """One block of one submodel: views of its weights (prefix slices, transposed for
    ``rows @ w``, never copies). Taken per call by :class:`Block` (so parameters that change,
    or that FSDP gathers per forward, are read fresh) and once per submodel by the decoder's
    runner."""

    attn_norm: Tensor | None  # None: the layer skips attention
    wq: Tensor | None  # (C, h * hd)
    wk: Tensor | None  # (C, kvh * hd)
    wv: Tensor | None
    wo: Tensor | None  # (h * hd, C)
    ffn_norm: Tensor
    gate: Tensor | None  # (C, w); None without a gate (gelu, relu2)
    up: Tensor  # (C, w)
    down: Tensor  # (w, C)
    n_head: int
    n_kv_head: int
    rows: RowChunks | None = None  # a mixed-width batch's plan (up/down at the widest row)
    eps: float = 1e-5  # the norms' epsilon
    activation: str = "swiglu"


@dataclass(frozen=True)
class Positions:
    """Where a forward's tokens sit and what they may attend to; shared by every layer.

    Attributes:
        cos, sin: Rotary tables of the tokens (see :func:`rotate`), None for no rotation.
        causal: Without a cache: causal (the LM) or bidirectional (the ViT) attention.
        cache: The caller's KV cache, or None (attend within the input only).
        start: The cache slot of the first token: an int (K/V written through
            ``cache.update``), or a 0-d tensor with ``keys``/``values`` (static shapes for a
            compiled graph: K/V written by index into each layer's tensor, attention over the
            first ``span`` slots).
        mask: Attention mask for the cached path (boolean, True = visible; or additive).
    """

    cos: Tensor | None
    sin: Tensor | None
    causal: bool = True
    cache: KVCache | None = None
    start: int | Tensor = 0
    mask: Tensor | None = None
    keys: list[Tensor] | None = None
    values: list[Tensor] | None = None
    span: int = 0


def _add_mm(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``x + a @ b``, fused where it is exact to do so: under autocast the fused form would
    make the fp32 residual stream bf16."""
    if torch.is_autocast_enabled(x.device.type):
        return x + a @ b
    return torch.addmm(x, a, b)


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Scaled dot-product attention written out (inductor fuses it; its SDPA call is slow on
    CPU): q (B, h, T, hd) over k, v (B, kvh, S, hd) under a boolean (T, S) mask; query head
    ``i`` reads kv head ``i // (h // kvh)``."""
    B, h, T, hd = q.shape
    kvh, rep = k.shape[1], h // k.shape[1]
    scores = torch.matmul(q.reshape(B, kvh, rep * T, hd), k.transpose(-1, -2)) * hd ** -0.5
    scores = scores.view(B, kvh, rep, T, -1).masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, -1).view(B, kvh, rep * T, -1)
    return torch.matmul(weights, v).view(B, h, T, hd)


def attention(x: Tensor, L: LayerWeights, B: int, T: int, at: Positions, layer: int) -> Tensor:
    """``x`` plus the layer's attention over its input, on (B * T, C) rows."""
    h, kvh = L.n_head, L.n_kv_head
    hd = L.wq.shape[1] // h
    n = rms_norm(x, L.attn_norm, L.eps)
    q = (n @ L.wq).view(B, T, h, hd)
    k = (n @ L.wk).view(B, T, kvh, hd)
    v = (n @ L.wv).view(B, T, kvh, hd)
    if at.cos is not None:
        q, k = rotate(q, at.cos, at.sin), rotate(k, at.cos, at.sin)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
    if at.cache is None and at.keys is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=at.causal, enable_gqa=kvh != h)
    elif at.keys is not None:  # static shapes: an indexed write into a graph input (in place
        # once compiled), attention over the first ``span`` slots under the causal mask
        kc, vc = at.keys[layer], at.values[layer]
        if kvh != kc.shape[1]:  # nested heads: the first kv heads only
            kc, vc = kc[:, :kvh], vc[:, :kvh]
        pos = at.start + torch.arange(T, device=x.device)
        kc[:, :, pos], vc[:, :, pos] = k, v
        y = _attend(q, kc[:, :, : at.span], vc[:, :, : at.span], at.mask)
    else:  # write this call's K/V at its slots, attend over every slot up to its end
        k, v = at.cache.update(layer, at.start, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=at.mask, enable_gqa=kvh != h)
    return _add_mm(x, y.transpose(1, 2).reshape(B * T, h * hd), L.wo)


def hidden(x: Tensor, gate: Tensor | None, up: Tensor, activation: str) -> Tensor:
    """The FFN's hidden activations (N, w) of (N, C) rows; the down projection is the
    caller's."""
    u = x @ up  # (N, w)
    if gate is not None:
        return F.silu(x @ gate) * u
    if activation == "gelu":
        return F.gelu(u)
    return F.relu(u).square()  # relu2: squared ReLU


def ffn(x: Tensor, L: LayerWeights, B: int) -> Tensor:
    """``x`` plus the layer's FFN, on (B * T, C) rows; a mixed-width batch (``L.rows``) runs
    each row at its own width (see :class:`RowWidths`)."""
    n = rms_norm(x, L.ffn_norm, L.eps)
    if L.rows is None:
        return _add_mm(x, hidden(n, L.gate, L.up, L.activation), L.down)
    perm, chunks = L.rows
    n = n.view(B, -1, n.shape[-1])  # (B, T, C): rows of the batch are what get permuted
    if perm is not None:
        n = n.index_select(0, perm)
    out = torch.zeros_like(n)
    for lo, hi, rows in chunks:
        gate = None if L.gate is None else L.gate[:, lo:hi]
        out[:rows] += hidden(n[:rows], gate, L.up[:, lo:hi], L.activation) @ L.down[lo:hi]
    if perm is not None:
        out = torch.empty_like(out).index_copy_(0, perm, out)
    return x + out.view_as(x)


def layer(x: Tensor, L: LayerWeights, B: int, T: int, at: Positions, index: int) -> Tensor:
    """One pre-norm block on (B * T, C) rows: x + attn(norm(x)), then x + ffn(norm(x)); a
    layer with 0 heads or 0 FFN units (depth elasticity) passes the residual stream on."""
    if L.n_head:
        x = attention(x, L, B, T, at, index)
    if L.up.shape[1]:
        x = ffn(x, L, B)
    return x


class Attention(nn.Module):
    """Multi-head attention weights with optional grouped-query K/V and nested heads: query
    heads ``0..h-1`` read K/V heads ``0..h // group - 1`` (GQA), so the first ``h`` heads form
    a complete smaller attention. The arithmetic is :func:`attention`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        d = cfg.d_model
        self.q_proj = nn.Linear(d, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, d, bias=False)


class NestedFFN(nn.Module):
    """FFN whose first ``width`` hidden units form a complete smaller FFN.

    Hidden unit i is the triple (gate[i], up[i], down[:, i]) at every width; gate and up are kept
    as separate matrices because a fused [gate; up] matrix sliced by prefix would break nesting.
    """

    def __init__(self, d_model: int, d_ff: int, activation: str) -> None:
        super().__init__()
        self.d_ff, self.activation = d_ff, activation
        with warnings.catch_warnings():  # d_ff=0 (a skipped FFN): torch warns that init no-ops
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            self.gate_proj = (nn.Linear(d_model, d_ff, bias=False) if activation == "swiglu"
                              else None)
            self.up_proj = nn.Linear(d_model, d_ff, bias=False)
            self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor, width: int | None = None) -> Tensor:
        """The FFN of the first ``width`` units (all if None) on (..., C) inputs, no norm."""
        w = self.d_ff if width is None else width
        gate = None if self.gate_proj is None else self.gate_proj.weight[:w].t()
        rows = x.reshape(-1, x.shape[-1])
        out = hidden(rows, gate, self.up_proj.weight[:w].t(), self.activation)
        return (out @ self.down_proj.weight[:, :w].t()).view_as(x)


class Block(nn.Module):
    """Pre-norm Transformer block's weights; :func:`layer` is its arithmetic.

    ``causal=False`` (set on the :class:`Positions`) makes attention bidirectional: the vision
    encoder reuses this block. ``attention=False`` builds a block without attention (a
    submodel that skips it): the residual stream passes to the FFN unchanged.
    """

    def __init__(self, cfg: ModelConfig, d_ff: int, attention: bool = True) -> None:
        super().__init__()
        self.eps, self.activation = cfg.norm_eps, cfg.activation
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if attention else None
        self.attn = Attention(cfg) if attention else None
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = NestedFFN(cfg.d_model, d_ff, cfg.activation)

    def weights(self, width: int, n_head: int, rows: RowChunks | None = None) -> LayerWeights:
        """Views of this block's weights for a submodel's layer: ``width`` FFN units and
        ``n_head`` query heads (0: no attention)."""
        ffn, attn = self.ffn, self.attn
        gate = None if ffn.gate_proj is None else ffn.gate_proj.weight[:width].t()
        up, down = ffn.up_proj.weight[:width].t(), ffn.down_proj.weight[:, :width].t()
        if attn is None or n_head == 0:
            return LayerWeights(None, None, None, None, None, self.ffn_norm.weight, gate, up,
                                down, 0, 0, rows, self.eps, self.activation)
        hd = attn.head_dim
        kvh = n_head * attn.n_kv_head // attn.n_head
        return LayerWeights(self.attn_norm.weight, attn.q_proj.weight[: n_head * hd].t(),
                            attn.k_proj.weight[: kvh * hd].t(),
                            attn.v_proj.weight[: kvh * hd].t(),
                            attn.o_proj.weight[:, : n_head * hd].t(), self.ffn_norm.weight,
                            gate, up, down, n_head, kvh, rows, self.eps, self.activation)

    def forward(self, x: Tensor, at: Positions, width: int, n_head: int,
                rows: RowChunks | None = None, index: int = 0) -> Tensor:
        """(B, T, C) -> (B, T, C) for one layer of a submodel (``index``: its cache layer)."""
        B, T, C = x.shape
        out = layer(x.reshape(B * T, C), self.weights(width, n_head, rows), B, T, at, index)
        return out.view(B, T, C)


class MatFormerLM(nn.Module):
    """Nested decoder-only language model; ``forward(idx, widths=...)`` runs any submodel.

    A dense (baseline or extracted) model is the same class with ``ratios=(1.0,)``: there is one
    code path for every model this package trains, evaluates or serves.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, d, attention=i not in cfg.skip_attention)
                                    for i, d in enumerate(cfg.ffn_dims))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = signed_rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if not self.embed.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 style init: normal(0, std), residual outputs scaled by 1/sqrt(2 n_layer).

        Small weights matter on CPU too: large ones produce fp32 denormals that slow matmuls.
        Also (re)builds the rotary tables, so a model made on the meta device and moved with
        ``to_empty`` is complete after this call.
        """
        cfg = self.config
        std = cfg.init_std
        if cfg.tie_embeddings:  # to_empty() gives every module its own tensor: tie again
            self.lm_head.weight = self.embed.weight
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, std / math.sqrt(2 * cfg.n_layer))
            else:
                p.normal_(0.0, std)
        self.reset_rope()

    def reset_rope(self) -> None:
        cfg = self.config
        self.rope_cos, self.rope_sin = signed_rope_tables(
            cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=self.embed.weight.device)

    def submodel(self, spec: SubmodelSpec = None, heads: HeadSpec = None) -> Submodel:
        """The config's :meth:`~matformer.config.ModelConfig.submodel` (resolve and check)."""
        return self.config.submodel(spec, heads)

    def num_params(self, spec: SubmodelSpec = None, *, embedding: bool = True) -> int:
        return self.config.num_params(spec, embedding=embedding)

    # ----------------------------------------------------------------- forward
    def forward(self, idx: Tensor, *, widths: SubmodelSpec | RowWidths = None,
                cache: KVCache | None = None, start_pos: int = 0) -> Tensor:
        """Logits (B, T, vocab) of a submodel.

        Args:
            idx: Token ids (B, T), T <= max_seq_len.
            widths: Which submodel: a :class:`~matformer.config.Submodel`, None for the full
                model, a granularity name ("S"; its heads too when heads are nested), one
                FFN width for every layer or one per layer; or a :class:`RowWidths`, one
                submodel per row of ``idx``.
            cache: Incremental decoding: a :class:`~matformer.cache.KVCache` owned by the
                caller. ``idx`` holds the tokens of slots ``start_pos .. start_pos + T - 1``;
                their K/V are written there and attention reads every slot before them.
                None (the training path) attends within ``idx`` only.
            start_pos: Cache slot of ``idx[:, 0]`` (ignored without a cache).
        """
        B, T = idx.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}")
        if isinstance(widths, RowWidths):
            if len(widths.rows) != B:
                raise ValueError(f"RowWidths has {len(widths.rows)} rows; the batch has {B}")
            sub, plans = widths.plan(self.config, idx.device)
        else:
            sub, plans = self.config.submodel(widths), [None] * self.config.n_layer
        at = self.positions(T, cache, start_pos)
        x = self.embed(idx)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, at, sub.widths[i], sub.heads[i], plans[i], i)
        return self.lm_head(self.norm(x))  # (B, T, vocab)

    def positions(self, T: int, cache: KVCache | None, start_pos: int) -> Positions:
        """Rotary tables and mask of a forward over ``T`` tokens (from ``start_pos`` in a
        cache, or a whole causal sequence without one)."""
        if cache is None:
            return Positions(self.rope_cos[:T, None], self.rope_sin[:T, None])
        cos, sin, mask = cache.prepare(start_pos, T, self.rope_cos, self.rope_sin)
        return Positions(cos, sin, cache=cache, start=start_pos, mask=mask)


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy in nats, computed in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def autocast(precision: str, device: torch.device | str = "cpu"
             ) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision="bf16"``, nothing for ``"fp32"``."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision={precision!r}: choose 'bf16' or 'fp32'")
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode for the block; restore each one's train/eval mode after."""
    modes = [(m, m.training) for m in models]
    for m, _ in modes:
        m.eval()
    try:
        yield
    finally:
        for m, was_training in reversed(modes):
            m.train(was_training)
