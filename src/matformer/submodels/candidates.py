"""Mix'n'Match candidates: which per-layer widths to try, their names and static costs.

A nested checkpoint holds every per-layer choice of granularity (4^l for 4 granularities and l
layers). The paper (arXiv 2310.07707, sec. 3.3 and App. D) finds the good ones are **non-decreasing with depth, with the least slope**.
:func:`rule_candidates` keeps, for every parameter count a non-decreasing choice reaches, the
one of least slope, so candidates fill the range S..XL as densely as the rule can. The other
orders the paper compared (decreasing, inc-dec, dec-inc, random) re-order the same widths, so
each ablation point has a rule point of exactly its size. Static costs are parameters and FLOPs per token;
:mod:`matformer.submodels.sweep` scores and times candidates, :mod:`matformer.submodels.extract` copies one out.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import combinations_with_replacement, groupby, pairwise
from typing import Any

from ..config import ModelConfig, Submodel

log = logging.getLogger(__name__)

#: Candidate orders: the paper's rule and the alternatives it compared (sec. 3.3, App. D).
PATTERNS = ("rule", "decreasing", "inc-dec", "dec-inc", "random")
#: Beyond this many non-decreasing choices the rule falls back to two adjacent granularities.
MAX_ENUMERATION = 200_000


@dataclass(frozen=True, eq=False)
class Candidate(Submodel):
    """A submodel to evaluate, with the pattern that produced it (``uniform``, ``rule``, an
    ablation order, ``explicit``, ``depth-ffn``/``depth-attn``). Equal to any submodel with the
    same widths and heads."""

    pattern: str = field(default="explicit", compare=False)


def _candidate(cfg: Any, name: str, pattern: str, widths: Sequence[int],
               heads: Sequence[int] | None = None) -> Candidate:
    """A candidate with ``heads`` (default: every layer's own heads)."""
    return Candidate(tuple(widths), tuple(cfg.attention_heads if heads is None else heads), name,
                     pattern)


# ----------------------------------------------------------------------------- widths
def nested_widths(cfg: ModelConfig) -> list[list[int]]:
    """The trained widths of every layer (one per granularity), ascending."""
    return [sorted({cfg.ffn_widths(g)[i] for g in range(cfg.num_granularities)})
            for i in range(cfg.n_layer)]


def check_widths(cfg: ModelConfig, widths: Sequence[int], *, nested: bool = True
                 ) -> tuple[int, ...]:
    """Validate per-layer widths: length, range and (if ``nested``) membership of the nested
    set. Any prefix width runs, but only the granularities' widths were trained. Width 0 (skip
    the layer's FFN: depth elasticity) is always allowed; it was not trained either."""
    widths = tuple(int(w) for w in widths)
    if len(widths) != cfg.n_layer:
        raise ValueError(f"widths {list(widths)} has {len(widths)} entries; the model has "
                         f"{cfg.n_layer} layers")
    allowed = nested_widths(cfg)
    for i, (w, full) in enumerate(zip(widths, cfg.ffn_dims, strict=True)):
        if not 0 <= w <= full:
            raise ValueError(f"width {w} at layer {i} is out of range: allowed 0..{full} "
                             "(0 skips the layer's FFN)")
        if nested and w and w not in allowed[i]:
            raise ValueError(f"width {w} at layer {i} is not in the nested set {allowed[i]} "
                             f"(granularities {list(cfg.names)}); pass nested=False to run an "
                             "untrained prefix width anyway")
    return widths


def describe(cfg: ModelConfig, widths: Sequence[int]) -> str:
    """Short name in the paper's notation: ``"M"``, ``"4xM+2xL"`` (in layer order; ``0`` is a
    skipped FFN)."""
    table = {i: {0: "0", **{cfg.ffn_widths(g)[i]: n for g, n in enumerate(cfg.names)}}
             for i in range(cfg.n_layer)}
    labels = [table[i].get(w) for i, w in enumerate(widths)]
    if None in labels:
        return "custom:" + ",".join(map(str, widths))
    runs = [(lab, len(list(g))) for lab, g in groupby(labels)]
    if len(runs) == 1:
        return str(runs[0][0])
    return "+".join(f"{n}x{lab}" if n > 1 else str(lab) for lab, n in runs)


def span(cfg: ModelConfig, widths: Sequence[int]) -> int | None:
    """Granularities spanned from the narrowest to the widest layer (None: untrained widths)."""
    table = nested_widths(cfg)
    levels = [table[i].index(w) if w in table[i] else None for i, w in enumerate(widths)]
    return None if None in levels else max(levels) - min(levels)


def _levels_to_widths(cfg: ModelConfig, levels: Sequence[int]) -> tuple[int, ...]:
    return tuple(cfg.ffn_widths(g)[i] for i, g in enumerate(levels))


def _nondecreasing(n_layer: int, g: int) -> Iterable[tuple[int, ...]]:
    if math.comb(n_layer + g - 1, g - 1) <= MAX_ENUMERATION:
        return combinations_with_replacement(range(g), n_layer)
    log.warning("%d layers x %d granularities: too many choices to enumerate; using pairs of "
                "adjacent granularities only", n_layer, g)
    return (tuple([i] * k + [i + 1] * (n_layer - k)) for i in range(g - 1)
            for k in range(n_layer + 1))


def rule_candidates(cfg: ModelConfig) -> list[Candidate]:
    """The paper's rule: non-decreasing with depth, least slope; one per parameter count.

    Every non-decreasing per-layer choice of granularity is scored by (slope: granularities
    spanned from first to last layer, then number of width changes, then order); for each
    distinct parameter count the best-scoring one is kept. So [M,M,M,M,L,L] (span 1) is
    preferred to [S,S,S,S,XL,XL]; wider spans appear only for sizes no gentler slope reaches.
    The uniform granularities (slope 0) are always among them. Sorted by parameters.
    """
    best: dict[int, tuple[tuple[Any, ...], tuple[int, ...]]] = {}
    for levels in _nondecreasing(cfg.n_layer, cfg.num_granularities):
        params = cfg.num_params(_levels_to_widths(cfg, levels))
        changes = sum(a != b for a, b in pairwise(levels))
        key = (levels[-1] - levels[0], changes, levels)
        if params not in best or key < best[params][0]:
            best[params] = (key, levels)
    out = []
    for params in sorted(best):
        widths = _levels_to_widths(cfg, best[params][1])
        out.append(_candidate(cfg, describe(cfg, widths), "rule", widths))
    return out


def _levels(cfg: ModelConfig, widths: Sequence[int]) -> tuple[int, ...]:
    """The granularity index of each layer's width (the widths must be granularities')."""
    return tuple(next(g for g in range(cfg.num_granularities) if cfg.ffn_widths(g)[i] == w)
                 for i, w in enumerate(widths))


def _arrange(levels: tuple[int, ...], pattern: str, rng: random.Random) -> tuple[int, ...]:
    """Re-order a candidate's per-layer granularity levels by an ablation ``pattern`` (levels,
    not widths: layers may have FFNs of different sizes)."""
    s = sorted(levels)
    if pattern == "decreasing":
        return tuple(reversed(s))
    if pattern == "inc-dec":  # a0 a2 a4 ... a5 a3 a1: rises to the middle, then falls
        return tuple(s[0::2] + s[1::2][::-1])
    if pattern == "dec-inc":
        return tuple(s[0::2][::-1] + s[1::2])
    if pattern == "random":
        out = list(levels)
        for _ in range(10):  # a shuffle equal to the sorted order says nothing new
            rng.shuffle(out)
            if out != s:
                break
        return tuple(out)
    raise ValueError(f"unknown pattern {pattern!r}; choose from {PATTERNS}")


def depth_candidates(cfg: ModelConfig, base: str | int | None = None) -> list[Candidate]:
    """Depth elasticity: granularity ``base`` (default: the full model) with one layer's FFN
    skipped (pattern ``depth-ffn``, width 0), and with one layer's attention skipped (pattern
    ``depth-attn``, 0 heads), for every layer. Layers whose FFN is already absent, or whose
    attention the config already lacks, are left out. Neither was trained: the sweep measures
    what each costs, so the layers where skipping hurts least show up.
    """
    g = cfg.num_granularities - 1 if base is None else cfg.granularity_index(base)
    name, widths = cfg.names[g], cfg.ffn_widths(g)
    out = []
    for i in range(cfg.n_layer):
        if widths[i] and sum(map(bool, widths)) > 1:
            w = (*widths[:i], 0, *widths[i + 1:])
            out.append(_candidate(cfg, f"{name}-ffn{i}", "depth-ffn", w))
    heads = cfg.attention_heads
    for i in range(cfg.n_layer):
        if heads[i]:
            h = (*heads[:i], 0, *heads[i + 1:])
            out.append(_candidate(cfg, f"{name}-attn{i}", "depth-attn", widths, h))
    return out


def candidates(cfg: ModelConfig, patterns: Sequence[str] = ("rule",), *,
               widths: Iterable[Sequence[int]] = (), seed: int = 0, nested: bool = True,
               depth: str | int | None = None) -> list[Candidate]:
    """Rule candidates, uniform granularities, ablation patterns, explicit widths and (with
    ``depth``, a granularity) :func:`depth_candidates` of that granularity, deduped.

    Ablation patterns re-order the widths of each mixed rule candidate, so every ablation point
    has a rule point of identical size to be compared with. Duplicates (same widths and heads)
    keep the first occurrence, in the order: uniform, rule, patterns, explicit, depth.
    """
    bad = [p for p in patterns if p not in PATTERNS]
    if bad:
        raise ValueError(f"unknown pattern(s) {bad}; choose from {list(PATTERNS)}")
    rule = rule_candidates(cfg)
    out = [_candidate(cfg, n, "uniform", cfg.ffn_widths(n), cfg.head_counts(n)) for n in cfg.names]
    if "rule" in patterns:
        out += rule
    rng = random.Random(seed)
    mixed = [lv for lv in (_levels(cfg, c.widths) for c in rule) if len(set(lv)) > 1]
    for pattern in patterns:
        if pattern != "rule":
            for levels in mixed:
                w = _levels_to_widths(cfg, _arrange(levels, pattern, rng))
                out.append(_candidate(cfg, describe(cfg, w), pattern, w))
    for w in widths:
        w = check_widths(cfg, w, nested=nested)
        out.append(_candidate(cfg, describe(cfg, w), "explicit", w))
    if depth is not None:
        out += depth_candidates(cfg, depth)
    return list(dict.fromkeys(out))  # equal widths and heads: the first one stays


# ----------------------------------------------------------------------------- costs
def static_cost(cfg: ModelConfig, sub: Submodel, seq_len: int) -> dict[str, int]:
    """Parameters (total, non-embedding) and forward FLOPs per token at context ``seq_len``."""
    return {"params": cfg.num_params(sub),
            "non_embedding_params": cfg.num_params(sub, embedding=False),
            "flops_per_token": cfg.flops_per_token(sub, seq_len)}
