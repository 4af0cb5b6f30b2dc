"""What each granularity of one checkpoint costs and gives: parameters, validation loss and
*measured* decode speed (tokens/s, batch 1, KV cache, one torch thread), plus a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..metrics import evaluate_loss
from ..model import MatFormerLM
from ..outputs import save_figure


def size_table(model: MatFormerLM, batches: list, *, repeats: int = 5, context: int = 64,
               threads: int = 1, precision: str = "fp32") -> list[dict[str, Any]]:
    """One row per named granularity: parameters, validation loss, decode ms/token and
    tokens/s (median of ``repeats`` interleaved rounds, :func:`~matformer.submodels.latency.
    lm_latency`), each relative to the full model."""
    from ..submodels.latency import lm_latency

    cfg = model.config
    subs = cfg.granularities()  # a head-nested granularity is measured on its own heads
    rows = [{"name": s.name, "widths": list(s.widths), "params": cfg.num_params(s),
             "non_embedding_params": cfg.num_params(s, embedding=False),
             "val_loss": evaluate_loss(model, batches, widths=s, precision=precision)}
            for s in subs]
    lat = lm_latency([(model, s) for s in subs],
                     prefill_len=context, decode_context=context, repeats=repeats,
                     threads=threads)
    for row, t in zip(rows, lat, strict=True):
        row["decode_ms"] = t["decode_ms"]
        row["decode_ms_q1"], row["decode_ms_q3"] = t["decode_ms_q1"], t["decode_ms_q3"]
        row["tokens_per_s"] = 1e3 / t["decode_ms"]
    full = rows[-1]
    for row in rows:
        row["params_vs_full"] = row["params"] / full["params"]
        row["speed_vs_full"] = row["tokens_per_s"] / full["tokens_per_s"]
        row["loss_vs_full"] = row["val_loss"] - full["val_loss"]
    return rows


def plot_sizes(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Validation loss against measured decode speed, one point per granularity."""
    from ..submodels.report import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    xs, ys = [r["tokens_per_s"] for r in rows], [r["val_loss"] for r in rows]
    ax.plot(xs, ys, "o-", color="tab:blue")
    for r in rows:
        ax.annotate(f"{r['name']} ({r['params'] / 1e6:.2f}M)", (r["tokens_per_s"], r["val_loss"]),
                    xytext=(6, 4), textcoords="offset points")
    ax.set_xlabel("measured decode speed (tokens/s, batch 1, 1 thread)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.set_title(title or "What each size costs and gives")
    path = Path(path)
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path
