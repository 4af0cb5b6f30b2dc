"""What the training loop needs to know about a problem: the :class:`Task` protocol, and
:class:`LMTask` for language models (next-token loss, optional self-distillation from the full
model). :class:`~matformer.vision.VisionTask` is the other implementation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from torch import Tensor, nn

from .config import ModelConfig, Submodel
from .data import TokenDataset
from .metrics import evaluate_granularities
from .model import MatFormerLM, lm_loss
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .recipe import TrainConfig


def kl_to_teacher(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean over positions of KL(teacher || student) of the next-token distributions, in
    nats, computed in fp32; the teacher is detached (no gradient flows into it)."""
    t = teacher_logits.detach().float().log_softmax(-1).flatten(0, -2)
    s = student_logits.float().log_softmax(-1).flatten(0, -2)
    return nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")


class Task(Protocol):
    """What the training loop needs to know about a problem; LMs and ViTs share the loop.

    A task supplies batches (a pure function of seed, step and rank, so resumes and ranks agree),
    the loss of one submodel on a batch, validation of every granularity, and the tokenizer saved
    beside the weights (None for images).
    """

    tokenizer: Tokenizer | None

    @property
    def tokens_per_sample(self) -> int: ...

    def check(self, model_cfg: ModelConfig) -> None: ...

    def batch(self, step: int, batch_size: int, seed: int, rank: int, world_size: int
              ) -> tuple[Tensor, Tensor]: ...

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, sub: Submodel) -> Tensor: ...

    def evaluate(self, model: nn.Module, cfg: TrainConfig) -> dict[str, float]: ...


class LMTask:
    """Next-token prediction on a token dataset (implements :class:`Task`)."""

    def __init__(self, data: TokenDataset, tokenizer: Tokenizer, seq_len: int) -> None:
        data.check_context(seq_len)
        self.data, self.tokenizer, self.seq_len = data, tokenizer, seq_len

    def check(self, model_cfg: ModelConfig) -> None:
        """Fail early when the data does not fit the model."""
        if self.seq_len > model_cfg.max_seq_len:
            raise ValueError(f"seq_len={self.seq_len} exceeds the model's max_seq_len="
                             f"{model_cfg.max_seq_len}")
        top = max(int(self.data.train.max()), int(self.data.val.max()))
        if top >= model_cfg.vocab_size:
            raise ValueError(f"the data holds token id {top} but the model's vocab_size is "
                             f"{model_cfg.vocab_size}")

    @property
    def tokens_per_sample(self) -> int:
        return self.seq_len

    def batch(self, step: int, batch_size: int, seed: int, rank: int, world_size: int
              ) -> tuple[Tensor, Tensor]:
        return self.data.train_batch(step, batch_size, self.seq_len, seed, rank=rank,
                                     world_size=world_size)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, sub: Submodel) -> Tensor:
        return lm_loss(model(x, widths=sub), y)

    def distill_loss(self, model: nn.Module, x: Tensor, y: Tensor, sub: Submodel,
                     teacher_logits: Tensor, weight: float) -> tuple[Tensor, Tensor]:
        """``((1 - weight) CE + weight KL(teacher || submodel), CE)`` of one submodel."""
        logits = model(x, widths=sub)
        ce = lm_loss(logits, y)
        return (1 - weight) * ce + weight * kl_to_teacher(logits, teacher_logits), ce

    def evaluate(self, model: MatFormerLM, cfg: TrainConfig) -> dict[str, float]:
        batches = self.data.val_batches(cfg.batch_size, self.seq_len, cfg.eval_batches)
        return evaluate_granularities(model, batches, precision=cfg.precision)
