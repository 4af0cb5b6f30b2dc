"""Sweeps over submodels: score and cost every candidate, Pareto fronts, picks under a budget.

One machinery for language models and ViTs. A sweep calls ``score(model, sub)`` (validation
loss for an LM, accuracy for a ViT) and ``cost(model, sub)`` (parameters, FLOPs) for every
candidate and baseline, then times them all together (:mod:`matformer.submodels.latency`). An
:class:`Objective` says which row column is minimised and which column each budget limits; the
two families differ only there. :func:`lm_sweep` and :func:`choose` are the language model's
ready-made glue; the ViT's lives in :mod:`matformer.vision.evaluate`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..config import Submodel
from .candidates import Candidate, span, static_cost
from .extract import heads_record
from .latency import Setup, lm_latency

log = logging.getLogger(__name__)

Row = dict[str, Any]


@dataclass(frozen=True)
class Objective:
    """What a sweep minimises (``loss``: a row column) and which column each budget limits."""

    loss: str
    budgets: Mapping[str, str]

    @property
    def costs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.budgets.values()))


LM_OBJECTIVE = Objective("val_loss", {"max_params": "params", "max_flops": "flops_per_token",
                                      "max_latency_ms": "prefill_ms",
                                      "max_decode_ms": "decode_ms"})
VIT_OBJECTIVE = Objective("error", {"max_params": "params", "max_flops": "flops_per_image",
                                    "max_latency_ms": "latency_ms"})


def sweep(model: nn.Module, cands: Sequence[Candidate],
          score: Callable[[nn.Module, Submodel | None], Row],
          cost: Callable[[nn.Module, Submodel | None], Row], *,
          objective: Objective, baselines: Sequence[tuple[str, nn.Module]] = (),
          timer: Callable[[Sequence[Setup]], list[Row]] | None = None,
          progress: bool = True) -> list[Row]:
    """One row per candidate, then one per baseline (pattern ``"baseline"``).

    ``score`` and ``cost`` are called as ``f(model, candidate)`` (``f(baseline, None)`` for a
    baseline: its full model). A row holds name, pattern, widths, heads (where they differ
    from the model's own), span, ``cost(...)``, ``score(...)`` and, with a ``timer``, the
    latency columns it returns (all setups timed in the same interleaved rounds). Candidates
    get ``pareto_<cost>`` flags; baselines are outside the fronts.
    """
    from tqdm.auto import tqdm

    cfg = model.config
    rows: list[Row] = []
    setups: list[Setup] = []
    bar = tqdm(cands, desc="mixnmatch", unit="submodel", disable=not progress)
    for c in bar:
        rows.append({"name": c.name, "pattern": c.pattern, "widths": list(c.widths),
                     "span": span(cfg, c.widths), **cost(model, c), **score(model, c)})
        if heads_record(model, c) is not None:  # nested heads, or attention skipped
            rows[-1]["heads"] = list(c.heads)
        setups.append((model, c))
        bar.set_postfix(name=c.name[:20], **{objective.loss: f"{rows[-1][objective.loss]:.4f}"})
    for name, bm in baselines:
        rows.append({"name": name, "pattern": "baseline", "widths": list(bm.config.ffn_dims),
                     "span": None, **cost(bm, None), **score(bm, None)})
        setups.append((bm, None))
    if timer is not None:
        log.info("measuring the latency of %d models", len(setups))
        for row, lat in zip(rows, timer(setups), strict=True):
            row.update(lat)
    mark_pareto(rows[: len(cands)], objective)
    return rows


def pareto_front(rows: Sequence[Row], cost: str, loss: str = "val_loss") -> list[int]:
    """Indices of rows no other row beats (cheaper-or-equal and lower loss), by cost."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i][cost], rows[i][loss]))
    front, best = [], math.inf
    for i in order:
        if rows[i][loss] < best:
            front.append(i)
            best = rows[i][loss]
    return front


def mark_pareto(rows: list[Row], objective: Objective = LM_OBJECTIVE) -> None:
    """Set ``pareto_<cost>`` flags for each of the objective's costs present in every row."""
    for cost in objective.costs:
        if rows and all(cost in r for r in rows):
            front = set(pareto_front(rows, cost, objective.loss))
            for i, r in enumerate(rows):
                r[f"pareto_{cost}"] = i in front


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 1e3 else f"{v:.4g}"


def select(rows: Sequence[Row], objective: Objective = LM_OBJECTIVE, **budgets: float | None
           ) -> Row:
    """The lowest-loss row within every given budget (fewest parameters on ties).

    When nothing fits, the ValueError names each budget that no row meets on its own with the
    smallest achievable value, or, when each is met by some row but never all together, the
    best that each of them allows.
    """
    unknown = sorted(set(budgets) - set(objective.budgets))
    if unknown:
        raise ValueError(f"unknown budget(s) {unknown}; use {sorted(objective.budgets)}")
    given = {k: v for k, v in budgets.items() if v is not None}
    for k, v in given.items():
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"{k}={v}: a budget must be a positive finite number")
        if any(objective.budgets[k] not in r for r in rows):
            raise ValueError(f"{k}: the sweep has no {objective.budgets[k]} column (latency "
                             "not measured?)")
    if not rows:
        raise ValueError("no submodels to choose from")
    col = objective.budgets
    fits = [r for r in rows if all(r[col[k]] <= v for k, v in given.items())]
    if fits:
        return min(fits, key=lambda r: (r[objective.loss], r["params"]))
    parts = []
    for k, v in given.items():
        smallest = min(rows, key=lambda r, c=col[k]: r[c])
        if smallest[col[k]] > v:
            parts.append(f"{k}={_fmt(v)} but the smallest achievable is "
                         f"{_fmt(smallest[col[k]])} ({smallest['name']})")
    if not parts:  # every budget is met by some row, just not by the same one
        parts = ["each budget is met by some submodel but none meets all of them together ("
                 + ", ".join(f"{k}={_fmt(v)}" for k, v in given.items()) + ")"]
    raise ValueError("no submodel fits the budget: " + "; ".join(parts))


# ----------------------------------------------------------------------------- language model
def lm_sweep(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]],
             cands: Sequence[Candidate], *, seq_len: int | None = None,
             precision: str = "fp32", latency: bool = True, prefill_len: int = 128,
             repeats: int = 7, threads: int | None = None, progress: bool = True,
             baselines: Sequence[tuple[str, nn.Module]] = ()) -> list[Row]:
    """Validation loss, parameters, FLOPs per token and (optionally) measured prefill/decode
    latency of every candidate submodel of a language model (and of dense ``baselines``)."""
    from ..metrics import evaluate_loss, perplexity

    seq_len = seq_len or model.config.max_seq_len

    def score(m: nn.Module, sub: Submodel | None) -> Row:
        loss = evaluate_loss(m, batches, widths=sub, precision=precision)
        return {"val_loss": loss, "perplexity": perplexity(loss)}

    def cost(m: nn.Module, sub: Submodel | None) -> Row:
        return static_cost(m.config, m.config.submodel(sub), seq_len)

    def timer(setups: Sequence[Setup]) -> list[Row]:
        return lm_latency(setups, prefill_len=prefill_len, repeats=repeats, threads=threads)

    return sweep(model, cands, score, cost, objective=LM_OBJECTIVE, baselines=baselines,
                 timer=timer if latency else None, progress=progress)


def choose(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]],
           cands: Sequence[Candidate], budgets: dict[str, float | None], *,
           seq_len: int | None = None, **sweep_kw: Any) -> Row:
    """Best candidate under ``budgets`` computed on the fly: static costs filter first, then
    only the candidates that fit are evaluated (latency measured only for a latency budget)."""
    cfg = model.config
    seq_len = seq_len or cfg.max_seq_len
    static = {k: v for k, v in budgets.items()
              if k in ("max_params", "max_flops") and v is not None}
    rows = [{"name": c.name, **static_cost(cfg, c, seq_len), "val_loss": 0.0}
            for c in cands]
    select(rows, **static)  # raises, naming the smallest achievable size, if nothing fits
    col = LM_OBJECTIVE.budgets
    fit = [c for c, r in zip(cands, rows, strict=True)
           if all(r[col[k]] <= v for k, v in static.items())]
    latency = any(budgets.get(k) is not None for k in ("max_latency_ms", "max_decode_ms"))
    return select(lm_sweep(model, batches, fit, seq_len=seq_len, latency=latency, **sweep_kw),
                  **budgets)
