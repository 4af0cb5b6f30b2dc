"""The MatFormer language model: a decoder-only Transformer whose FFNs are nested.

Every block's FFN hidden layer is ordered so that its first ``w`` units form a smaller FFN on
their own. A submodel is picked per call by a :class:`~matformer.config.Submodel` (per-layer
widths and heads); the forward pass then runs on *slices* (views) of the full weight matrices
(the block's arithmetic is :mod:`matformer.block`), so a smaller submodel really does less
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

from .block import LayerWeights, Positions, RowChunks, hidden, layer, rms_norm, signed_rope_tables
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


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


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
                                down, 0, 0, rows, self.ffn_norm.eps, self.ffn.activation)
        hd = attn.head_dim
        kvh = n_head * attn.n_kv_head // attn.n_head
        return LayerWeights(self.attn_norm.weight, attn.q_proj.weight[: n_head * hd].t(),
                            attn.k_proj.weight[: kvh * hd].t(),
                            attn.v_proj.weight[: kvh * hd].t(),
                            attn.o_proj.weight[:, : n_head * hd].t(), self.ffn_norm.weight,
                            gate, up, down, n_head, kvh, rows, self.ffn_norm.eps, self.ffn.activation)

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
