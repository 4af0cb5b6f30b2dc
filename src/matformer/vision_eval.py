"""MatViT evaluation beyond the training loss: adaptive retrieval, Mix'n'Match sweeps, plots.

**Adaptive retrieval** (PAPER.md sec. 7): the gallery (database) is embedded once by the large
encoder; each query is embedded by a cheaper one and matched to its nearest gallery embedding
(cosine similarity of the [CLS] embeddings). With a MatViT the query encoder is a submodel of the
gallery encoder, so their embedding spaces agree; an independently trained small ViT has a
space of its own, and its queries land next to unrelated gallery images.

**Mix'n'Match for ViTs**: the candidates of :mod:`matformer.mixnmatch` (the paper's rule and its
ablations), scored by held-out top-1 accuracy instead of loss, with parameters, FLOPs per image
and measured latency; the Pareto front comes from :func:`matformer.mixnmatch.pareto_front`.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import mixnmatch as mm
from .model import WidthSpec
from .vision import MatViT, embed_images, evaluate_classifier
from .vision_data import ImageDataset

log = logging.getLogger(__name__)

COSTS = ("params", "flops_per_image", "latency_ms")
COLORS = {"rule": "tab:blue", "decreasing": "tab:orange", "inc-dec": "tab:green",
          "dec-inc": "tab:purple", "random": "tab:gray", "explicit": "tab:brown"}


# ----------------------------------------------------------------------------- retrieval
def knn_retrieval(query: Tensor, query_y: Tensor, gallery: Tensor, gallery_y: Tensor,
                  ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Nearest-neighbour retrieval by cosine similarity.

    Returns ``top1_accuracy`` (the nearest gallery item has the query's class), ``recall@k``
    for each k (some item of the query's class among the k nearest), and ``chance`` (the 1-NN
    accuracy of embeddings unrelated to the class: sum over classes of the query share times
    the gallery share).
    """
    if query.dim() != 2 or gallery.dim() != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query {tuple(query.shape)} and gallery {tuple(gallery.shape)} "
                         "embeddings must be 2-D with the same width (same d_model)")
    if len(query) != len(query_y) or len(gallery) != len(gallery_y) or not len(gallery):
        raise ValueError("need one label per embedding and a non-empty gallery")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks={list(ks)}: need positive integers")
    kmax = min(max(ks), len(gallery))
    q, g = F.normalize(query.float(), dim=1), F.normalize(gallery.float(), dim=1)
    nearest = []
    for i in range(0, len(q), 1024):
        nearest.append((q[i:i + 1024] @ g.T).topk(kmax, dim=1).indices)
    labels = gallery_y[torch.cat(nearest)]  # (Q, kmax)
    hit = labels == query_y[:, None]
    out = {"top1_accuracy": hit[:, 0].float().mean().item()}
    for k in ks:
        out[f"recall@{k}"] = hit[:, :min(k, kmax)].any(1).float().mean().item()
    classes = torch.cat([query_y, gallery_y]).unique()
    out["chance"] = sum(((query_y == c).float().mean() * (gallery_y == c).float().mean()).item()
                        for c in classes)
    return out


def cost(model: MatViT, widths: WidthSpec = None) -> dict[str, int]:
    """Parameters (total, non-embedding) and forward FLOPs per image of a submodel."""
    ws = model.resolve_widths(widths)
    cfg = model.config
    return {"params": cfg.num_params(ws), "non_embedding_params": cfg.num_params(ws,
                                                                                  embedding=False),
            "flops_per_image": cfg.flops_per_image(ws)}


@torch.no_grad()
def measure_latency(setups: Sequence[tuple[MatViT, WidthSpec]], *, batch: int = 1,
                    repeats: int = 7, warmup: int = 1, threads: int | None = None
                    ) -> list[float]:
    """Median wall-clock ms of one forward of ``batch`` images per (model, widths) setup,
    in interleaved rounds (every setup once per round, so machine-load drift hits all)."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        times: list[list[float]] = [[] for _ in setups]
        inputs = [torch.rand(batch, *m.config.image_shape,
                             generator=torch.Generator().manual_seed(0)) for m, _ in setups]
        for m, _ in setups:
            m.eval()
        for r in range(warmup + repeats):
            for i, (m, w) in enumerate(setups):
                t0 = time.perf_counter()
                m(inputs[i], widths=w)
                if r >= warmup:
                    times[i].append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_num_threads(old)
    return [statistics.median(t) for t in times]


def retrieval(gallery_model: MatViT, queries: Sequence[tuple[str, MatViT, WidthSpec]],
              data: ImageDataset, *, gallery_widths: WidthSpec = None,
              ks: Sequence[int] = (1, 5, 10), same_encoder: bool = True,
              precision: str = "fp32") -> list[dict[str, Any]]:
    """Adaptive retrieval: the training images (gallery) embedded once by ``gallery_model``
    at ``gallery_widths``, the held-out images (queries) by each (name, model, widths).

    With ``same_encoder`` each row also reports ``same_encoder_top1``: the 1-NN accuracy when
    the query encoder embeds the gallery itself (what it can do on its own, at full gallery
    cost): the reference that shows what the cross-encoder setting loses.
    """
    gallery = embed_images(gallery_model, data.train_x, widths=gallery_widths,
                           precision=precision)
    rows = []
    for name, model, widths in queries:
        q = embed_images(model, data.val_x, widths=widths, precision=precision)
        row: dict[str, Any] = {"name": name, "widths": list(model.resolve_widths(widths)),
                               **cost(model, widths),
                               **knn_retrieval(q, data.val_y, gallery, data.train_y, ks)}
        if same_encoder:
            own = embed_images(model, data.train_x, widths=widths, precision=precision)
            row["same_encoder_top1"] = knn_retrieval(q, data.val_y, own, data.train_y,
                                                     (1,))["top1_accuracy"]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- sweep
def sweep(model: MatViT, data: ImageDataset, cands: Sequence[mm.Candidate], *,
          baselines: Sequence[tuple[str, MatViT]] = (), latency: bool = True,
          repeats: int = 7, threads: int | None = None, precision: str = "fp32"
          ) -> list[dict[str, Any]]:
    """Held-out accuracy, loss and costs of every candidate (then of each baseline, pattern
    ``"baseline"``); Pareto flags ``pareto_<cost>`` on the candidates (higher accuracy wins)."""
    cfg = model.config
    rows: list[dict[str, Any]] = []
    setups: list[tuple[MatViT, WidthSpec]] = []
    for c in cands:
        ev = evaluate_classifier(model, data.val_x, data.val_y, widths=c.widths,
                                 precision=precision)
        rows.append({"name": c.name, "pattern": c.pattern, "widths": list(c.widths),
                     "span": mm.span(cfg, c.widths), **cost(model, c.widths),
                     "accuracy": ev["accuracy"], "error": 1 - ev["accuracy"],
                     "val_loss": ev["loss"]})
        setups.append((model, c.widths))
    for name, bm in baselines:
        ev = evaluate_classifier(bm, data.val_x, data.val_y, precision=precision)
        rows.append({"name": name, "pattern": "baseline", "widths": list(bm.config.ffn_dims),
                     "span": None, **cost(bm), "accuracy": ev["accuracy"],
                     "error": 1 - ev["accuracy"], "val_loss": ev["loss"]})
        setups.append((bm, None))
    if latency:
        for row, ms in zip(rows, measure_latency(setups, repeats=repeats, threads=threads),
                           strict=True):
            row["latency_ms"] = ms
    cand_rows = rows[: len(cands)]
    for key in COSTS:
        if cand_rows and all(key in r for r in cand_rows):
            front = set(mm.pareto_front(cand_rows, key, loss="error"))
            for i, r in enumerate(cand_rows):
                r[f"pareto_{key}"] = i in front
    return rows


def select(rows: list[dict[str, Any]], max_params: float | None = None,
           max_flops: float | None = None, max_latency_ms: float | None = None
           ) -> dict[str, Any]:
    """The most accurate row within every given budget (fewest parameters on ties)."""
    limits = {"params": max_params, "flops_per_image": max_flops, "latency_ms": max_latency_ms}
    limits = {k: v for k, v in limits.items() if v is not None}
    if any(k not in r for r in rows for k in limits):
        raise ValueError("a latency budget needs measured latency (sweep with latency on)")
    fits = [r for r in rows if all(r[k] <= v for k, v in limits.items())]
    if not fits:
        smallest = {k: min(r[k] for r in rows) for k in limits}
        raise ValueError("no submodel fits the budget; the smallest achievable: "
                         + ", ".join(f"{k}={v:g}" for k, v in smallest.items()))
    return max(fits, key=lambda r: (r["accuracy"], -r["params"]))


# ----------------------------------------------------------------------------- reports
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


AXES = {"non_embedding_params": ("non-embedding parameters (K)", 1e-3),
        "flops_per_image": ("forward MFLOPs per image", 1e-6),
        "latency_ms": ("measured latency, batch 1 (ms)", 1.0)}


def _xy(pts: list[dict[str, Any]], key: str, scale: float, metric: str, yscale: float
        ) -> tuple[list[float], list[float]]:
    return [r[key] * scale for r in pts], [yscale * r[metric] for r in pts]


def plot_sweep(result: dict[str, Any], path: str | Path) -> Path:
    """Accuracy (top row) and held-out loss (bottom row; it still separates submodels when
    accuracy saturates) against parameters, FLOPs and latency: candidates by pattern, Pareto
    front, the uniform granularities joined, baselines as diamonds."""
    plt = _plt()
    rows, base = result["candidates"], result.get("baselines", [])
    keys = [k for k in AXES if rows and all(k in r for r in rows)]
    metrics = (("accuracy", "held-out top-1 accuracy (%)", 100.0, "error"),
               ("val_loss", "held-out loss (nats)", 1.0, "val_loss"))
    fig, axes = plt.subplots(2, len(keys), figsize=(5.6 * len(keys), 8.4), squeeze=False)
    for row_axes, (metric, ylabel, yscale, order) in zip(axes, metrics, strict=True):
        for ax, key in zip(row_axes, keys, strict=True):
            label, scale = AXES[key]
            spec = (key, scale, metric, yscale)
            for pattern, color in COLORS.items():
                pts = [r for r in rows if r["pattern"] == pattern]
                if pts:
                    ax.scatter(*_xy(pts, *spec), s=22, alpha=0.8, color=color, label=pattern,
                               zorder=3)
            cost_key = "params" if key == "non_embedding_params" else key
            front = [rows[i] for i in mm.pareto_front(rows, cost_key, loss=order)]
            ax.step(*_xy(front, *spec), where="post", color="tab:red", lw=1.2,
                    label="Pareto front", zorder=2)
            uni = sorted((r for r in rows if r["pattern"] == "uniform"),
                         key=lambda r: r["params"])
            ax.plot(*_xy(uni, *spec), "ks--", lw=1, ms=8, label="MatViT S/M/L/XL", zorder=4)
            for r, x, y in zip(uni, *_xy(uni, *spec), strict=True):
                ax.annotate(r["name"], (x, y), xytext=(5, 5), textcoords="offset points",
                            weight="bold")
            pts = sorted((r for r in base if key in r), key=lambda r, k=key: r[k])
            if pts:
                ax.plot(*_xy(pts, *spec), "D:", color="tab:olive", mec="black", ms=8,
                        label="baselines", zorder=5)
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=9)
    fig.suptitle(f"MatViT Mix'n'Match: {result.get('checkpoint', '')}", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_retrieval(result: dict[str, Any], path: str | Path, cost_key: str = "flops_per_image"
                   ) -> Path:
    """1-NN accuracy against the query encoder's cost, MatViT and baselines, chance line."""
    plt = _plt()
    label, scale = AXES[cost_key]
    fig, ax = plt.subplots(figsize=(7, 4.8))
    styles = {"matvit": ("o-", "tab:blue", "MatViT submodel -> MatViT XL gallery"),
              "matvit-mixnmatch": ("o", "tab:cyan", "MatViT Mix'n'Match -> XL gallery"),
              "baseline": ("D-", "tab:olive", "baseline ViT -> baseline XL gallery")}
    for group, (fmt, color, name) in styles.items():
        rows = sorted((r for r in result["rows"] if r["group"] == group),
                      key=lambda r: r[cost_key])
        if not rows:
            continue
        xs = [r[cost_key] * scale for r in rows]
        ax.plot(xs, [100 * r["top1_accuracy"] for r in rows], fmt, color=color, label=name,
                mec="black" if group == "baseline" else None, zorder=3, alpha=0.9)
        if group != "matvit-mixnmatch":
            for r, x in zip(rows, xs, strict=True):
                ax.annotate(r["name"].split()[-1], (x, 100 * r["top1_accuracy"]),
                            xytext=(4, 5), textcoords="offset points", fontsize=8)
        if group == "baseline" and all("same_encoder_top1" in r for r in rows):
            ax.plot(xs, [100 * r["same_encoder_top1"] for r in rows], "D:", color=color,
                    alpha=0.5, label="baseline ViT -> its own gallery (reference)")
    chance = result["rows"][0]["chance"]
    ax.axhline(100 * chance, color="gray", ls="--", lw=1, label=f"chance ({100 * chance:.0f}%)")
    ax.set_xlabel(f"query encoder: {label}")
    ax.set_ylabel("1-NN retrieval accuracy (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    ax.set_title("Adaptive retrieval: XL embeds the gallery once, cheaper encoders the queries",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_accuracy(families: dict[str, list[dict[str, Any]]], path: str | Path,
                  cost_key: str = "non_embedding_params") -> Path:
    """Per-granularity top-1 accuracy of several model families (MatViT runs, baselines)
    against a cost: one line per family, points labelled by granularity."""
    plt = _plt()
    label, scale = AXES[cost_key]
    fig, ax = plt.subplots(figsize=(7, 4.8))
    markers = iter(["o-", "s-", "D--", "^-", "v-", "P-"])
    for family, rows in families.items():
        rows = sorted(rows, key=lambda r: r[cost_key])
        xs = [r[cost_key] * scale for r in rows]
        ys = [100 * r["accuracy"] for r in rows]
        ax.plot(xs, ys, next(markers, "o-"), label=family, alpha=0.85)
        for r, x, y in zip(rows, xs, ys, strict=True):
            ax.annotate(r["name"], (x, y), xytext=(4, 4), textcoords="offset points", fontsize=8)
    ax.set_xlabel(label)
    ax.set_ylabel("held-out top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]
                   ) -> str:
    """A markdown table: ``columns`` are (key, header, format) with format ``pct``, ``k``
    (thousands), ``m`` (millions), ``ms`` or a Python format spec."""
    def cell(r: dict[str, Any], key: str, fmt: str) -> str:
        v = r.get(key)
        if v is None:
            return "-"
        if key == "widths":
            return f"{v[0]} x{len(v)}" if len(set(v)) == 1 else ",".join(map(str, v))
        return {"pct": lambda: f"{100 * v:.1f}%", "k": lambda: f"{v / 1e3:.1f}K",
                "m": lambda: f"{v / 1e6:.2f}", "ms": lambda: f"{v:.2f}"}.get(
                    fmt, lambda: format(v, fmt))()

    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, k, f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


SWEEP_COLUMNS = (("name", "submodel", "s"), ("pattern", "pattern", "s"),
                 ("widths", "FFN widths", "s"), ("non_embedding_params", "non-emb params", "k"),
                 ("flops_per_image", "MFLOPs/image", "m"), ("latency_ms", "latency ms", "ms"),
                 ("accuracy", "top-1", "pct"), ("val_loss", "loss", ".4f"))


def write_sweep_report(result: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """``mixnmatch.json``, ``mixnmatch.png`` and ``mixnmatch.md`` of a vision sweep in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "mixnmatch.json", "plot": out / "mixnmatch.png",
             "markdown": out / "mixnmatch.md"}
    paths["json"].write_text(json.dumps(result, indent=1) + "\n")
    plot_sweep(result, paths["plot"])
    rows = sorted(result["candidates"], key=lambda r: r["params"]) + result.get("baselines", [])
    paths["markdown"].write_text(f"# MatViT Mix'n'Match sweep of {result.get('checkpoint')}\n\n"
                                 f"![sweep]({paths['plot'].name})\n\n"
                                 + markdown_table(rows, SWEEP_COLUMNS))
    log.info("wrote %s", ", ".join(map(str, paths.values())))
    return paths
