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
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig

if TYPE_CHECKING:
    from .cache import KVCache


class RowWidths:
    """One submodel per batch row, for serving a mixed batch from one set of weights.

    ``rows[b]`` is row ``b``'s per-layer FFN widths. Attention and every shared part run once
    for the whole batch. Because widths are prefixes, a layer's FFN runs in chunks of hidden
    units: units ``0..u1`` for every row, ``u1..u2`` for the rows at least ``u2`` wide, and so
    on (rows ordered widest first, so each chunk's rows are a leading slice). Every weight is
    read once, as for the widest row alone, and every row does the work of its own width; each
    row computes what it would compute alone (up to float summation order).

    Args:
        rows: One width spec per row (anything :meth:`MatFormerLM.resolve_widths` accepts).
    """

    def __init__(self, rows: Sequence[WidthSpec]) -> None:
        if not rows:
            raise ValueError("RowWidths needs at least one row")
        self.rows = tuple(rows)
        self._plans: dict[tuple[torch.device, tuple[tuple[int, ...], ...]], list] = {}

    def layer_plans(self, resolved: Sequence[tuple[int, ...]], device: torch.device
                    ) -> list[int | RowChunks]:
        """Per layer: the width when every row shares it, else a :data:`RowChunks` plan."""
        key = (device, tuple(resolved))
        if key not in self._plans:  # built once per batch composition, reused every step
            layers: list[int | RowChunks] = []
            for i in range(len(resolved[0])):
                ws = [r[i] for r in resolved]
                if len(set(ws)) == 1:
                    layers.append(ws[0])
                    continue
                order = sorted(range(len(ws)), key=lambda b: -ws[b])  # widest first
                perm = (None if order == list(range(len(ws)))
                        else torch.tensor(order, device=device))
                units = sorted(set(ws))
                chunks = [(lo, hi, sum(w >= hi for w in ws))
                          for lo, hi in zip([0, *units[:-1]], units, strict=True)]
                layers.append((perm, chunks))
            self._plans[key] = layers
        return self._plans[key]


#: A mixed-width FFN plan: an optional row permutation (widest rows first) and chunks
#: ``(lo, hi, n)``: hidden units ``lo..hi-1`` apply to the first ``n`` (permuted) rows.
RowChunks = tuple[Tensor | None, list[tuple[int, int, int]]]


#: What callers may pass as ``widths``: None (full model), a granularity name or index, one int
#: for every layer, one int per layer, or a :class:`RowWidths` (one submodel per batch row).
WidthSpec = None | str | int | Sequence[int]
#: Attention heads of a submodel: None (every head), a head-nested granularity's name, one
#: count for every layer, or one per layer (0: the layer's attention is skipped).
HeadSpec = None | str | int | Sequence[int]


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 for stability under bf16 autocast, then cast back.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).type_as(x)


def rope_tables(head_dim: int, max_len: int, theta: float, device: torch.device | None = None
                ) -> tuple[Tensor, Tensor]:
    """cos/sin tables (max_len, head_dim) in the "rotate half" layout used by Llama."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    freqs = torch.outer(torch.arange(max_len, device=device).float(), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, hd) queries or keys by position; cos/sin are (T, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class Attention(nn.Module):
    """Multi-head attention with optional grouped-query K/V and nested heads.

    Causal for the LM; ``causal=False`` lets every position attend to every other (the ViT).
    Rotary embeddings are applied when ``cos``/``sin`` are given (the ViT passes None: it adds
    absolute positions to its patch embeddings instead).
    """

    def __init__(self, cfg: ModelConfig, causal: bool = True) -> None:
        super().__init__()
        self.causal = causal
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        d = cfg.d_model
        self.q_proj = nn.Linear(d, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor | None, sin: Tensor | None,
                n_head: int | None = None, cache: KVCache | None = None, layer: int = 0,
                start_pos: int = 0, mask: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        h = self.n_head if n_head is None else n_head
        # GQA: query head j reads kv head j // group, so the first h query heads need the first
        # h // group kv heads (config validation guarantees h is a multiple of group).
        kvh = h * self.n_kv_head // self.n_head
        hd = self.head_dim
        q = F.linear(x, self.q_proj.weight[: h * hd]).view(B, T, h, hd).transpose(1, 2)
        k = F.linear(x, self.k_proj.weight[: kvh * hd]).view(B, T, kvh, hd).transpose(1, 2)
        v = F.linear(x, self.v_proj.weight[: kvh * hd]).view(B, T, kvh, hd).transpose(1, 2)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, h, T, hd)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                               enable_gqa=kvh != h)
        else:  # write this call's K/V at start_pos, attend over every slot up to its end
            k, v = cache.update(layer, start_pos, k, v)  # (B, kvh, start_pos + T, hd)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kvh != h)
        y = y.transpose(1, 2).reshape(B, T, h * hd)
        return F.linear(y, self.o_proj.weight[:, : h * hd])


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

    def forward(self, x: Tensor, width: int | RowChunks | None = None) -> Tensor:
        """FFN of the first ``width`` units; a :data:`RowChunks` plan runs each batch row at
        its own width (a mixed-width batch, see :class:`RowWidths`)."""
        if isinstance(width, tuple):
            return self._forward_rows(x, *width)
        return self._units(x, 0, self.d_ff if width is None else width)

    def _units(self, x: Tensor, lo: int, hi: int) -> Tensor:
        """The contribution of hidden units ``lo..hi-1`` (views of the weights, no copy)."""
        up = F.linear(x, self.up_proj.weight[lo:hi])  # (B, T, hi - lo)
        if self.gate_proj is not None:
            hidden = F.silu(F.linear(x, self.gate_proj.weight[lo:hi])) * up
        elif self.activation == "gelu":
            hidden = F.gelu(up)
        else:  # relu2: squared ReLU
            hidden = F.relu(up).square()
        return F.linear(hidden, self.down_proj.weight[:, lo:hi])  # (B, T, C)

    def _forward_rows(self, x: Tensor, perm: Tensor | None,
                      chunks: list[tuple[int, int, int]]) -> Tensor:
        if perm is not None:
            x = x.index_select(0, perm)
        out = self._units(x, *chunks[0][:2])  # the narrowest width: every row
        for lo, hi, n in chunks[1:]:
            out[:n] += self._units(x[:n], lo, hi)
        return out if perm is None else torch.empty_like(out).index_copy_(0, perm, out)


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + ffn(norm(x)).

    ``causal=False`` makes the attention bidirectional (the vision encoder reuses this block).
    ``attention=False`` builds a block without attention (a submodel that skips it): the
    residual stream passes to the FFN unchanged.
    """

    def __init__(self, cfg: ModelConfig, d_ff: int, causal: bool = True,
                 attention: bool = True) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if attention else None
        self.attn = Attention(cfg, causal) if attention else None
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = NestedFFN(cfg.d_model, d_ff, cfg.activation)

    def forward(self, x: Tensor, cos: Tensor | None, sin: Tensor | None,
                width: int | RowChunks | None = None, n_head: int | None = None,
                cache: KVCache | None = None, layer: int = 0,
                start_pos: int = 0, mask: Tensor | None = None) -> Tensor:
        # n_head == 0 (depth elasticity): skip attention; the layer's cache slot stays unused
        if self.attn is not None and n_head != 0:
            x = x + self.attn(self.attn_norm(x), cos, sin, n_head, cache, layer, start_pos, mask)
        if width == 0:  # depth elasticity: this submodel skips the layer's FFN
            return x
        return x + self.ffn(self.ffn_norm(x), width)


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
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
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
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta,
                               device=self.embed.weight.device)
        self.rope_cos, self.rope_sin = cos, sin

    # ----------------------------------------------------------------- submodel specs
    def resolve_widths(self, widths: WidthSpec) -> tuple[int, ...]:
        """Turn any accepted width spec into one validated int per layer (0: skip the FFN)."""
        cfg = self.config
        if widths is None:
            return cfg.ffn_dims
        if isinstance(widths, str):
            return cfg.ffn_widths(widths)
        if isinstance(widths, int):
            widths = (widths,) * cfg.n_layer
        widths = tuple(int(w) for w in widths)
        if len(widths) != cfg.n_layer:
            raise ValueError(f"widths {widths} has {len(widths)} entries; the model has "
                             f"{cfg.n_layer} layers")
        for i, (w, full) in enumerate(zip(widths, cfg.ffn_dims, strict=True)):
            if not 0 <= w <= full:
                raise ValueError(f"width {w} at layer {i} is out of range: allowed 0..{full} "
                                 "(0 skips the layer's FFN)")
        return widths

    def resolve_heads(self, heads: str | int | Sequence[int] | None) -> tuple[int, ...] | None:
        """Per-layer head counts (None = all heads); a granularity name maps via head_ratios.

        0 skips a layer's attention (depth elasticity). One int applies to every layer that has
        attention; layers the config builds without attention (``skip_attention``) always get
        0, and None resolves to a tuple with those zeros when there are any.
        """
        cfg = self.config
        skip = cfg.skip_attention
        if heads is None:
            return cfg.attention_heads if skip else None
        if isinstance(heads, str):
            counts = cfg.head_counts(heads)
            if counts is None:
                raise ValueError("this model does not nest attention heads (nest_heads=False)")
            return counts
        if isinstance(heads, int):
            counts = tuple(0 if i in skip else heads for i in range(cfg.n_layer))
        else:
            counts = tuple(int(h) for h in heads)
        group = cfg.n_head // cfg.kv_heads
        if len(counts) != cfg.n_layer or any(
            not 0 <= h <= cfg.n_head or h % group for h in counts
        ):
            raise ValueError(f"heads {counts}: need {cfg.n_layer} counts in 0..{cfg.n_head} "
                             f"(0 skips the layer's attention), each a multiple of the GQA "
                             f"group size {group}")
        bad = [i for i in skip if counts[i]]
        if bad:
            raise ValueError(f"heads {counts}: layers {bad} of this model have no attention "
                             f"(skip_attention={list(skip)}); give 0 heads there")
        return counts

    # ----------------------------------------------------------------- forward
    def forward(self, idx: Tensor, *, widths: WidthSpec | RowWidths = None,
                heads: str | int | Sequence[int] | None = None, cache: KVCache | None = None,
                start_pos: int = 0) -> Tensor:
        """Logits (B, T, vocab) of the submodel given by ``widths`` (and ``heads``).

        Args:
            idx: Token ids (B, T), T <= max_seq_len.
            widths: None for the full model, a granularity name ("S"), one int for every layer
                or one int per layer; or a :class:`RowWidths`, one submodel per row of ``idx``.
            heads: Attention heads per layer when heads are nested; a granularity name picks
                that granularity's head count. None uses every head. 0 heads at a layer skips
                its attention (any model).
            cache: Incremental decoding: a :class:`~matformer.cache.KVCache` owned by the
                caller. ``idx`` holds the tokens of slots ``start_pos .. start_pos + T - 1``;
                their K/V are written there and attention reads every slot before them.
                None (the training path) attends within ``idx`` only.
            start_pos: Cache slot of ``idx[:, 0]`` (ignored without a cache).
        """
        T = idx.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}")
        if isinstance(widths, RowWidths):
            if len(widths.rows) != idx.shape[0]:
                raise ValueError(f"RowWidths has {len(widths.rows)} rows; the batch has "
                                 f"{idx.shape[0]}")
            ws = widths.layer_plans([self.resolve_widths(w) for w in widths.rows], idx.device)
        else:
            ws = self.resolve_widths(widths)
        hs = self.resolve_heads(heads)
        mask = None
        if cache is None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            cos, sin, mask = cache.prepare(start_pos, T, self.rope_cos, self.rope_sin)
        x = self.embed(idx)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, ws[i], None if hs is None else hs[i], cache, i, start_pos,
                      mask)
        return self.lm_head(self.norm(x))  # (B, T, vocab)

    def num_params(self, widths: WidthSpec = None, *, embedding: bool = True,
                   heads: str | int | Sequence[int] | None = None) -> int:
        return self.config.num_params(self.resolve_widths(widths), embedding=embedding,
                                      heads=self.resolve_heads(heads))


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
