"""MatViT: a nested vision Transformer encoder (arXiv 2310.07707, sec. 4.2) built from the LM's parts.

The image is cut into ``patch_size`` squares, each linearly embedded (a strided convolution);
a learned [CLS] token is prepended and absolute positions (learned, or fixed 2-D sin-cos) are
added. Then come the very same pre-norm :class:`~matformer.model.Block` s as the language model,
with bidirectional attention, and the same :class:`~matformer.model.NestedFFN`: a submodel is
a :class:`~matformer.config.Submodel` (or a spec of one), passed as
``forward(images, widths=...)``, exactly the LM's contract. The [CLS] token after the final norm is the image embedding (used for retrieval);
a linear head on it classifies.

:class:`ViTConfig` *is a* :class:`~matformer.config.ModelConfig` with image fields, so granularity
names, ``dense()`` baselines, Mix'n'Match candidates and ``extract()`` work unchanged; its
parameter and FLOP counts are the encoder's. :class:`VisionTask` plugs image classification into
the shared :class:`~matformer.train.Trainer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..block import Positions
from ..config import ModelConfig, SubmodelSpec
from ..model import Block, MatFormerLM, RMSNorm, autocast, eval_mode

POS_EMBEDS = ("learned", "sincos")
#: Fields a ViTConfig derives itself (kept for the dataclass machinery, not saved).
_DERIVED = ("vocab_size", "max_seq_len", "tie_embeddings", "rope_theta")
KIND = "vit"


@dataclass(frozen=True)
class ViTConfig(ModelConfig):
    """Shape of a nested ViT encoder + classifier. Every ModelConfig field keeps its meaning
    (``d_model``, ``n_layer``, ``n_head``, ``d_ff``, ``ratios``, ``names``, ``activation``,
    ``nest_heads`` ...); ``vocab_size`` mirrors ``num_classes``, ``max_seq_len`` is the patch count
    + 1 ([CLS]), embeddings are never tied and RoPE is not used.

    Attributes:
        image_size: Side of the (square) input images in pixels.
        patch_size: Side of a patch; must divide ``image_size``.
        channels: 1 (grayscale) or 3 (RGB).
        num_classes: Outputs of the classification head.
        pos_embed: ``learned`` (a parameter per position) or ``sincos`` (fixed 2-D sin-cos).
    """

    n_layer: int = 4
    n_head: int = 4
    d_model: int = 64
    d_ff: int | tuple[int, ...] = 256
    activation: str = "gelu"
    image_size: int = 8
    patch_size: int = 4
    channels: int = 1
    num_classes: int = 10
    pos_embed: str = "learned"

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ViTConfig.{name}={value!r} is invalid: must be a positive "
                                 "integer")
        if self.image_size % self.patch_size:
            raise ValueError(f"ViTConfig.patch_size={self.patch_size} must divide "
                             f"image_size={self.image_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"ViTConfig.channels={self.channels!r}: choose 1 or 3")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"ViTConfig.pos_embed={self.pos_embed!r}: choose one of {POS_EMBEDS}")
        if self.pos_embed == "sincos" and self.d_model % 4:
            raise ValueError(f"ViTConfig.d_model={self.d_model} must be divisible by 4 for "
                             "sincos positions")
        object.__setattr__(self, "vocab_size", self.num_classes)
        object.__setattr__(self, "max_seq_len", self.num_patches + 1)
        object.__setattr__(self, "tie_embeddings", False)
        super().__post_init__()

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def num_params(self, sub: SubmodelSpec = None, *, embedding: bool = True) -> int:
        """Parameters of a submodel; ``embedding=False`` counts the blocks and the final norm
        only (patch embedding, [CLS], positions and head excluded)."""
        body = super().num_params(sub, embedding=False)
        if not embedding:
            return body
        d = self.d_model
        patch = self.channels * self.patch_size ** 2 * d + d
        pos = (self.num_patches + 1) * d if self.pos_embed == "learned" else 0
        return body + patch + d + pos + d * self.num_classes + self.num_classes

    def flops_per_image(self, sub: SubmodelSpec = None) -> int:
        """Forward FLOPs (2 per multiply-add) of one image: patch embedding, blocks with full
        (bidirectional) attention over all tokens in the layers (and heads) that have it, head."""
        t, d = self.num_patches + 1, self.d_model
        sub = self.submodel(sub)
        block_mats = self.matrix_params(sub)
        patch = self.num_patches * self.channels * self.patch_size ** 2 * d
        attn = sum(2 * h * self.head_dim * t * t for h in sub.heads)  # QK^T and AV
        return 2 * (block_mats * t + patch + d * self.num_classes + attn)

    def flops_per_token(self, sub: SubmodelSpec = None, seq_len: int | None = None) -> int:
        """Per-token share of :meth:`flops_per_image` (``seq_len`` is ignored)."""
        return self.flops_per_image(sub) // (self.num_patches + 1)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in super().to_dict().items() if k not in _DERIVED}
        return {"kind": KIND, **out}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViTConfig:
        kind = data.get("kind", KIND)
        if kind != KIND:
            raise ValueError(f"config kind {kind!r} is not a vision config ({KIND!r})")
        return super().from_dict({k: v for k, v in data.items()
                                  if k not in ("kind", *_DERIVED)})


def _vit(d_model: int, n_layer: int, n_head: int, **kw: Any) -> dict[str, Any]:
    return dict(d_model=d_model, n_layer=n_layer, n_head=n_head, d_ff=4 * d_model, **kw)


#: ``vit-tiny`` for tests, ``vit-digits`` for the 8x8 digits, ``vit-small`` for image folders.
VIT_PRESETS: dict[str, dict[str, Any]] = {
    "vit-tiny": _vit(16, 2, 2, image_size=8, patch_size=4),
    "vit-digits": _vit(64, 4, 4, image_size=8, patch_size=4),
    "vit-small": _vit(128, 6, 4, image_size=32, patch_size=4, channels=3),
}


def vit_preset(name: str, **overrides: Any) -> ViTConfig:
    """A ViT preset; ``overrides`` replace any field (``num_classes``, ``image_size`` ...)."""
    if name not in VIT_PRESETS:
        raise ValueError(f"unknown vision preset {name!r}; choose one of {sorted(VIT_PRESETS)}")
    return ViTConfig(**{**VIT_PRESETS[name], **overrides})


def sincos_2d(grid: int, dim: int) -> Tensor:
    """Fixed 2-D sin-cos positions (grid*grid, dim): half the channels encode the row, half
    the column, each as sin/cos at geometric frequencies (MAE / "simple ViT" layout)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32),
                            torch.arange(grid, dtype=torch.float32), indexing="ij")
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angles = coord[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)


class MatViT(nn.Module):
    """Nested ViT: ``forward(images, widths=...)`` classifies with any submodel,
    ``embed(images, widths=...)`` returns its [CLS] embedding.

    Images are float (B, C, H, W) in [0, 1]. A dense (baseline or extracted) ViT is the same class
    with ``ratios=(1.0,)``.
    """

    # One definition of what a width / head spec means, shared with the language model.
    submodel = MatFormerLM.submodel
    num_params = MatFormerLM.num_params

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        if not isinstance(cfg, ViTConfig):
            raise ValueError(f"MatViT needs a ViTConfig, got {type(cfg).__name__}")
        self.config = cfg
        d, p = cfg.d_model, cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.channels, d, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.empty(1, 1, d))
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.empty(1, cfg.num_patches + 1, d))
        else:  # persistent, so meta-device loading and extract() copy it like a weight
            self.register_buffer("pos_embed", torch.empty(1, cfg.num_patches + 1, d))
        self.blocks = nn.ModuleList(Block(cfg, w, attention=i not in cfg.skip_attention)
                                    for i, w in enumerate(cfg.ffn_dims))
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.head = nn.Linear(d, cfg.num_classes)
        if not self.cls_token.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) weights, residual outputs scaled by 1/sqrt(2 n_layer), zero
        biases, unit norm gains; sincos positions computed."""
        cfg = self.config
        std = cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, std / math.sqrt(2 * cfg.n_layer))
            else:
                p.normal_(0.0, std)
        if cfg.pos_embed == "sincos":
            grid = cfg.image_size // cfg.patch_size
            pos = torch.cat([torch.zeros(1, cfg.d_model), sincos_2d(grid, cfg.d_model)])
            self.pos_embed.copy_(pos[None])

    def embed(self, images: Tensor, *, widths: SubmodelSpec = None) -> Tensor:
        """[CLS] embedding (B, d_model) of the submodel ``widths`` (after the final norm)."""
        cfg = self.config
        if images.dim() != 4 or tuple(images.shape[1:]) != cfg.image_shape:
            raise ValueError(f"images of shape {tuple(images.shape)} do not fit this model: "
                             f"expected (batch, {', '.join(map(str, cfg.image_shape))}) "
                             "(resize them, e.g. with the data loader's image_size)")
        sub = cfg.submodel(widths)
        x = self.patch_embed(images * 2.0 - 1.0).flatten(2).transpose(1, 2)  # (B, N, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.pos_embed.to(x.dtype)  # (B, N + 1, C)
        at = Positions(None, None, causal=False)  # every patch sees every other; no rotation
        for block, w, h in zip(self.blocks, sub.widths, sub.heads, strict=True):
            x = block(x, at, w, h)
        return self.norm(x[:, 0])  # (B, C)

    def forward(self, images: Tensor, *, widths: SubmodelSpec = None) -> Tensor:
        """Class logits (B, num_classes) of the submodel ``widths``."""
        return self.head(self.embed(images, widths=widths))


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_classifier(model: MatViT, images: Tensor, labels: Tensor, *,
                        widths: SubmodelSpec = None, batch_size: int = 256, precision: str = "fp32") -> dict[str, float]:
    """Mean cross-entropy (``loss``), top-1 ``accuracy`` and ``n`` of one submodel."""
    if len(labels) == 0:
        raise ValueError("no images to evaluate on")
    device = next(model.parameters()).device
    loss, correct = 0.0, 0
    with eval_mode(model):
        for i in range(0, len(labels), batch_size):
            x, y = images[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
            with autocast(precision, device):
                logits = model(x, widths=widths).float()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
    return {"loss": loss / len(labels), "accuracy": correct / len(labels), "n": len(labels)}


@torch.no_grad()
def embed_images(model: MatViT, images: Tensor, *, widths: SubmodelSpec = None,
                 batch_size: int = 256,
                 precision: str = "fp32") -> Tensor:
    """[CLS] embeddings (N, d_model) of ``images`` by one submodel, in fp32 on the CPU."""
    device = next(model.parameters()).device
    out = []
    with eval_mode(model):
        for i in range(0, len(images), batch_size):
            with autocast(precision, device):
                out.append(model.embed(images[i:i + batch_size].to(device),
                                       widths=widths).float().cpu())
    return torch.cat(out)
