"""The reproduction's plots: loss against parameters (MatLM, baselines, Mix'n'Match),
consistency, and the scaling fit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..outputs import save_figure
from .stages import GRANULARITIES


def plot_losses(res: dict[str, Any], sweep: dict[str, Any] | None, path: Path) -> Path:
    """Validation loss vs non-embedding parameters: each recipe's S..XL, the dense baselines
    (X tokens), the equal-tokens controls (4X) and the Mix'n'Match points of ``sample``."""
    from ..submodels.report import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 6.0), layout="constrained")
    if sweep:
        pts = [r for r in sweep["candidates"] if r["pattern"] != "uniform"]
        ax.scatter([r["non_embedding_params"] / 1e6 for r in pts],
                   [r["val_loss"] for r in pts], s=14, color="tab:gray", alpha=0.6, zorder=2,
                   label="Mix'n'Match submodels of sample (seed 0)")
        uni = sorted((r for r in sweep["candidates"] if r["pattern"] == "uniform"),
                     key=lambda r: r["params"])
        ax.plot([r["non_embedding_params"] / 1e6 for r in uni], [r["val_loss"] for r in uni],
                "x--", color="tab:gray", lw=0.8, zorder=2,
                label="sample, seed 0 alone: S..XL (what Mix'n'Match is compared with)")
    markers = {"sample": "o", "xl-up": "s", "distill": "^", "joint": "v"}
    for rec in res["vs_baseline"]:
        rows = res["losses"][rec]
        xs = [rows[g]["non_embedding_params"] / 1e6 for g in GRANULARITIES]
        ax.errorbar(xs, [rows[g]["mean"] for g in GRANULARITIES],
                    yerr=[rows[g]["sd"] for g in GRANULARITIES], marker=markers.get(rec, "o"),
                    ms=6, lw=1.3, capsize=3, zorder=3, label=f"MatLM {rec}")
    for name, style, label in (("base-{}", "D--", "dense baselines, X tokens each"),
                               ("base-{}-4x", "*:", "dense, 4X tokens (equal-tokens control)")):
        gs = [g for g in GRANULARITIES if name.format(g) in res["losses"]]
        rows = [res["losses"][name.format(g)][g] for g in gs]
        ax.errorbar([r["non_embedding_params"] / 1e6 for r in rows], [r["mean"] for r in rows],
                    yerr=[r["sd"] for r in rows], fmt=style, color="black", ms=7, capsize=3,
                    zorder=4, label=label)
    ax.set_xlabel("non-embedding parameters (M)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8)
    ax.set_title("Loss vs size: nested recipes, baselines, Mix'n'Match")
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def plot_consistency(res: dict[str, Any], path: Path) -> Path:
    """Hard (greedy agreement, %) and soft (KL) consistency of S/M/L with their XL."""
    from ..submodels.report import pyplot

    plt = pyplot()
    fams = list(res["consistency"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained")
    width = 0.8 / len(fams)
    for ax, metric, label, k in ((axes[0], "hard", "greedy agreement with XL (%)", 100),
                                 (axes[1], "soft_kl", "KL(XL || submodel) (nats)", 1)):
        for i, fam in enumerate(fams):
            rows = [res["consistency"][fam][g][metric] for g in GRANULARITIES[:-1]]
            ax.bar([j + i * width for j in range(3)], [k * r["mean"] for r in rows], width,
                   yerr=[k * r["sd"] for r in rows], capsize=2,
                   label=("MatLM " + fam) if fam != "baseline" else "dense baselines",
                   color="black" if fam == "baseline" else None)
        ax.set_xticks([j + width * (len(fams) - 1) / 2 for j in range(3)],
                      list(GRANULARITIES[:-1]))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.suptitle("Consistency with the XL model (arXiv 2310.07707 sec. 3.4)")
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def plot_scaling(study: dict[str, Any], path: Path) -> Path:
    """Loss against N x D for both families, with each family's fitted curve."""
    from ..submodels.report import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6), layout="constrained")
    for fam, color, label in (("baseline", "black", "dense baselines"),
                              ("matlm", "tab:blue", "MatLM (sample), every granularity")):
        rows = [r for r in study["rows"] if r["family"] == fam]
        nd = [r["non_embedding_params"] * r["tokens"] for r in rows]
        ax.scatter(nd, [r["val_loss"] for r in rows], color=color, s=22, label=label, zorder=3)
        f = study["fits"][fam]
        lo, hi = min(nd), max(nd)
        xs = [lo * (hi / lo) ** (i / 50) for i in range(51)]
        ax.plot(xs, [f["a"] * x ** f["b"] + f["c"] for x in xs], color=color, lw=1,
                label=f"fit: {f['a']:.3g} (ND)^{f['b']:.3f} + {f['c']:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters x training tokens (N D)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Scaling: Loss = a (N D)^b + c (arXiv 2310.07707 sec. 6)")
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path
