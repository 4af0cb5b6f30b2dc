"""Reports of a Mix'n'Match sweep: the plot, a markdown table and a line/pattern analysis.

A sweep result is a dict with ``candidates`` (rows from :func:`matformer.mixnmatch.sweep`) and
optionally ``baselines`` (rows of independently trained dense models evaluated the same way).
Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import itertools
import json
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COLORS = {"rule": "tab:blue", "decreasing": "tab:orange", "inc-dec": "tab:green",
          "dec-inc": "tab:purple", "random": "tab:gray", "explicit": "tab:brown"}
AXES = (("non_embedding_params", "non-embedding parameters (M)", 1e-6),
        ("prefill_ms", "measured prefill latency (ms)", 1.0),
        ("decode_ms", "measured decode-step latency (ms)", 1.0))


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


def plot_sweep(result: dict[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Validation loss against parameters and measured latencies; Pareto front, S/M/L/XL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .mixnmatch import pareto_front

    rows, base = result["candidates"], result.get("baselines", [])
    axes_spec = [a for a in AXES if all(a[0] in r for r in rows)]
    fig, axes = plt.subplots(1, len(axes_spec), figsize=(6.2 * len(axes_spec), 5.2),
                             squeeze=False)
    for ax, (key, label, scale) in zip(axes[0], axes_spec, strict=True):
        for pattern, color in COLORS.items():
            for wide in (False, True) if pattern == "rule" else (None,):
                pts = [r for r in rows if r["pattern"] == pattern
                       and (wide is None or ((r.get("span") or 0) >= 2) == wide)]
                if not pts:
                    continue
                name = pattern if pattern != "rule" else (
                    "rule (least slope, span<=1)" if not wide else "rule (span>=2: gap fillers)")
                main = pattern == "rule"
                ax.scatter([r[key] * scale for r in pts], [r["val_loss"] for r in pts],
                           s=30 if main else 16, alpha=0.9 if main else 0.45, zorder=3,
                           facecolors="none" if wide else color, edgecolors=color, label=name)
        front = [rows[i] for i in pareto_front(rows, key)]
        ax.step([r[key] * scale for r in front], [r["val_loss"] for r in front], where="post",
                color="tab:red", lw=1.4, zorder=2, label="Pareto front")
        uni = _uniform(rows)  # joined in size order S -> XL, also on the latency axes
        ax.plot([r[key] * scale for r in uni], [r["val_loss"] for r in uni], "k--", lw=1,
                zorder=2, label="line joining S/M/L/XL")
        ax.scatter([r[key] * scale for r in uni], [r["val_loss"] for r in uni], s=110,
                   marker="s", color="black", zorder=4)
        for r in uni:
            ax.annotate(r["name"], (r[key] * scale, r["val_loss"]), xytext=(6, 6),
                        textcoords="offset points", fontsize=11, weight="bold")
        _baselines(ax, [r for r in base if key in r], rows, key, scale)
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=9)
    fig.suptitle(title or f"Mix'n'Match sweep: {result.get('checkpoint', '')}", fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _baselines(ax: Any, base: list[dict[str, Any]], rows: Sequence[dict[str, Any]], key: str,
               scale: float) -> None:
    """Overlay baselines; ones far outside the candidates' loss range are drawn at the top edge
    (marker ^, true loss in the label) so the Mix'n'Match detail stays readable."""
    if not base:
        return
    losses = [r["val_loss"] for r in rows]
    lo, hi = min(losses), max(losses)
    pad = 0.08 * (hi - lo or 1.0)
    far = [r for r in base if not lo - 2 * (hi - lo) - pad <= r["val_loss"] <= hi + 2 * (hi - lo)]
    if far:
        ax.set_ylim(min([lo] + [r["val_loss"] for r in base if r not in far]) - pad,
                    max([hi] + [r["val_loss"] for r in base if r not in far]) + 2.5 * pad)
    top = ax.get_ylim()[1]
    for r in base:
        off = r in far
        y = top - 0.6 * pad if off else r["val_loss"]
        ax.scatter([r[key] * scale], [y], s=90, marker="^" if off else "D", color="tab:olive",
                   edgecolors="black", zorder=5, clip_on=False,
                   label="independently trained baselines" if r is base[0] else None)
        short = r["name"].split(" (")[0].replace("baseline ", "base ")
        ax.annotate(short, (r[key] * scale, y), xytext=(4, -12), textcoords="offset points",
                    fontsize=8, color="olive")
    if far:
        ax.text(0.98, 0.6, "baselines off scale (loss):\n" + "\n".join(
                f"{r['name'].split(' (')[0]}: {r['val_loss']:.3f}" for r in far),
                transform=ax.transAxes, ha="right", va="top", fontsize=8, color="olive")


def _fmt_widths(w: Sequence[int]) -> str:
    return f"{w[0]} x{len(w)}" if len(set(w)) == 1 else ",".join(map(str, w))


def markdown_table(rows: Sequence[dict[str, Any]], *, patterns: Sequence[str] | None = None
                   ) -> str:
    """A markdown table of candidates, sorted by parameters (``*``: on the Pareto front)."""
    lat = all("prefill_ms" in r for r in rows)
    head = ["submodel", "pattern", "FFN widths", "non-emb params", "MFLOPs/token"]
    head += ["prefill ms", "decode ms"] if lat else []
    head += ["val loss", "Pareto (params/latency)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r["params"], r["val_loss"])):
        if patterns is not None and r["pattern"] not in patterns:
            continue
        cells = [r["name"], r["pattern"], _fmt_widths(r["widths"]),
                 f"{r['non_embedding_params'] / 1e6:.3f}M", f"{r['flops_per_token'] / 1e6:.1f}"]
        if lat:
            cells += [f"{r['prefill_ms']:.2f}", f"{r['decode_ms']:.3f}"]
        marks = ("P" if r.get("pareto_params") else "-") + "/" + (
            "L" if r.get("pareto_prefill_ms") else "-")
        cells += [f"{r['val_loss']:.4f}", marks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(result: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """Write ``mixnmatch.json``, ``mixnmatch.png`` and ``mixnmatch.md`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {**result, "analysis": line_analysis(result["candidates"])}
    paths = {"json": out / "mixnmatch.json", "plot": out / "mixnmatch.png",
             "markdown": out / "mixnmatch.md"}
    paths["json"].write_text(json.dumps(result, indent=1) + "\n")
    plot_sweep(result, paths["plot"])
    rows = result["candidates"] + result.get("baselines", [])
    text = [f"# Mix'n'Match sweep of {result.get('checkpoint', '?')}\n",
            f"![sweep]({paths['plot'].name})\n", markdown_table(rows), "\n## Analysis\n",
            "```json", json.dumps(result["analysis"], indent=1), "```\n"]
    paths["markdown"].write_text("\n".join(text))
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
    if "candidates" not in data:
        raise ValueError(f"{path} is not a mixnmatch.json (no 'candidates')")
    return data
