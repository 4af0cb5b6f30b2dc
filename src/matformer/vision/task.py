"""Image classification as a :class:`~matformer.task.Task` for the shared training loop."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig, Submodel
from .data import ImageDataset, random_shift
from .model import MatViT, ViTConfig, evaluate_classifier


class VisionTask:
    """Image classification for the shared :class:`~matformer.train.Trainer` (the LMTask
    interface: ``batch``, ``loss``, ``evaluate``, ``check``, ``tokens_per_sample``,
    ``tokenizer``).

    Batches walk through epoch-wise permutations of the training images, so every image is seen
    once per epoch; the permutation and the random shifts of the augmentation depend only on
    (seed, step). Rank ``r`` of ``world_size`` gets rows ``r::world_size`` of the global batch.

    Args:
        data: The images.
        cfg: The model config (for the token count; ``check`` verifies the model fits).
        max_shift: Augmentation: random translation of up to this many pixels (0: none).
    """

    tokenizer = None

    def __init__(self, data: ImageDataset, cfg: ViTConfig, max_shift: int = 1) -> None:
        if max_shift < 0:
            raise ValueError(f"max_shift={max_shift} must be >= 0")
        self.data, self.max_shift = data, max_shift
        self.tokens_per_sample = cfg.num_patches + 1
        self._perm: tuple[int, Tensor] | None = None

    def check(self, model_cfg: ModelConfig) -> None:
        """Fail early when the images or labels do not fit the model."""
        if not isinstance(model_cfg, ViTConfig):
            raise ValueError(f"VisionTask needs a ViT model, got a {type(model_cfg).__name__}")
        if self.data.image_shape != model_cfg.image_shape:
            raise ValueError(f"images of shape {self.data.image_shape} do not fit the model's "
                             f"{model_cfg.image_shape} (C, H, W)")
        if self.data.num_classes > model_cfg.num_classes:
            raise ValueError(f"the data has {self.data.num_classes} classes but the model "
                             f"only {model_cfg.num_classes}")

    def _permutation(self, epoch: int, seed: int) -> Tensor:
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.data.train_y), generator=gen))
        return self._perm[1]

    def batch(self, step: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
              ) -> tuple[Tensor, Tensor]:
        """This rank's share (images, labels) of the global batch of ``step``."""
        if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(f"need 0 <= rank < world_size and batch_size divisible by "
                             f"world_size; got {rank=}, {world_size=}, {batch_size=}")
        n = len(self.data.train_y)
        pos = torch.arange(step * batch_size, (step + 1) * batch_size)
        idx = torch.empty_like(pos)
        for epoch in torch.unique(pos // n).tolist():
            sel = pos // n == epoch
            idx[sel] = self._permutation(epoch, seed)[pos[sel] % n]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step + 7_919)
        x = random_shift(self.data.train_x[idx], self.max_shift, gen)
        return x[rank::world_size], self.data.train_y[idx][rank::world_size]

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, sub: Submodel) -> Tensor:
        return F.cross_entropy(model(x, widths=sub).float(), y)

    def evaluate(self, model: MatViT, cfg: Any) -> dict[str, float]:
        """Held-out cross-entropy of every granularity (accuracy: ``matformer vision eval``)."""
        n = min(len(self.data.val_y), cfg.eval_batches * cfg.batch_size)
        x, y = self.data.val_x[:n], self.data.val_y[:n]
        return {sub.name: evaluate_classifier(model, x, y, widths=sub, batch_size=cfg.batch_size,
                                              precision=cfg.precision)["loss"]
                for sub in model.config.granularities()}
