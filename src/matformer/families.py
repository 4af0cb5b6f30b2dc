"""The model families a checkpoint can hold, chosen by the ``kind`` its config records.

``lm`` (or no kind): :class:`~matformer.model.MatFormerLM` with its tokenizer; ``vit``:
:class:`~matformer.vision.MatViT`. The checkpoint format itself knows no family; this is the one
place that maps a kind to its classes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from .config import ModelConfig
from .model import MatFormerLM
from .tokenizer import Tokenizer
from .vision import MatViT, ViTConfig

FAMILIES: dict[str, tuple[type[ModelConfig], type[nn.Module]]] = {
    "lm": (ModelConfig, MatFormerLM), "vit": (ViTConfig, MatViT)}


def model_kind(path: str | Path) -> str:
    """``"lm"`` or ``"vit"``: the ``kind`` recorded in a checkpoint's config (default lm)."""
    kind = ckpt.read_config(path).get("kind", "lm")
    if not isinstance(kind, str) or kind not in FAMILIES:
        raise ckpt.CheckpointError(f"{ckpt.resolve(path) / ckpt.CONFIG}: unknown model kind "
                                   f"{kind!r} (known: {sorted(FAMILIES)})")
    return kind


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu",
                    check: bool = True) -> tuple[nn.Module, Tokenizer | None]:
    """Model and tokenizer of a checkpoint (or of a run directory's latest checkpoint).

    A language model comes with its tokenizer, a MatViT with None. Files are checked against
    the manifest's checksums first (``check``); the model is built on the meta device and the
    saved tensors assigned to it, so loading never allocates the weights twice.
    """
    kind = model_kind(path)
    config_cls, model_cls = FAMILIES[kind]
    model = ckpt.load_model(path, config_cls, model_cls, device=device, check=check)
    return model, (ckpt.load_tokenizer(path) if kind == "lm" else None)
