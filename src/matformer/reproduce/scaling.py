"""``--scaling``: the nested and the dense family at three model sizes, and a fit of
``Loss(N, D) = a (N D)^b + c`` for each (arXiv 2310.07707 sec. 6; N = non-embedding parameters
of a submodel, D = the tokens its weights were trained on: 4X for every MatLM granularity, X for
a baseline).

The sizes are the main shape (its seed-0 runs are reused) and two narrower ones
(:data:`~matformer.reproduce.plan.SCALING_SHAPES`); X grows with the width (X = base_steps x
d_model / the main d_model) so that both N and D vary.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .plan import SCALING_SHAPES, SHAPES, ReproConfig
from .stages import Stages


def scaled_config(rc: ReproConfig, shape: str) -> ReproConfig:
    """The main settings with another shape and X proportional to its width."""
    d = SHAPES[shape]["d_model"]
    steps = max(1, round(rc.base_steps * d / SHAPES[rc.shape]["d_model"]))
    return dataclasses.replace(rc, shape=shape, base_steps=steps, recipes=("sample",), seeds=1)


def fit(points: list[tuple[float, float, float]]) -> dict[str, Any]:
    """Least-squares fit of ``loss = a (N D)^b + c`` to (N, D, loss) points, with the
    irreducible loss ``c`` kept in [0, the lowest loss] (a loss floor is never negative).

    For each exponent b on a grid over (-1, 0), a and c follow from linear least squares (c
    clipped into its range, a refitted); the b with the smallest squared error wins.
    ``b_at_bound`` / ``c_at_bound`` say the best b or c lies at the edge of its range: the
    points show too little curvature to tell b and c apart, and the fit only describes the
    range it saw.
    """
    if len(points) < 3:
        raise ValueError(f"a fit of three parameters needs >= 3 points, got {len(points)}")
    ys = [loss for _, _, loss in points]
    c_max = min(ys)
    best: tuple[float, float, float, float] | None = None
    grid = [-i / 1000 for i in range(1, 1000)]
    for b in grid:
        xs = [(n * d) ** b for n, d, _ in points]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        if sxx == 0:
            continue
        a = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
        c = my - a * mx
        if not 0 <= c <= c_max:
            c = min(max(c, 0.0), c_max)
            a = sum(x * (y - c) for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)
        sse = sum((a * x + c - y) ** 2 for x, y in zip(xs, ys, strict=True))
        if best is None or sse < best[0]:
            best = (sse, a, b, c)
    if best is None:
        raise ValueError("the points do not vary in N x D: nothing to fit")
    sse, a, b, c = best
    resid = [a * (n * d) ** b + c - loss for n, d, loss in points]
    return {"a": a, "b": b, "c": c, "rmse": math.sqrt(sse / len(points)),
            "max_abs_residual": max(abs(r) for r in resid), "points": len(points),
            "b_at_bound": b in (grid[0], grid[-1]), "c_at_bound": c in (0.0, c_max)}


def scaling(rc: ReproConfig, out: Path, stages: Stages,
            train: Callable[..., dict[str, Any]], evaluate: Callable[..., dict[str, Any]]
            ) -> dict[str, Any]:
    """Train and evaluate the narrower sizes (each a stage), then fit both families.

    ``train(spec, rc, run_dir)`` and ``evaluate(rc, run_dir)`` are the caller's stage bodies
    (seed 0, the main data and tokenizer); the ``repro`` size reuses ``eval-seed0-*``.
    """
    points: dict[str, list[tuple[float, float, float]]] = {"matlm": [], "baseline": []}
    rows = []
    if rc.shape not in SCALING_SHAPES:
        raise ValueError(f"the scaling fit is defined for the shapes {sorted(SCALING_SHAPES)}, not "
                         f"{rc.shape!r}")
    shapes = SCALING_SHAPES[rc.shape]
    for shape in shapes:
        src = scaled_config(rc, shape)
        tokens = src.base_steps * src.batch_size * src.seq_len
        for spec in (s for s in src.runs() if s.kind in ("matlm", "baseline")):
            if shape == rc.shape:
                res = stages.get(f"eval-seed0-{spec.name}")
            else:
                d = out / "runs" / "scaling" / shape / spec.name
                stages.run(f"scaling-train-{shape}-{spec.name}",
                           lambda s=spec, c=src, d=d: train(s, c, d))
                res = stages.run(f"scaling-eval-{shape}-{spec.name}",
                                 lambda c=src, d=d: evaluate(c, d))
            fam = "matlm" if spec.kind == "matlm" else "baseline"
            d_tok = tokens * (4 if fam == "matlm" else 1)
            for g, r in res["losses"].items():
                points[fam].append((r["non_embedding_params"], d_tok, r["val_loss"]))
                rows.append({"shape": shape, "family": fam, "granularity": g,
                             "non_embedding_params": r["non_embedding_params"],
                             "tokens": d_tok, "val_loss": r["val_loss"]})
    return {"rows": rows, "fits": {fam: fit(p) for fam, p in points.items()},
            "shapes": list(shapes)}
