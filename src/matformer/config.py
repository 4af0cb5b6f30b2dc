"""Model configuration: one frozen, validated dataclass, presets, and the submodel value.

A MatFormer is one set of weights; a submodel is nothing but per-layer FFN widths and per-layer
attention head counts (:class:`Submodel`). :meth:`ModelConfig.submodel` is the one place that
turns what people write ("S", "XL", ``256``, ``[128, 128, 256, 512]``) into that value and
checks every number, before a tensor is allocated.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .outputs import write_text_atomic

ACTIVATIONS = ("swiglu", "gelu", "relu2")

#: The paper's default nesting: FFN widths {1/8, 1/4, 1/2, 1} x d_ff, named S, M, L, XL.
DEFAULT_RATIOS = (0.125, 0.25, 0.5, 1.0)
DEFAULT_NAMES = ("S", "M", "L", "XL")
#: MatLM-Attn (arXiv 2310.07707, App. F.2): heads n/4, n/2, 3n/4, n for S..XL when head nesting is on.
DEFAULT_HEAD_RATIOS = (0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True, eq=False)
class Submodel:
    """Which submodel of a MatFormer runs: resolved once, then passed everywhere.

    Attributes:
        widths: FFN hidden units of every layer (a prefix of the layer's FFN; 0 skips it).
        heads: Query heads of every layer (a prefix of its heads; 0 skips its attention).
        name: A label for people (``"S"``, ``"4xM+2xL"``); not part of equality or hashing,
            so the same widths and heads are one submodel whatever they are called.
    """

    widths: tuple[int, ...]
    heads: tuple[int, ...]
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "heads", tuple(int(h) for h in self.heads))
        if len(self.widths) != len(self.heads):
            raise ValueError(f"Submodel has {len(self.widths)} widths but {len(self.heads)} "
                             "head counts; give one of each per layer")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Submodel):
            return NotImplemented
        return (self.widths, self.heads) == (other.widths, other.heads)

    def __hash__(self) -> int:
        return hash((self.widths, self.heads))

    @property
    def n_layer(self) -> int:
        return len(self.widths)

    def nested_in(self, other: Submodel) -> bool:
        """True when no layer of this submodel is wider (FFN or heads) than in ``other``."""
        return all(a <= b for a, b in zip(self.widths + self.heads, other.widths + other.heads,
                                          strict=True))

    def __str__(self) -> str:
        return self.name or f"widths {list(self.widths)}, heads {list(self.heads)}"


#: What callers may pass to pick a submodel: a :class:`Submodel`, None (the full model), a
#: granularity name, one FFN width for every layer, or one per layer.
SubmodelSpec = None | str | int | Sequence[int] | Submodel
#: Attention heads of a submodel given apart from its widths: None (the granularity's heads when
#: widths is a granularity name and heads are nested, else every head), a head-nested
#: granularity's name, one count for every layer, or one per layer (0: attention skipped).
HeadSpec = None | str | int | Sequence[int]


def _fail(field_name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"ModelConfig.{field_name}={value!r} is invalid: {allowed}")


def dataclass_from_dict(cls: Any, data: dict[str, Any]) -> Any:
    """``cls(**data)`` for a config dataclass, refusing keys it does not know (a typo or a
    file from another version) with a message that lists the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    return cls(**data)


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a (nested) decoder-only Transformer.

    Attributes:
        vocab_size: Number of token ids.
        n_layer: Number of Transformer blocks.
        n_head: Query heads per block.
        n_kv_head: Key/value heads (grouped-query attention); ``None`` means ``n_head``.
        d_model: Residual stream width.
        d_ff: FFN hidden width: one int for every layer, or one int per layer (how an extracted
            Mix'n'Match submodel is described).
        ratios: Granularities as fractions of each layer's ``d_ff``, strictly increasing, the
            last one 1.0 (the full, "universal" model). ``(1.0,)`` is an ordinary dense model.
        names: One name per granularity, e.g. ``("S", "M", "L", "XL")``.
        activation: ``swiglu`` (gated, separate gate/up/down), ``gelu`` or ``relu2`` (squared ReLU).
        max_seq_len: Longest context the rotary tables are built for.
        rope_theta: RoPE base frequency.
        norm_eps: RMSNorm epsilon.
        tie_embeddings: Share the token embedding with the output head.
        nest_heads: Also nest attention heads (MatLM-Attn); granularity i keeps the first
            ``head_ratios[i] * n_head`` heads.
        head_ratios: Fractions of heads per granularity when ``nest_heads`` is on.
        init_std: Standard deviation of the normal weight init (GPT-2 style).
        skip_attention: Indices of the layers that have no attention at all (depth elasticity:
            an extracted submodel that skips those layers' attention; their weights are not
            stored and the residual stream passes through). Empty for every trained model.
    """

    vocab_size: int = 257
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None
    d_model: int = 128
    d_ff: int | tuple[int, ...] = 512
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    names: tuple[str, ...] = DEFAULT_NAMES
    activation: str = "swiglu"
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    nest_heads: bool = False
    head_ratios: tuple[float, ...] = field(default=DEFAULT_HEAD_RATIOS)
    init_std: float = 0.02
    skip_attention: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # JSON gives lists; store tuples so the config stays hashable and immutable.
        for name in ("ratios", "names", "head_ratios", "skip_attention"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.d_ff, list | tuple):
            object.__setattr__(self, "d_ff", tuple(int(w) for w in self.d_ff))
        self._validate()

    def _validate(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _fail(name, value, "must be a positive integer")
        if self.d_model % self.n_head:
            raise _fail("d_model", self.d_model, f"must be divisible by n_head={self.n_head}")
        if self.head_dim % 2:
            raise _fail("d_model", self.d_model, "d_model / n_head must be even for RoPE")
        kv = self.kv_heads
        if not 1 <= kv <= self.n_head or self.n_head % kv:
            raise _fail("n_kv_head", self.n_kv_head, f"must divide n_head={self.n_head}")
        if isinstance(self.d_ff, tuple):
            if len(self.d_ff) != self.n_layer:
                raise _fail("d_ff", self.d_ff, f"per-layer list needs n_layer={self.n_layer} ints")
        elif not isinstance(self.d_ff, int):
            raise _fail("d_ff", self.d_ff, "must be an int or one int per layer")
        if any(w < 0 for w in self.ffn_dims) or not any(self.ffn_dims):
            raise _fail("d_ff", self.d_ff, "every width must be >= 0 (0: the layer has no FFN), "
                        "at least one > 0")
        self._validate_ratios("ratios", self.ratios)
        if len(self.names) != len(self.ratios) or len(set(self.names)) != len(self.names):
            raise _fail("names", self.names, f"need {len(self.ratios)} distinct names, one per ratio")
        for i in range(self.num_granularities):
            widths = self.ffn_widths(i)
            if i and any(a <= b for a, b, d in zip(widths, self.ffn_widths(i - 1),
                                                   self.ffn_dims, strict=True) if d):
                raise _fail("ratios", self.ratios, f"granularities {self.names[i - 1]} and "
                            f"{self.names[i]} round to the same FFN width for d_ff={self.d_ff}")
        if self.activation not in ACTIVATIONS:
            raise _fail("activation", self.activation, f"choose one of {ACTIVATIONS}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0 and math.isfinite(value)):
                raise _fail(name, value, "must be a positive finite number")
        skip = self.skip_attention
        if (any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.n_layer
                for i in skip) or list(skip) != sorted(set(skip))):
            raise _fail("skip_attention", skip, "must be distinct layer indices in "
                        f"0..{self.n_layer - 1}, ascending")
        if self.nest_heads:
            self._validate_ratios("head_ratios", self.head_ratios)
            if len(self.head_ratios) != self.num_granularities:
                raise _fail("head_ratios", self.head_ratios,
                            f"need one ratio per granularity ({self.num_granularities})")
            group = self.n_head // kv
            for r in self.head_ratios:
                h = round(r * self.n_head)
                if h < 1 or h % group:
                    raise _fail("head_ratios", self.head_ratios, f"{r} x n_head={self.n_head} "
                                f"must be a positive multiple of the GQA group size {group}")

    @staticmethod
    def _validate_ratios(name: str, ratios: tuple[float, ...]) -> None:
        if not ratios:
            raise _fail(name, ratios, "need at least one granularity")
        if any(not 0 < r <= 1 for r in ratios) or list(ratios) != sorted(set(ratios)):
            raise _fail(name, ratios, "must be strictly increasing fractions in (0, 1]")
        if ratios[-1] != 1.0:
            raise _fail(name, ratios, "the last granularity must be 1.0 (the full model)")

    # ----------------------------------------------------------------- derived values
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def ffn_dims(self) -> tuple[int, ...]:
        """Full FFN hidden width of every layer."""
        if isinstance(self.d_ff, tuple):
            return self.d_ff
        return (self.d_ff,) * self.n_layer

    @property
    def num_granularities(self) -> int:
        return len(self.ratios)

    def granularity_index(self, granularity: str | int) -> int:
        """Index of a granularity given by name (``"S"``) or index; ValueError if unknown."""
        if isinstance(granularity, int) and not isinstance(granularity, bool):
            if 0 <= granularity < self.num_granularities:
                return granularity
        elif granularity in self.names:
            return self.names.index(granularity)
        raise ValueError(f"unknown granularity {granularity!r}: this model has {list(self.names)}"
                         f" (or indices 0..{self.num_granularities - 1})")

    def ffn_widths(self, granularity: str | int) -> tuple[int, ...]:
        """Per-layer FFN widths of one granularity: the first ``ratio * d_ff`` hidden units
        (0 stays 0: a layer without FFN)."""
        r = self.ratios[self.granularity_index(granularity)]
        return tuple(max(1, round(r * d)) if d else 0 for d in self.ffn_dims)

    def head_counts(self, granularity: str | int) -> tuple[int, ...] | None:
        """Per-layer head counts of a granularity (0 at a layer without attention), or None
        when heads are not nested."""
        if not self.nest_heads:
            return None
        r = self.head_ratios[self.granularity_index(granularity)]
        return tuple(0 if i in self.skip_attention else round(r * self.n_head)
                     for i in range(self.n_layer))

    @property
    def attention_heads(self) -> tuple[int, ...]:
        """Query heads of every layer: ``n_head``, or 0 where ``skip_attention`` lists it."""
        return tuple(0 if i in self.skip_attention else self.n_head for i in range(self.n_layer))

    # ----------------------------------------------------------------- submodels
    def submodel(self, spec: SubmodelSpec = None, heads: HeadSpec = None) -> Submodel:
        """Resolve and check a submodel: the one place names, ints and lists become widths.

        Args:
            spec: A :class:`Submodel` (returned as is, after a shape check), None (the full
                model), a granularity name (its widths and, when heads are nested, its heads),
                one FFN width for every layer, or one per layer (0 skips a layer's FFN).
            heads: Heads apart from the widths (see :data:`HeadSpec`); not with a Submodel.

        Raises:
            ValueError: naming the bad value and what is allowed.
        """
        if isinstance(spec, Submodel):
            if heads is not None:
                raise ValueError("heads are part of a Submodel; give them to "
                                 "ModelConfig.submodel when making it, not beside it")
            if spec.n_layer != self.n_layer:
                raise ValueError(f"{spec} has {spec.n_layer} layers; the model has "
                                 f"{self.n_layer}")
            self._check_widths(spec.widths)
            self._check_heads(spec.heads)
            return spec
        name = ""
        if spec is None:
            widths, name = self.ffn_dims, self.names[-1]
        elif isinstance(spec, str):
            widths, name = self.ffn_widths(spec), spec
            if heads is None and self.nest_heads:
                heads = spec
        else:
            widths = ((int(spec),) * self.n_layer if isinstance(spec, int)
                      else tuple(int(w) for w in spec))
            self._check_widths(widths)
        if heads is not None and heads != spec:
            name = ""  # heads given apart: not the granularity the name would say
        return Submodel(widths, self._resolve_heads(heads), name)

    def granularities(self) -> list[Submodel]:
        """Every named granularity, smallest first."""
        return [self.submodel(name) for name in self.names]

    def _check_widths(self, widths: tuple[int, ...]) -> None:
        if len(widths) != self.n_layer:
            raise ValueError(f"widths {list(widths)} has {len(widths)} entries; the model has "
                             f"{self.n_layer} layers")
        for i, (w, full) in enumerate(zip(widths, self.ffn_dims, strict=True)):
            if not 0 <= w <= full:
                raise ValueError(f"width {w} at layer {i} is out of range: allowed 0..{full} "
                                 "(0 skips the layer's FFN)")

    def _resolve_heads(self, heads: HeadSpec) -> tuple[int, ...]:
        skip = self.skip_attention
        if heads is None:
            return self.attention_heads
        if isinstance(heads, str):
            counts = self.head_counts(heads)
            if counts is None:
                raise ValueError(f"heads {heads!r}: this model does not nest attention heads "
                                 "(nest_heads=False)")
            return counts
        if isinstance(heads, int):
            counts = tuple(0 if i in skip else heads for i in range(self.n_layer))
        else:
            counts = tuple(int(h) for h in heads)
        self._check_heads(counts)
        return counts

    def _check_heads(self, counts: tuple[int, ...]) -> None:
        group = self.n_head // self.kv_heads
        if len(counts) != self.n_layer or any(
                not 0 <= h <= self.n_head or h % group for h in counts):
            raise ValueError(f"heads {list(counts)}: need {self.n_layer} counts in "
                             f"0..{self.n_head} (0 skips the layer's attention), each a "
                             f"multiple of the GQA group size {group}")
        bad = [i for i in self.skip_attention if counts[i]]
        if bad:
            raise ValueError(f"heads {list(counts)}: layers {bad} of this model have no "
                             f"attention (skip_attention={list(self.skip_attention)}); give 0 "
                             "heads there")

    # ----------------------------------------------------------------- costs
    def num_params(self, sub: SubmodelSpec = None, *, embedding: bool = True) -> int:
        """Parameter count of a submodel (the full model if None). A layer without attention
        (0 heads) has no attention weights and no attention norm."""
        sub = self.submodel(sub)
        d, hd, group = self.d_model, self.head_dim, self.n_head // self.kv_heads
        mats = 3 if self.activation == "swiglu" else 2
        blocks = sum(d * hd * (2 * h + 2 * (h // group)) + (d if h else 0) + mats * d * w + d
                     for w, h in zip(sub.widths, sub.heads, strict=True))
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return blocks + d + (emb if embedding else 0)

    def matrix_params(self, sub: SubmodelSpec = None) -> int:
        """The blocks' matrix-product weights (one multiply-add each per token): the
        non-embedding parameters less the norm gains (two per layer with attention, one
        without, and the final norm)."""
        sub = self.submodel(sub)
        norms = sum(self.d_model * (2 if h else 1) for h in sub.heads) + self.d_model
        return self.num_params(sub, embedding=False) - norms

    def flops_per_token(self, sub: SubmodelSpec = None, seq_len: int | None = None) -> int:
        """Forward FLOPs per token (2 per multiply-add), attention over ``seq_len`` included."""
        sub = self.submodel(sub)
        seq_len = self.max_seq_len if seq_len is None else seq_len
        head = self.vocab_size * self.d_model
        attn = sum(2 * h * self.head_dim * seq_len for h in sub.heads)  # QK^T and AV
        return 2 * (self.matrix_params(sub) + head) + attn

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        if not self.skip_attention:  # files of models with attention everywhere stay as before
            del out["skip_attention"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return dataclass_from_dict(cls, data)

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); is the checkpoint corrupt?") from e
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def dense(self, granularity: str | int) -> ModelConfig:
        """Config of an ordinary dense Transformer at one granularity's width (a baseline)."""
        widths = self.ffn_widths(granularity)
        name = self.names[self.granularity_index(granularity)]
        d_ff = widths[0] if len(set(widths)) == 1 else widths
        return self.replace(d_ff=d_ff, ratios=(1.0,), names=(name,), nest_heads=False)


def _lm(d_model: int, n_layer: int, n_head: int, **kw: Any) -> dict[str, Any]:
    return dict(d_model=d_model, n_layer=n_layer, n_head=n_head, d_ff=4 * d_model, **kw)


#: Presets. ``tiny`` is for tests (seconds), ``demo`` is the README's main job on 2 CPU cores,
#: the ``paper-*`` shapes follow the paper's App. B.1 / Table 4 (16 layers, 16 heads, d_ff = 4 d_model,
#: context 1024) with the vocabulary left to the tokenizer.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _lm(32, 2, 2, max_seq_len=64),
    "demo": _lm(256, 6, 8, max_seq_len=256),
    "paper-78m": _lm(256, 16, 16, max_seq_len=1024),
    "paper-180m": _lm(512, 16, 16, max_seq_len=1024),
    "paper-310m": _lm(768, 16, 16, max_seq_len=1024),
    "paper-463m": _lm(1024, 16, 16, max_seq_len=1024),
    "paper-850m": _lm(1536, 16, 16, max_seq_len=1024),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Build a preset config; ``overrides`` replace any field (e.g. ``vocab_size``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
