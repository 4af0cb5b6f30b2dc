"""Mix'n'Match: candidate submodels, their costs, a validation sweep, budgets and extraction.

A nested checkpoint holds every per-layer choice of granularity (4^l for 4 granularities and l
layers). PAPER.md sec. 3: the good ones are **non-decreasing with depth, with the least slope**.
:func:`rule_candidates` keeps, for every parameter count a non-decreasing choice reaches, the
one of least slope, so candidates fill the range S..XL as densely as the rule can. The other
orders the paper compared (decreasing, inc-dec, dec-inc, random) re-order the same widths, so
each ablation point has a rule point of exactly its size. Costs are parameters, FLOPs per token
and *measured* latency here (prefill and one decode step, median of interleaved repeats);
:func:`sweep` adds validation loss, :func:`select` picks the best under a budget, and
:func:`extract` copies any submodel into a standalone dense model of the same class.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations_with_replacement, groupby, pairwise
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import ModelConfig
from .model import MatFormerLM, WidthSpec

log = logging.getLogger(__name__)

#: Candidate orders: the paper's rule and the alternatives it compared (sec. 3.3, App. D).
PATTERNS = ("rule", "decreasing", "inc-dec", "dec-inc", "random")
#: Beyond this many non-decreasing choices the rule falls back to two adjacent granularities.
MAX_ENUMERATION = 200_000
BUDGET_KEYS = {"max_params": "params", "max_flops": "flops_per_token",
               "max_latency_ms": "prefill_ms", "max_decode_ms": "decode_ms"}


@dataclass(frozen=True)
class Candidate:
    """A submodel to evaluate: a name, the pattern that produced it, one FFN width per layer."""

    name: str
    pattern: str
    widths: tuple[int, ...]


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
                             f"(granularities {list(cfg.names)}); pass nested=False "
                             "(CLI: --any-width) to run an untrained prefix width anyway")
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
        out.append(Candidate(describe(cfg, widths), "rule", widths))
    return out


def _arrange(widths: tuple[int, ...], pattern: str, rng: random.Random) -> tuple[int, ...]:
    s = sorted(widths)
    if pattern == "decreasing":
        return tuple(reversed(s))
    if pattern == "inc-dec":  # a0 a2 a4 ... a5 a3 a1: rises to the middle, then falls
        return tuple(s[0::2] + s[1::2][::-1])
    if pattern == "dec-inc":
        return tuple(s[0::2][::-1] + s[1::2])
    if pattern == "random":
        out = list(widths)
        for _ in range(10):  # a shuffle equal to the sorted order says nothing new
            rng.shuffle(out)
            if out != s:
                break
        return tuple(out)
    raise ValueError(f"unknown pattern {pattern!r}; choose from {PATTERNS}")


def candidates(cfg: ModelConfig, patterns: Sequence[str] = ("rule",), *,
               widths: Iterable[Sequence[int]] = (), seed: int = 0, nested: bool = True
               ) -> list[Candidate]:
    """Rule candidates, uniform granularities, ablation patterns and explicit widths, deduped.

    Ablation patterns re-order the widths of each mixed rule candidate, so every ablation point
    has a rule point of identical size to be compared with. Duplicates (same widths) keep the
    first occurrence, in the order: uniform, rule, patterns, explicit.
    """
    bad = [p for p in patterns if p not in PATTERNS]
    if bad:
        raise ValueError(f"unknown pattern(s) {bad}; choose from {list(PATTERNS)}")
    rule = rule_candidates(cfg)
    out = [Candidate(n, "uniform", cfg.ffn_widths(n)) for n in cfg.names]
    if "rule" in patterns:
        out += rule
    rng = random.Random(seed)
    mixed = [c for c in rule if len(set(c.widths)) > 1]
    for pattern in patterns:
        if pattern != "rule":
            for c in mixed:
                w = _arrange(c.widths, pattern, rng)
                out.append(Candidate(describe(cfg, w), pattern, w))
    for w in widths:
        w = check_widths(cfg, w, nested=nested)
        out.append(Candidate(describe(cfg, w), "explicit", w))
    unique: dict[tuple[int, ...], Candidate] = {}
    for c in out:
        unique.setdefault(c.widths, c)
    return list(unique.values())


# ----------------------------------------------------------------------------- costs
def static_cost(cfg: ModelConfig, widths: Sequence[int], seq_len: int) -> dict[str, int]:
    """Parameters (total, non-embedding) and forward FLOPs per token at context ``seq_len``."""
    w = tuple(widths)
    return {"params": cfg.num_params(w), "non_embedding_params": cfg.num_params(w, embedding=False),
            "flops_per_token": cfg.flops_per_token(w, seq_len)}


def supports_cache(model: MatFormerLM) -> bool:
    return "cache" in inspect.signature(model.forward).parameters


@torch.no_grad()
def decode_step_fn(model: MatFormerLM, widths: WidthSpec, context: int = 64):
    """A zero-argument function running one decode step of ``widths`` (for timing).

    With a KV cache in the model's API (``forward(..., cache=, start_pos=)``), the cache is
    filled with ``context`` tokens once and each call runs one token at position ``context``
    (attention over the cache included). Without one, a call is a forward of a single token,
    the per-step work of cached decoding minus the attention over earlier tokens.
    """
    device = next(model.parameters()).device
    ctx = max(1, min(context, model.config.max_seq_len - 1))
    tok = torch.zeros(1, 1, dtype=torch.long, device=device)
    if supports_cache(model):
        from .cache import KVCache

        cache = KVCache.for_model(model, 1, ctx + 1)
        model(torch.zeros(1, ctx, dtype=torch.long, device=device), widths=widths, cache=cache,
              start_pos=0)
        return lambda: model(tok, widths=widths, cache=cache, start_pos=ctx)
    return lambda: model(tok, widths=widths)


def measure_latency(model: MatFormerLM, widths_list: Sequence[WidthSpec], **kw: Any
                    ) -> list[dict[str, float]]:
    """Median prefill and decode latency (ms) of each submodel of ``model``, batch size 1."""
    return measure_setups([(model, w) for w in widths_list], **kw)


@torch.no_grad()
def measure_setups(setups: Sequence[tuple[MatFormerLM, WidthSpec]], *, prefill_len: int = 128,
                   decode_steps: int = 8, repeats: int = 7, warmup: int = 1,
                   threads: int | None = None) -> list[dict[str, float]]:
    """Median (and min) wall-clock prefill and decode latency (ms) of (model, widths), batch 1.

    Rounds are interleaved (every setup once per round) so drift in machine load spreads over
    all setups. Prefill: one forward of ``prefill_len`` tokens; decode: the mean of
    ``decode_steps`` single-token steps (:func:`decode_step_fn`). ``threads`` sets torch's
    intra-op threads while timing (1 avoids waiting for busy cores on a shared CPU).
    """
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        inputs, steps = [], []
        for model, w in setups:
            model.eval()
            n = min(prefill_len, model.config.max_seq_len)
            inputs.append(torch.randint(0, model.config.vocab_size, (1, n),
                                        generator=torch.Generator().manual_seed(0)
                                        ).to(next(model.parameters()).device))
            steps.append(decode_step_fn(model, w))
        pre: list[list[float]] = [[] for _ in setups]
        dec: list[list[float]] = [[] for _ in setups]
        for r in range(warmup + repeats):
            for i, (model, w) in enumerate(setups):
                t0 = time.perf_counter()
                model(inputs[i], widths=w)
                t1 = time.perf_counter()
                for _ in range(decode_steps):
                    steps[i]()
                t2 = time.perf_counter()
                if r >= warmup:
                    pre[i].append((t1 - t0) * 1e3)
                    dec[i].append((t2 - t1) * 1e3 / decode_steps)
    finally:
        torch.set_num_threads(old_threads)
    return [{"prefill_ms": statistics.median(p), "decode_ms": statistics.median(d),
             "prefill_ms_min": min(p), "decode_ms_min": min(d)}
            for p, d in zip(pre, dec, strict=True)]


# ----------------------------------------------------------------------------- sweep
def sweep(model: MatFormerLM, batches: Sequence[tuple[Tensor, Tensor]],
          cands: Sequence[Candidate], *, seq_len: int | None = None, precision: str = "fp32",
          latency: bool = True, prefill_len: int = 128, repeats: int = 7,
          threads: int | None = None, progress: bool = True,
          baselines: Sequence[tuple[str, MatFormerLM]] = ()) -> list[dict[str, Any]]:
    """Validation loss, parameters, FLOPs and (optionally) measured latency of every candidate.

    ``baselines`` (name, dense model) are evaluated on the same batches and timed in the same
    interleaved rounds; their rows (pattern ``"baseline"``) follow the candidates' and are not
    part of the Pareto flags.
    """
    from tqdm.auto import tqdm

    from .metrics import evaluate_loss, perplexity

    cfg = model.config
    seq_len = seq_len or cfg.max_seq_len
    rows: list[dict[str, Any]] = []
    bar = tqdm(cands, desc="mixnmatch", unit="submodel", disable=not progress)
    for c in bar:
        loss = evaluate_loss(model, batches, widths=c.widths, precision=precision)
        rows.append({"name": c.name, "pattern": c.pattern, "widths": list(c.widths),
                     "span": span(cfg, c.widths), **static_cost(cfg, c.widths, seq_len),
                     "val_loss": loss, "perplexity": perplexity(loss)})
        bar.set_postfix(name=c.name[:20], loss=f"{loss:.4f}")
    setups: list[tuple[MatFormerLM, WidthSpec]] = [(model, c.widths) for c in cands]
    for name, bm in baselines:
        loss, dims = evaluate_loss(bm, batches, precision=precision), bm.config.ffn_dims
        rows.append({"name": name, "pattern": "baseline", "widths": list(dims), "span": None,
                     **static_cost(bm.config, dims, seq_len), "val_loss": loss,
                     "perplexity": perplexity(loss)})
        setups.append((bm, None))
    if latency:
        log.info("measuring latency of %d models (%d repeats)", len(setups), repeats)
        lats = measure_setups(setups, prefill_len=prefill_len, repeats=repeats, threads=threads)
        for row, lat in zip(rows, lats, strict=True):
            row.update(lat)
    mark_pareto(rows[: len(cands)])
    return rows


def pareto_front(rows: Sequence[dict[str, Any]], cost: str, loss: str = "val_loss"
                 ) -> list[int]:
    """Indices of rows no other row beats (cheaper-or-equal and lower loss), by cost."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i][cost], rows[i][loss]))
    front, best = [], math.inf
    for i in order:
        if rows[i][loss] < best:
            front.append(i)
            best = rows[i][loss]
    return front


def mark_pareto(rows: list[dict[str, Any]]) -> None:
    """Set ``pareto_<cost>`` flags for each cost present (params, flops, latencies)."""
    for cost in ("params", "flops_per_token", "prefill_ms", "decode_ms"):
        if rows and all(cost in r for r in rows):
            front = set(pareto_front(rows, cost))
            for i, r in enumerate(rows):
                r[f"pareto_{cost}"] = i in front


def select(rows: Sequence[dict[str, Any]], **budgets: float | None) -> dict[str, Any]:
    """The lowest-loss row within every given budget (``max_params``, ``max_flops``,
    ``max_latency_ms`` (prefill), ``max_decode_ms``). ValueError naming the smallest achievable
    value when nothing fits."""
    unknown = sorted(set(budgets) - set(BUDGET_KEYS))
    if unknown:
        raise ValueError(f"unknown budget(s) {unknown}; use {sorted(BUDGET_KEYS)}")
    given = {k: v for k, v in budgets.items() if v is not None}
    for k in given:
        if any(BUDGET_KEYS[k] not in r for r in rows):
            raise ValueError(f"{k}: the sweep has no {BUDGET_KEYS[k]} (latency not measured)")
    fits = [r for r in rows if all(r[BUDGET_KEYS[k]] <= v for k, v in given.items())]
    if not fits:
        smallest = {k: min(rows, key=lambda r, k=k: r[BUDGET_KEYS[k]]) for k in given}
        fmt = "{:,.0f}".format
        parts = [f"{k}={fmt(v) if v >= 1e3 else v} but the smallest achievable is "
                 f"{fmt(m) if (m := smallest[k][BUDGET_KEYS[k]]) >= 1e3 else round(m, 3)} "
                 f"({smallest[k]['name']})" for k, v in given.items()]
        raise ValueError("no submodel fits the budget: " + "; ".join(parts))
    return min(fits, key=lambda r: (r["val_loss"], r["params"]))


def choose(model: MatFormerLM, batches: Sequence[tuple[Tensor, Tensor]],
           cands: Sequence[Candidate], budgets: dict[str, float | None], *,
           seq_len: int | None = None, **sweep_kw: Any) -> dict[str, Any]:
    """Best candidate under ``budgets`` computed on the fly: static costs filter first, then
    only the candidates that fit are evaluated (latency measured only for a latency budget)."""
    cfg = model.config
    seq_len = seq_len or cfg.max_seq_len
    static = {k: v for k, v in budgets.items()
              if k in ("max_params", "max_flops") and v is not None}
    rows = [{"name": c.name, **static_cost(cfg, c.widths, seq_len), "val_loss": 0.0}
            for c in cands]
    select(rows, **static)  # raises, naming the smallest achievable size, if nothing fits
    fit = [c for c, r in zip(cands, rows, strict=True)
           if all(r[BUDGET_KEYS[k]] <= v for k, v in static.items())]
    latency = any(budgets.get(k) is not None for k in ("max_latency_ms", "max_decode_ms"))
    return select(sweep(model, batches, fit, seq_len=seq_len, latency=latency, **sweep_kw),
                  **budgets)


# ----------------------------------------------------------------------------- extract
@torch.no_grad()
def extract(model: MatFormerLM, widths: WidthSpec, *, name: str | None = None) -> MatFormerLM:
    """A standalone dense copy of the submodel ``widths``: same class, weights copied.

    Its config lists one FFN width per layer (an int when uniform) with ``ratios=(1.0,)``, so
    ``extract(m, w)(x) == m(x, widths=w)`` and every tool (eval, generate, extract, export)
    works on it again. Attention heads are all kept (head-nested submodels are not extracted).
    Works for any model class of this package whose FFNs live in ``blocks.<i>.ffn`` (the LM and
    :class:`~matformer.vision.MatViT`).
    """
    cfg = model.config
    ws = model.resolve_widths(widths)
    if name is None:
        name = describe(cfg, ws)
        name = name if ":" not in name else "custom"
    d_ff: int | tuple[int, ...] = ws[0] if len(set(ws)) == 1 else ws
    sub_cfg = cfg.replace(d_ff=d_ff, ratios=(1.0,), names=(name,), nest_heads=False)
    state = {}
    for key, t in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "blocks" and parts[2] == "ffn":
            w = ws[int(parts[1])]
            t = t[:, :w] if parts[3] == "down_proj" else t[:w]
        state[key] = t.clone(memory_format=torch.contiguous_format)  # a copy, never a view
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        sub = type(model)(sub_cfg)
    sub.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        sub.lm_head.weight = sub.embed.weight
    if any(v.is_meta for v in sub.state_dict().values()):
        raise RuntimeError("extract left parameters unset")
    if hasattr(sub, "reset_rope"):  # the LM's rotary tables were built on the meta device
        sub.reset_rope()
    sub.train(model.training)
    return sub


def save_extracted(path: str | Path, model: MatFormerLM, tokenizer: Any, widths: WidthSpec, *,
                   source: str | Path | None = None, name: str | None = None) -> Path:
    """Extract ``widths`` and save it as a checkpoint whose manifest records its origin and
    keeps the source's data spec (so ``matformer eval`` on it needs no ``--data``)."""
    from . import checkpoint as ckpt

    sub = extract(model, widths, name=name)
    meta: dict[str, Any] = {}
    if source is not None:
        src = ckpt.read_metadata(source)
        meta = {k: src[k] for k in ("data", "val_fraction", "seq_len") if k in src}
    meta["origin"] = {"source": str(ckpt.resolve(source).resolve()) if source else None,
                      "widths": list(sub.config.ffn_dims),
                      "name": sub.config.names[0], "source_config": model.config.to_dict()}
    return ckpt.save_checkpoint(path, sub, tokenizer, metadata=meta)


# ----------------------------------------------------------------------------- data
