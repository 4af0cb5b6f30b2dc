"""Extraction: any submodel of a nested model as a standalone dense model of the same class."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import checkpoint as ckpt
from ..model import WidthSpec
from .candidates import describe


@torch.no_grad()
def extract(model: nn.Module, widths: WidthSpec, *, name: str | None = None) -> nn.Module:
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
    sub = ckpt.materialize(type(model), sub_cfg, state)
    sub.train(model.training)
    return sub


def save_extracted(path: str | Path, model: nn.Module, tokenizer: Any, widths: WidthSpec, *,
                   source: str | Path | None = None, name: str | None = None) -> Path:
    """Extract ``widths`` and save it as a checkpoint whose manifest records its origin and
    keeps the source's data spec (so ``matformer eval`` on it needs no ``--data``)."""
    sub = extract(model, widths, name=name)
    meta: dict[str, Any] = {}
    if source is not None:
        src = ckpt.read_metadata(source)
        meta = {k: src[k] for k in ("data", "val_fraction", "seq_len") if k in src}
    meta["origin"] = {"source": str(ckpt.resolve(source).resolve()) if source else None,
                      "widths": list(sub.config.ffn_dims),
                      "name": sub.config.names[0], "source_config": model.config.to_dict()}
    return ckpt.save_checkpoint(path, sub, tokenizer, metadata=meta)
