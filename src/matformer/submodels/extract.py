"""Extraction: any submodel of a nested model as a standalone dense model of the same class."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import checkpoint as ckpt
from ..config import Submodel, SubmodelSpec
from .candidates import describe

#: Why head-nested submodels keep every head's weights (see :func:`extract`).
HEADS_NOTE = ("attention keeps all {n} heads per layer, those past the first {h} zeroed (their "
              "output is exactly 0): the same function eval measures, at the full model's "
              "attention cost, since a config's head size is d_model / n_head")


@torch.no_grad()
def extract(model: nn.Module, widths: SubmodelSpec, *, name: str | None = None) -> nn.Module:
    """A standalone dense copy of a submodel: same class, weights copied.

    Its config lists one FFN width per layer (an int when uniform) with ``ratios=(1.0,)``, so
    ``extract(m, sub)(x) == m(x, widths=sub)`` and every tool (eval, generate,
    extract, export) works on it again. Works for any model class of this package whose blocks
    live in ``blocks.<i>`` with ``ffn`` and ``attn`` (the LM and
    :class:`~matformer.vision.MatViT`).

    Fewer heads than the model's (nested heads): the heads past each layer's
    count are kept but zeroed (query/key/value rows and output-projection columns), so they
    contribute exactly nothing. A dense config cannot hold fewer heads of the same size (its
    head size is ``d_model / n_head``), so attention costs what the full model's does.
    A layer given 0 heads (depth elasticity) has no attention at all: the config lists it in
    ``skip_attention`` and its attention weights are not copied.
    """
    cfg = model.config
    sub = cfg.submodel(widths)
    ws, hs = sub.widths, sub.heads
    if name is None:
        name = describe(cfg, ws)
        name = name if ":" not in name else "custom"
    d_ff: int | tuple[int, ...] = ws[0] if len(set(ws)) == 1 else ws
    skip = tuple(i for i, h in enumerate(hs) if h == 0)
    sub_cfg = cfg.replace(d_ff=d_ff, ratios=(1.0,), names=(name,), nest_heads=False,
                          skip_attention=skip)
    hd, group = cfg.head_dim, cfg.n_head // cfg.kv_heads
    state = {}
    for key, t in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "blocks" and int(parts[1]) in skip and parts[2] in ("attn", "attn_norm"):
            continue  # a skipped attention: nothing to store
        if parts[0] == "blocks" and parts[2] == "ffn":
            w = ws[int(parts[1])]
            t = t[:, :w] if parts[3] == "down_proj" else t[:w]
        t = t.clone(memory_format=torch.contiguous_format)  # a copy, never a view
        if parts[0] == "blocks" and parts[2] == "attn":
            h = hs[int(parts[1])]
            if parts[3] == "o_proj":
                t[:, h * hd:] = 0
            else:  # q rows of the dropped query heads, k/v rows of the kv heads only they read
                t[(h if parts[3] == "q_proj" else h // group) * hd:] = 0
        state[key] = t
    dense = ckpt.materialize(type(model), sub_cfg, state)
    dense.train(model.training)
    return dense


def save_extracted(path: str | Path, model: nn.Module, tokenizer: Any, widths: SubmodelSpec,
                   *, source: str | Path | None = None, name: str | None = None,
                   overwrite: bool = False) -> Path:
    """Extract a submodel and save it as a checkpoint whose manifest records its origin
    and keeps the source's data facts (so ``matformer eval`` on it needs no ``--data``).

    ``path`` is written atomically; an existing one is refused unless ``overwrite``, and it may
    never be ``source`` (or hold it).
    """
    chosen = model.config.submodel(widths)
    sub = extract(model, chosen, name=name)
    meta: dict[str, Any] = {}
    if source is not None:
        src = ckpt.read_metadata(source)
        meta = {k: src[k] for k in ("data", "val_fraction", "seq_len", "data_sha256", "classes")
                if k in src}
    meta["origin"] = {"source": str(ckpt.resolve(source).resolve()) if source else None,
                      "widths": list(sub.config.ffn_dims), "heads": heads_record(model, chosen),
                      "name": sub.config.names[0], "source_config": model.config.to_dict()}
    return ckpt.save_checkpoint(path, sub, tokenizer, metadata=meta, overwrite=overwrite,
                                sources=[source] if source is not None else [])


def heads_record(model: nn.Module, sub: Submodel) -> list[int] | None:
    """The heads to record beside an extracted or exported submodel: None when every layer
    keeps the model's own."""
    return None if sub.heads == tuple(model.config.attention_heads) else list(sub.heads)
