"""MatViT evaluation beyond the training loss: adaptive retrieval, Mix'n'Match sweeps, plots.

**Adaptive retrieval** (arXiv 2310.07707, sec. 4.2): the gallery (database) is embedded once by the large
encoder; each query is embedded by a cheaper one and matched to its nearest gallery embedding
(cosine similarity of the [CLS] embeddings). With a MatViT the query encoder is a submodel of the
gallery encoder, so their embedding spaces agree; an independently trained small ViT has a
space of its own, and its queries land next to unrelated gallery images.

**Mix'n'Match for ViTs**: the candidates of :mod:`matformer.submodels.candidates` (the paper's rule and its
ablations), scored by held-out top-1 accuracy instead of loss, with parameters, FLOPs per image
and measured latency, through the same sweep, Pareto front, selection and report as the LM.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import SubmodelSpec
from ..outputs import save_figure
from ..submodels.candidates import Candidate
from ..submodels.latency import Setup, forward_latency
from ..submodels.report import Axis, pyplot, write_report
from ..submodels.sweep import VIT_OBJECTIVE, sweep
from ..submodels.sweep import select as select_row
from .data import ImageDataset
from .model import MatViT, embed_images, evaluate_classifier

log = logging.getLogger(__name__)



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


def cost(model: MatViT, widths: SubmodelSpec = None) -> dict[str, int]:
    """Parameters (total, non-embedding) and forward FLOPs per image of a submodel."""
    cfg = model.config
    sub = cfg.submodel(widths)
    return {"params": cfg.num_params(sub), "non_embedding_params": cfg.num_params(sub, embedding=False),
            "flops_per_image": cfg.flops_per_image(sub)}


def retrieval(gallery_model: MatViT, queries: Sequence[tuple[str, MatViT, SubmodelSpec]],
              data: ImageDataset, *, gallery_widths: SubmodelSpec = None,
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
        row: dict[str, Any] = {"name": name, "widths": list(model.submodel(widths).widths),
                               **cost(model, widths),
                               **knn_retrieval(q, data.val_y, gallery, data.train_y, ks)}
        if same_encoder:
            own = embed_images(model, data.train_x, widths=widths, precision=precision)
            row["same_encoder_top1"] = knn_retrieval(q, data.val_y, own, data.train_y,
                                                     (1,))["top1_accuracy"]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- sweep
def vit_sweep(model: MatViT, data: ImageDataset, cands: Sequence[Candidate], *,
              baselines: Sequence[tuple[str, MatViT]] = (), latency: bool = True,
              repeats: int = 7, threads: int | None = None, precision: str = "fp32",
              progress: bool = True) -> list[dict[str, Any]]:
    """Held-out accuracy, error, loss, parameters, FLOPs per image and (optionally) measured
    batch-1 latency of every candidate (then of each baseline) by :func:`matformer.submodels.sweep.sweep`;
    the Pareto fronts minimise the error."""

    def score(m: MatViT, sub: SubmodelSpec) -> dict[str, float]:
        ev = evaluate_classifier(m, data.val_x, data.val_y, widths=sub, precision=precision)
        return {"accuracy": ev["accuracy"], "error": 1 - ev["accuracy"], "val_loss": ev["loss"]}

    def timer(setups: Sequence[Setup]) -> list[dict[str, float]]:
        inputs = [torch.rand(1, *m.config.image_shape,
                             generator=torch.Generator().manual_seed(0)) for m, _ in setups]
        return forward_latency(setups, inputs, repeats=repeats, threads=threads)

    return sweep(model, cands, score, cost, objective=VIT_OBJECTIVE, baselines=baselines,
                 timer=timer if latency else None, progress=progress)


def select(rows: Sequence[dict[str, Any]], **budgets: float | None) -> dict[str, Any]:
    """The most accurate row within every given budget (``max_params``, ``max_flops`` per
    image, ``max_latency_ms``), fewest parameters on ties."""
    return select_row(rows, VIT_OBJECTIVE, **budgets)


# ----------------------------------------------------------------------------- reports
AXES = {"non_embedding_params": ("non-embedding parameters (K)", 1e-3),
        "flops_per_image": ("forward MFLOPs per image", 1e-6),
        "latency_ms": ("measured latency, batch 1 (ms)", 1.0)}


def plot_retrieval(result: dict[str, Any], path: str | Path, cost_key: str = "flops_per_image"
                   ) -> Path:
    """1-NN accuracy against the query encoder's cost, MatViT and baselines, chance line."""
    plt = pyplot()
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
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_accuracy(families: dict[str, list[dict[str, Any]]], path: str | Path,
                  cost_key: str = "non_embedding_params") -> Path:
    """Per-granularity top-1 accuracy of several model families (MatViT runs, baselines)
    against a cost: one line per family, points labelled by granularity."""
    plt = pyplot()
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
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return Path(path)


SWEEP_X = (Axis("non_embedding_params", "non-embedding parameters (K)", 1e-3, "params"),
           Axis("flops_per_image", "forward MFLOPs per image", 1e-6),
           Axis("latency_ms", "measured latency, batch 1 (ms)"))
SWEEP_Y = (Axis("accuracy", "held-out top-1 accuracy (%)", 100.0, "error"),
           Axis("val_loss", "held-out loss (nats)", 1.0, "val_loss"))
SWEEP_COLUMNS = (("name", "submodel", "s"), ("pattern", "pattern", "s"),
                 ("widths", "FFN widths", "s"), ("non_embedding_params", "non-emb params", "k"),
                 ("flops_per_image", "MFLOPs/image", "m1"), ("latency_ms", "latency ms", "ms"),
                 ("accuracy", "top-1", "pct"), ("val_loss", "loss", ".4f"))


def write_sweep_report(result: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """``mixnmatch.json``, ``mixnmatch.png`` and ``mixnmatch.md`` of a vision sweep in ``out``."""
    return write_report(result, out, xs=SWEEP_X, ys=SWEEP_Y, columns=SWEEP_COLUMNS,
                        title="MatViT Mix'n'Match sweep")
