"""The one implementation of a Transformer block, on rows of weight views.

Every forward of the language model and the ViT runs these functions:
:class:`~matformer.model.Block` (training, evaluation, FSDP2's gathered weights, left-padded
and mixed-width batches) takes the views of its weights per call; the decoder's :class:`~matformer.runner.SubmodelRunner` takes them once
per submodel and, compiled, calls the same functions with static shapes. Activations are
(B * T, C) rows multiplied by transposed weight views (``rows @ w``): prefix slices of the full
matrices, never copies, so a smaller submodel does proportionally less work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .cache import KVCache

#: A mixed-width FFN plan: an optional row permutation (widest rows first) and chunks
#: ``(lo, hi, n)``: hidden units ``lo..hi-1`` apply to the first ``n`` (permuted) rows.
RowChunks = tuple[Tensor | None, list[tuple[int, int, int]]]


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
    out = x * cos + swapped * sin
    return out if out.dtype == x.dtype else out.to(x.dtype)


#: The int8 kernel reads inputs in blocks: rows of ``q`` are zero-padded to a multiple of this
#: (measured: other lengths, e.g. 40 or 72, read past the row).
INT8_BLOCK = 32


@dataclass(frozen=True)
class Int8Weight:
    """A matrix kept as int8 with one scale per output (weight-only quantization, as gpt-fast's
    int8 and llama.cpp's q8_0 keep weights); products dequantize on the fly
    (``aten._weight_int8pack_mm``: bf16 activations, a quarter of fp32's bytes streamed).

    Stands where a block's ``(in, out)`` weight view stands: ``x @ w`` becomes
    :func:`matmul` ``(x, w)``; ``shape`` is the view's.
    """

    q: Tensor  # (out, in rounded up to INT8_BLOCK) int8, contiguous, zeros past ``n_in``
    scale: Tensor  # (out,) bf16
    n_in: int

    @classmethod
    def of(cls, weight: Tensor) -> Int8Weight:
        """Quantize an (out, in) weight row by row: scale = max |row| / 127 (rounded up to a
        bf16, so that no value clips)."""
        w = weight.detach().float()
        exact = (w.abs().amax(1) / 127).clamp_min(1e-12)
        scale = exact.to(torch.bfloat16)
        scale = torch.where(scale.float() < exact, torch.nextafter(scale, scale + 1), scale)
        q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(_padded(q), scale, w.shape[1])

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n_in, self.q.shape[0]))

    def outputs(self, n: int) -> Int8Weight:
        """The first ``n`` outputs (a prefix of rows: views)."""
        return self if n == self.q.shape[0] else Int8Weight(self.q[:n], self.scale[:n],
                                                            self.n_in)

    def inputs(self, n: int) -> Int8Weight:
        """The first ``n`` inputs (columns: the kernel reads contiguous rows, so a copy when
        ``n`` is narrower than the matrix)."""
        if n == self.n_in:
            return self
        return Int8Weight(_padded(self.q[:, :n]), self.scale, n)


def _padded(q: Tensor) -> Tensor:
    """``q`` contiguous, its rows zero-padded to a multiple of :data:`INT8_BLOCK`."""
    pad = -q.shape[1] % INT8_BLOCK
    return (F.pad(q, (0, pad)) if pad else q).contiguous()


def matmul(x: Tensor, w: Tensor | Int8Weight) -> Tensor:
    """``x @ w`` for a weight view or an :class:`Int8Weight` (activations then in bf16)."""
    if isinstance(w, Tensor):
        return x @ w
    x = x.to(torch.bfloat16)
    if x.shape[-1] != w.q.shape[1]:  # the padded inputs are zero
        x = F.pad(x, (0, w.q.shape[1] - x.shape[-1]))
    # the kernel reads its rows unchecked: a strided view (a prefill's last position) must
    # become contiguous first
    return torch.ops.aten._weight_int8pack_mm(x.contiguous(), w.q, w.scale)


@dataclass(frozen=True)
class LayerWeights:
    """One block of one submodel: views of its weights (prefix slices, transposed for
    ``rows @ w``, never copies). Taken per call by :class:`Block` (so parameters that change,
    or that FSDP gathers per forward, are read fresh) and once per submodel by the decoder's
    runner."""

    attn_norm: Tensor | None  # None: the layer skips attention
    wq: Tensor | Int8Weight | None  # (C, h * hd)
    wk: Tensor | Int8Weight | None  # (C, kvh * hd)
    wv: Tensor | Int8Weight | None
    wo: Tensor | Int8Weight | None  # (h * hd, C)
    ffn_norm: Tensor
    gate: Tensor | Int8Weight | None  # (C, w); None without a gate (gelu, relu2)
    up: Tensor | Int8Weight  # (C, w)
    down: Tensor | Int8Weight  # (w, C)
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
        cache: The caller's KV cache (K/V written through its ``update``), or None.
        start: The cache slot of the first token.
        keys, values: Instead of ``cache``: each layer's own cache tensors (unpadded, written
            in place); with ``start`` a 0-d tensor, static shapes for a compiled graph (K/V
            written by index, attention over the first ``span`` slots under ``mask``).
        mask: Attention mask for the cached path (boolean, True = visible; or additive).
        fused: Residual adds fused into the matrix products (set from autocast: not there).
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
    fused: bool = field(init=False, default=True)

    def __post_init__(self) -> None:
        # x + a @ b as one addmm, except under autocast (checked once per forward, not per op)
        autocast = any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))
        object.__setattr__(self, "fused", not autocast)


def _add_mm(x: Tensor, a: Tensor, b: Tensor | Int8Weight, fused: bool) -> Tensor:
    """``x + a @ b``, fused into one ``addmm`` unless under autocast (where the fused form
    would make the fp32 residual stream bf16) or ``b`` is int8."""
    if fused and isinstance(b, Tensor):
        return torch.addmm(x, a, b)
    return x + matmul(a, b)


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
    q = matmul(n, L.wq).view(B, T, h, hd)
    k = matmul(n, L.wk).view(B, T, kvh, hd)
    v = matmul(n, L.wv).view(B, T, kvh, hd)
    if at.cos is not None:
        q, k = rotate(q, at.cos, at.sin), rotate(k, at.cos, at.sin)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
    if at.keys is not None:  # the decoder's runner: each layer's own cache tensors
        kc, vc = at.keys[layer], at.values[layer]
        if kvh != kc.shape[1]:  # nested heads: the first kv heads only
            kc, vc = kc[:, :kvh], vc[:, :kvh]
        if isinstance(at.start, Tensor):  # static shapes: an indexed write into a graph input
            # (in place once compiled), attention over the first ``span`` slots, causal mask
            pos = at.start + torch.arange(T, device=x.device)
            kc[:, :, pos], vc[:, :, pos] = k, v
            y = _attend(q, kc[:, :, : at.span], vc[:, :, : at.span], at.mask)
        else:
            end = at.start + T
            kc[:, :, at.start:end], vc[:, :, at.start:end] = k, v
            y = F.scaled_dot_product_attention(q, kc[:, :, :end], vc[:, :, :end],
                                               attn_mask=at.mask, enable_gqa=kvh != h)
    elif at.cache is not None:  # any KVCache (padded rows, a server's slots) through its API
        k, v = at.cache.update(layer, at.start, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=at.mask, enable_gqa=kvh != h)
    else:  # no cache: attend within the input
        y = F.scaled_dot_product_attention(q, k, v, is_causal=at.causal, enable_gqa=kvh != h)
    return _add_mm(x, y.transpose(1, 2).reshape(B * T, h * hd), L.wo, at.fused)


def hidden(x: Tensor, gate: Tensor | Int8Weight | None, up: Tensor | Int8Weight,
           activation: str) -> Tensor:
    """The FFN's hidden activations (N, w) of (N, C) rows; the down projection is the
    caller's."""
    u = matmul(x, up)  # (N, w)
    if gate is not None:
        g = F.silu(matmul(x, gate))
        return g.mul_(u) if not torch.is_grad_enabled() else g * u
    if activation == "gelu":
        return F.gelu(u)
    return F.relu(u).square()  # relu2: squared ReLU


def ffn(x: Tensor, L: LayerWeights, B: int, at: Positions) -> Tensor:
    """``x`` plus the layer's FFN, on (B * T, C) rows; a mixed-width batch (``L.rows``) runs
    each row at its own width (see :class:`~matformer.model.RowWidths`)."""
    n = rms_norm(x, L.ffn_norm, L.eps)
    if L.rows is None:
        return _add_mm(x, hidden(n, L.gate, L.up, L.activation), L.down, at.fused)
    perm, chunks = L.rows
    n = n.view(B, -1, n.shape[-1])  # (B, T, C): rows of the batch are what get permuted
    if perm is not None:
        n = n.index_select(0, perm)
    out = None
    for lo, hi, rows in chunks:  # the first chunk (the narrowest width) covers every row
        gate = None if L.gate is None else L.gate[:, lo:hi]
        part = hidden(n[:rows], gate, L.up[:, lo:hi], L.activation) @ L.down[lo:hi]
        if out is None:
            out = part
        else:
            out[:rows] += part
    if perm is not None:
        out = torch.empty_like(out).index_copy_(0, perm, out)
    return x + out.view_as(x)


def layer(x: Tensor, L: LayerWeights, B: int, T: int, at: Positions, index: int) -> Tensor:
    """One pre-norm block on (B * T, C) rows: x + attn(norm(x)), then x + ffn(norm(x)); a
    layer with 0 heads or 0 FFN units (depth elasticity) passes the residual stream on."""
    if L.n_head:
        x = attention(x, L, B, T, at, index)
    if L.up.shape[1]:
        x = ffn(x, L, B, at)
    return x
