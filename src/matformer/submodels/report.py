"""Reports of a Mix'n'Match sweep, language model or ViT: plot, markdown table, files.

A sweep result is a dict with ``candidates`` (rows from :func:`matformer.submodels.sweep.sweep`) and
optionally ``baselines`` (rows of independently trained dense models evaluated the same way).
What differs between the families (which metrics and costs to plot, which columns to print) is
passed in as :class:`Axis` and column lists. Plots use matplotlib's Agg backend.
"""

from __future__ import annotations

import itertools
import json
import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..outputs import make_dir, save_figure, write_text_atomic

log = logging.getLogger(__name__)

COLORS = {"rule": "tab:blue", "decreasing": "tab:orange", "inc-dec": "tab:green",
          "dec-inc": "tab:purple", "random": "tab:gray", "explicit": "tab:brown"}


@dataclass(frozen=True)
class Axis:
    """A plotted quantity: row column, axis label, scale; ``order`` is the column the Pareto
    front minimises along this axis (the cost itself on x, the loss or error on y)."""

    key: str
    label: str
    scale: float = 1.0
    order: str | None = None


LM_X = (Axis("non_embedding_params", "non-embedding parameters (M)", 1e-6, "params"),
        Axis("prefill_ms", "measured prefill latency (ms)"),
        Axis("decode_ms", "measured decode-step latency (ms)"))
LM_Y = (Axis("val_loss", "validation loss (nats/token)", 1.0, "val_loss"),)
LM_COLUMNS = (("name", "submodel", "s"), ("pattern", "pattern", "s"),
              ("widths", "FFN widths", "s"), ("non_embedding_params", "non-emb params", "m"),
              ("flops_per_token", "MFLOPs/token", "m1"), ("prefill_ms", "prefill ms", "ms"),
              ("decode_ms", "decode ms", ".3f"), ("val_loss", "val loss", ".4f"),
              ("pareto", "Pareto (params/latency)", "pareto"))


def _uniform(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted((r for r in rows if r["pattern"] == "uniform"), key=lambda r: r["params"])


def interpolate(points: Sequence[tuple[float, float]], x: float) -> float | None:
    """Piecewise-linear value at ``x`` of the polyline through ``points``; None outside it."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def line_analysis(rows: Sequence[dict[str, Any]], cost: str = "non_embedding_params"
                  ) -> dict[str, Any]:
    """Where the mixed submodels sit relative to the line joining the uniform granularities.

    ``delta`` = loss - the line's loss at the same cost: negative is below (better than) the
    line. Groups: each pattern, and the rule split into least-slope (span <= 1) and wider-span
    points. Also a paired comparison: every ablation point against the rule point with the same
    widths (same parameters), ``delta`` = pattern loss - rule loss.
    """
    line = [(r[cost], r["val_loss"]) for r in _uniform(rows)]
    groups: dict[str, list[float]] = {}
    for r in rows:
        if r["pattern"] == "uniform" or cost not in r:
            continue
        ref = interpolate(line, r[cost])
        if ref is None:
            continue
        keys = [r["pattern"]]
        if r["pattern"] == "rule":
            keys.append("rule, span<=1" if (r.get("span") or 0) <= 1 else "rule, span>=2")
        for k in keys:
            groups.setdefault(k, []).append(r["val_loss"] - ref)
    rule = {tuple(sorted(r["widths"])): r for r in rows if r["pattern"] == "rule"}
    paired: dict[str, list[float]] = {}
    for r in rows:
        base = rule.get(tuple(sorted(r["widths"])))
        if r["pattern"] not in ("rule", "uniform", "explicit") and base is not None:
            paired.setdefault(r["pattern"], []).append(r["val_loss"] - base["val_loss"])
    return {"cost": cost, "vs_line": {k: _summary(v) for k, v in groups.items()},
            "vs_rule_same_widths": {k: _summary(v) for k, v in paired.items()}}


def _summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "mean": statistics.fmean(values),
            "median": statistics.median(values), "max": max(values), "min": min(values),
            "fraction_below": sum(v < 0 for v in values) / len(values)}


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _points(ax: Any, rows: Sequence[dict[str, Any]], x: Axis, y: Axis, **kw: Any) -> None:
    """Scatter rows; latency axes get horizontal bars from the first to the third quartile."""
    xs, ys = [r[x.key] * x.scale for r in rows], [r[y.key] * y.scale for r in rows]
    if rows and all(f"{x.key}_q1" in r for r in rows):
        err = [[(r[x.key] - r[f"{x.key}_q1"]) * x.scale for r in rows],
               [(r[f"{x.key}_q3"] - r[x.key]) * x.scale for r in rows]]
        ax.errorbar(xs, ys, xerr=err, fmt="none", ecolor=kw.get("edgecolors", "gray"),
                    alpha=0.35, lw=0.8, zorder=2)
    ax.scatter(xs, ys, **kw)


def plot_sweep(result: dict[str, Any], path: str | Path, *, xs: Sequence[Axis] = LM_X,
               ys: Sequence[Axis] = LM_Y, title: str | None = None) -> Path:
    """Each metric in ``ys`` (rows of panels) against each cost in ``xs`` present in the rows
    (columns of panels): candidates by pattern (the rule split by span), the Pareto front, the
    uniform granularities joined, baselines overlaid."""
    plt = pyplot()
    rows, base = result["candidates"], result.get("baselines", [])
    xs = [a for a in xs if rows and all(a.key in r for r in rows)]
    fig, axes = plt.subplots(len(ys), len(xs), figsize=(max(6.4, 5.8 * len(xs)), 4.6 * len(ys)),
                             squeeze=False, layout="constrained")
    for row_axes, y in zip(axes, ys, strict=True):
        for ax, x in zip(row_axes, xs, strict=True):
            _panel(ax, rows, base, x, y)
    handles, labels = axes[0][0].get_legend_handles_labels()
    ncol = max(1, min(len(labels), int(fig.get_figwidth() // 2.4)))
    fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=9)
    fig.suptitle(title or f"Mix'n'Match sweep: {result.get('checkpoint', '')}", fontsize=11)
    path = Path(path)
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def _panel(ax: Any, rows: Sequence[dict[str, Any]], base: Sequence[dict[str, Any]], x: Axis,
           y: Axis) -> None:
    for pattern, color in COLORS.items():
        for wide in (False, True) if pattern == "rule" else (None,):
            pts = [r for r in rows if r["pattern"] == pattern
                   and (wide is None or ((r.get("span") or 0) >= 2) == wide)]
            if not pts:
                continue
            name = pattern if pattern != "rule" else (
                "rule (least slope, span<=1)" if not wide else "rule (span>=2: gap fillers)")
            main = pattern == "rule"
            _points(ax, pts, x, y, s=30 if main else 16, alpha=0.9 if main else 0.45, zorder=3,
                    facecolors="none" if wide else color, edgecolors=color, label=name)
    from .sweep import pareto_front

    front = [rows[i] for i in pareto_front(rows, x.order or x.key, y.order or y.key)]
    ax.step([r[x.key] * x.scale for r in front], [r[y.key] * y.scale for r in front],
            where="post", color="tab:red", lw=1.4, zorder=2, label="Pareto front")
    uni = _uniform(rows)  # joined in size order S -> XL, also on the latency axes
    ax.plot([r[x.key] * x.scale for r in uni], [r[y.key] * y.scale for r in uni], "k--", lw=1,
            zorder=2, label="line joining the uniform granularities")
    ax.scatter([r[x.key] * x.scale for r in uni], [r[y.key] * y.scale for r in uni], s=110,
               marker="s", color="black", zorder=4)
    for r in uni:
        ax.annotate(r["name"], (r[x.key] * x.scale, r[y.key] * y.scale), xytext=(6, 6),
                    textcoords="offset points", fontsize=11, weight="bold")
    _baselines(ax, [r for r in base if x.key in r], rows, x, y)
    ax.set_xlabel(x.label)
    ax.set_ylabel(y.label)
    ax.grid(alpha=0.3)
    ax.ticklabel_format(axis="y", useOffset=False)


def _baselines(ax: Any, base: list[dict[str, Any]], rows: Sequence[dict[str, Any]], x: Axis,
               y: Axis) -> None:
    """Overlay baselines; ones far outside the candidates' range are drawn at the top edge
    (marker ^, true value in the label) so the Mix'n'Match detail stays readable."""
    if not base:
        return
    vals = [r[y.key] * y.scale for r in rows]
    lo, hi = min(vals), max(vals)
    pad = 0.08 * (hi - lo or 1.0)
    far = [r for r in base
           if not lo - 2 * (hi - lo) - pad <= r[y.key] * y.scale <= hi + 2 * (hi - lo)]
    if far:
        near = [r[y.key] * y.scale for r in base if r not in far]
        ax.set_ylim(min([lo, *near]) - pad, max([hi, *near]) + 2.5 * pad)
    top = ax.get_ylim()[1]
    for r in base:
        off = r in far
        yv = top - 0.6 * pad if off else r[y.key] * y.scale
        ax.scatter([r[x.key] * x.scale], [yv], s=90, marker="^" if off else "D",
                   color="tab:olive", edgecolors="black", zorder=5, clip_on=False,
                   label="independently trained baselines" if r is base[0] else None)
        short = r["name"].split(" (")[0].replace("baseline ", "base ")
        ax.annotate(short, (r[x.key] * x.scale, yv), xytext=(4, -12),
                    textcoords="offset points", fontsize=8, color="olive")
    if far:
        ax.text(0.98, 0.6, "baselines off scale:\n" + "\n".join(
                f"{r['name'].split(' (')[0]}: {r[y.key] * y.scale:.3f}" for r in far),
                transform=ax.transAxes, ha="right", va="top", fontsize=8, color="olive")


def _cell(r: dict[str, Any], key: str, fmt: str) -> str:
    if fmt == "pareto":
        lat = r.get("pareto_prefill_ms", r.get("pareto_latency_ms"))
        return ("P" if r.get("pareto_params") else "-") + "/" + ("L" if lat else "-")
    v = r.get(key)
    if v is None:
        return "-"
    if key == "widths":
        return f"{v[0]} x{len(v)}" if len(set(v)) == 1 else ",".join(map(str, v))
    special = {"pct": lambda: f"{100 * v:.1f}%", "k": lambda: f"{v / 1e3:.1f}K",
               "m": lambda: f"{v / 1e6:.3f}M", "m1": lambda: f"{v / 1e6:.1f}",
               "ms": lambda: f"{v:.2f}"}
    return special[fmt]() if fmt in special else format(v, fmt)


def markdown_table(rows: Sequence[dict[str, Any]],
                   columns: Sequence[tuple[str, str, str]] = LM_COLUMNS) -> str:
    """A markdown table: ``columns`` are (key, header, format) with format ``pct``, ``k``
    (thousands), ``m`` (millions), ``ms``, ``pareto`` or a Python format spec. Columns no row
    has are left out (e.g. latency when it was not measured)."""
    cols = [c for c in columns if c[2] == "pareto" or any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r, k, f) for k, _, f in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(result: dict[str, Any], out: str | Path, *, xs: Sequence[Axis] = LM_X,
                 ys: Sequence[Axis] = LM_Y,
                 columns: Sequence[tuple[str, str, str]] = LM_COLUMNS,
                 title: str = "Mix'n'Match sweep") -> dict[str, Path]:
    """Write ``mixnmatch.json``, ``mixnmatch.png`` and ``mixnmatch.md`` into ``out``; an
    ``analysis`` entry of the result is appended to the markdown."""
    out = Path(out)
    make_dir(out)
    paths = {"json": out / "mixnmatch.json", "plot": out / "mixnmatch.png",
             "markdown": out / "mixnmatch.md"}
    write_text_atomic(paths["json"], json.dumps(result, indent=1) + "\n")
    plot_sweep(result, paths["plot"], xs=xs, ys=ys,
               title=f"{title}: {result.get('checkpoint', '')}")
    rows = sorted(result["candidates"], key=lambda r: (r["params"], r[ys[0].order or ys[0].key]))
    text = [f"# {title} of {result.get('checkpoint', '?')}\n", f"![sweep]({paths['plot'].name})\n",
            markdown_table(rows + result.get("baselines", []), columns)]
    if "analysis" in result:
        text += ["\n## Analysis\n", "```json", json.dumps(result["analysis"], indent=1), "```\n"]
    write_text_atomic(paths["markdown"], "\n".join(text))
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths


def load_sweep(path: str | Path) -> dict[str, Any]:
    """A stored sweep (``mixnmatch.json``, or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "mixnmatch.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read sweep {path}: {e}") from e
    if not isinstance(data, dict) or "candidates" not in data:
        raise ValueError(f"{path} is not a mixnmatch.json (no 'candidates')")
    return data
