"""What a training run does, step by step: its settings (:class:`TrainConfig`), the learning
rate of each step, the granularities each step trains and the optimizer, all pure functions of
(config, step) so that a resumed run ends with bit-identical weights. The modes:

- ``sample`` (the paper's recipe, arXiv 2310.07707 sec. 3.2): each optimizer step draws one granularity i
  with probability p_i and trains on its loss. The draw depends only on (seed, step), so it is
  the same on every rank and after a resume, and it is fixed across gradient-accumulation
  micro-batches of the step.
- ``joint``: every step runs all granularities on the same batch and minimises the weighted
  mean of their losses (weights normalised to sum to 1; Adam is insensitive to the scale).
- ``baseline``: an ordinary dense Transformer at one width. It is the same model class with a
  single granularity, trained by the same loop: the independently trained counterpart the
  paper compares with.

Self-distillation (``distill=W``, ``sample`` and ``joint`` modes): in the same step the full
model's predictions, detached, teach every smaller submodel trained in that step; its loss
becomes ``(1 - W) * CE + W * KL(full || submodel)``. The full model itself trains on CE alone.
This is the in-place distillation of newer elastic-training methods (e.g. "slimmable" and
once-for-all networks), not part of the MatFormer paper's recipe (arXiv 2310.07707 sec. 3.2).

Distillation from the original (``teacher="original"``, for a pretrained model made elastic):
a frozen copy of the starting weights teaches *every* granularity trained in a step, the full
one included, so the full model is pulled back towards what it knew while the smaller ones learn
to imitate it (the compression recipe of Minitron and Nemotron Elastic). ``train_only="ffn"``
trains only the FFN matrices, the part that becomes elastic; ``max_val_loss`` stops a run whose
full model's validation loss rises above it, keeping the last checkpoint that stayed below.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import distributed as dist
from .config import dataclass_from_dict

MODES = ("sample", "joint", "baseline")
TEACHERS = ("self", "original")
TRAIN_ONLY = ("all", "ffn")
MAX_SEED = 2**32 - 1  # seeds are in [0, MAX_SEED], as on the command line



@dataclass(frozen=True)
class TrainConfig:
    """How to train. Token budget = steps x batch_size x seq_len.

    Attributes:
        mode: ``sample`` | ``joint`` | ``baseline`` (see module docstring).
        data: Corpus spec (an embedded corpus name or a path/glob), recorded for eval/resume.
        val_fraction: Tail fraction of every document held out for validation.
        steps: Optimizer steps.
        batch_size: Sequences per optimizer step (global, over all ranks and micro-batches).
        grad_accum: Micro-batches per step; ``batch_size`` must divide evenly.
        seq_len: Context length of training windows; None uses the model's ``max_seq_len``.
        lr: Peak learning rate (AdamW), reached after ``warmup_steps`` linear warm-up.
        min_lr_ratio: Cosine decay ends at ``lr * min_lr_ratio``.
        weight_decay: Applied to matrices and embeddings, not to norms.
        grad_clip: Max global gradient norm (0 disables clipping).
        probs: Sampling probabilities per granularity (``sample`` mode); None is uniform.
        distill: Self-distillation weight W in [0, 1] (``sample``/``joint``): smaller
            submodels minimise ``(1 - W) CE + W KL(full || submodel)`` against the full model's
            detached predictions on the same batch; 0 is off.
        loss_weights: Per-granularity loss weights (``joint`` mode); None is equal.
        eval_interval / eval_batches: Validation of every granularity every N steps, on the first
            ``eval_batches`` validation batches.
        ckpt_interval / keep_checkpoints: Checkpoint every N steps, keeping the newest K.
        seed: Seeds init, batches and granularity draws.
        precision: ``bf16`` (autocast) or ``fp32`` (exact; what the equivalence tests use).
        parallel: ``ddp``, ``fsdp`` or ``none``: data parallelism under torchrun.
        compile: ``torch.compile`` the forward pass and loss (one graph per granularity, shapes
            static); the first step of each granularity pays the compile time.
        teacher: Who teaches when ``distill`` > 0: ``self`` (the full model of the same step
            teaches the smaller granularities) or ``original`` (a frozen copy of the starting
            weights teaches every granularity; see module docstring).
        train_only: ``all`` parameters, or only the ``ffn`` matrices (the rest frozen).
        max_val_loss: Stop (:class:`~matformer.train.LossGuardError`) when the full model's
            validation loss exceeds this; every checkpoint is validated first, so the last
            one kept stayed below it. None: no limit.
    """

    mode: str = "sample"
    data: str = "shakespeare"
    val_fraction: float = 0.1
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    seq_len: int | None = None
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    probs: tuple[float, ...] | None = None
    loss_weights: tuple[float, ...] | None = None
    distill: float = 0.0
    eval_interval: int = 100
    eval_batches: int = 20
    ckpt_interval: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    precision: str = "bf16"
    parallel: str = "ddp"
    compile: bool = False
    teacher: str = "self"
    train_only: str = "all"
    max_val_loss: float | None = None

    def __post_init__(self) -> None:
        for name in ("probs", "loss_weights", "betas"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(float(x) for x in v))
        for name, choices in (("parallel", dist.PARALLEL), ("mode", MODES),
                              ("teacher", TEACHERS), ("train_only", TRAIN_ONLY),
                              ("precision", ("bf16", "fp32"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: choose one of "
                                 f"{choices}")
        for name in ("steps", "batch_size", "grad_accum", "eval_interval", "eval_batches",
                     "ckpt_interval", "keep_checkpoints", "warmup_steps", "seed", "seq_len"):
            v = getattr(self, name)
            if v is None and name == "seq_len":
                continue
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"TrainConfig.{name}={v!r} must be an integer")
            low = 0 if name in ("warmup_steps", "seed") else 1
            if v < low:
                raise ValueError(f"TrainConfig.{name}={v} must be >= {low}")
        if self.seed > MAX_SEED:
            raise ValueError(f"TrainConfig.seed={self.seed} must be <= {MAX_SEED}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"TrainConfig.batch_size={self.batch_size} must be divisible by "
                             f"grad_accum={self.grad_accum}")
        # NaN fails every comparison, so each rule says what is allowed, not what is refused.
        for name, ok, allowed in (
                ("lr", self.lr > 0, "need lr > 0"),
                ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "need 0 <= min_lr_ratio <= 1"),
                ("weight_decay", self.weight_decay >= 0, "need weight_decay >= 0"),
                ("grad_clip", self.grad_clip >= 0, "need grad_clip >= 0 (0: off)"),
                ("val_fraction", 0 <= self.val_fraction < 1, "need 0 <= val_fraction < 1")):
            value = getattr(self, name)
            if not (ok and math.isfinite(value)):
                raise ValueError(f"TrainConfig.{name}={value!r}: {allowed}, a finite number")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"TrainConfig.betas={self.betas}: need two numbers in [0, 1)")
        for name in ("probs", "loss_weights"):
            v = getattr(self, name)
            if v is not None and not (all(p >= 0 and math.isfinite(p) for p in v) and sum(v) > 0):
                raise ValueError(f"TrainConfig.{name}={v}: need finite non-negative values, "
                                 "sum > 0")
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"TrainConfig.distill={self.distill} must be in [0, 1]")
        if self.distill and self.mode == "baseline":
            raise ValueError("TrainConfig.distill needs a nested model (mode sample or joint): "
                             "a baseline has no full model to learn from")
        if self.teacher == "original" and not self.distill:
            raise ValueError("TrainConfig.teacher='original' needs distill > 0 (the weight of "
                             "the teacher's loss)")
        if self.max_val_loss is not None and not (math.isfinite(self.max_val_loss)
                                                  and self.max_val_loss > 0):
            raise ValueError(f"TrainConfig.max_val_loss={self.max_val_loss!r}: need a finite "
                             "number > 0, or None")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return dataclass_from_dict(cls, data)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def _normalised(values: tuple[float, ...] | None, g: int, what: str) -> list[float]:
    if values is None:
        return [1.0 / g] * g
    if len(values) != g:
        raise ValueError(f"{what} has {len(values)} values; the model has {g} granularities")
    total = sum(values)
    return [v / total for v in values]


def check_plan(cfg: TrainConfig, names: tuple[str, ...]) -> None:
    """ValueError unless ``probs`` and ``loss_weights`` (when given) have one value per
    granularity of the model (``names``): checked before training, not at the first step."""
    _normalised(cfg.probs, len(names), "probs")
    _normalised(cfg.loss_weights, len(names), "loss_weights")


def granularities_for_step(step: int, cfg: TrainConfig, names: tuple[str, ...]
                           ) -> list[tuple[str, float]]:
    """(granularity, loss weight) pairs trained at ``step``; a pure function of (seed, step)."""
    if cfg.mode == "joint":
        return list(zip(names, _normalised(cfg.loss_weights, len(names), "loss_weights"),
                        strict=True))
    probs = torch.tensor(_normalised(cfg.probs, len(names), "probs"))
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    return [(names[int(torch.multinomial(probs, 1, generator=gen))], 1.0)]


def is_ffn_parameter(name: str) -> bool:
    """Whether the parameter ``name`` (of the unwrapped model) is an FFN matrix."""
    return ".ffn." in f".{name}"


def freeze(model: nn.Module, cfg: TrainConfig) -> None:
    """Freeze what ``cfg.train_only`` leaves out (before wrapping the model for data
    parallelism, which registers only the parameters that train)."""
    if cfg.train_only == "ffn":
        for name, p in model.named_parameters():
            p.requires_grad_(is_ffn_parameter(name))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (not on norm gains): two
    parameter groups, decayed then not (:func:`set_hyperparameters`)."""
    decay, no_decay = [], []
    for p in {id(p): p for p in model.parameters() if p.requires_grad}.values():
        (decay if p.dim() >= 2 else no_decay).append(p)
    # The fused kernel updates every tensor in one launch on CUDA; CPUs use the foreach path.
    fused = next(model.parameters()).device.type == "cuda"
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay}], lr=cfg.lr,
                            fused=fused or None)
    set_hyperparameters(opt, cfg)
    return opt


def set_hyperparameters(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """Weight decay and betas of ``cfg`` on a :func:`make_optimizer` optimizer (also after
    loading a saved state, which brings the saved values; the learning rate is set per step)."""
    decay, no_decay = optimizer.param_groups
    decay["weight_decay"], no_decay["weight_decay"] = cfg.weight_decay, 0.0
    for group in optimizer.param_groups:
        group["betas"] = tuple(cfg.betas)
