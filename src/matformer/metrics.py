"""Quality metrics of submodels, any widths, in place: validation loss and perplexity, and
consistency (hard: greedy next-token agreement; soft: KL) with the full model or any reference.
Metrics take a model and batches; where the batches come from is the caller's business."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .model import MatFormerLM, WidthSpec, autocast, eval_mode, lm_loss


@torch.no_grad()
def evaluate_loss(model: MatFormerLM, batches: Iterable[tuple[Tensor, Tensor]], *,
                  widths: WidthSpec = None, heads: str | int | tuple[int, ...] | None = None,
                  precision: str = "fp32") -> float:
    """Mean next-token loss (nats) of one submodel over ``batches``, token-weighted."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with eval_mode(model):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast(precision, device):
                logits = model(x, widths=widths, heads=heads)
            total += lm_loss(logits, y).item() * y.numel()
            count += y.numel()
    if count == 0:
        raise ValueError("no validation batches to evaluate on")
    return total / count


def evaluate_granularities(model: MatFormerLM, batches: Iterable[tuple[Tensor, Tensor]], *,
                           precision: str = "fp32") -> dict[str, float]:
    """Validation loss of every named granularity (heads nested too when the model does)."""
    cached = list(batches)  # iterate the same batches for every granularity
    cfg = model.config
    return {name: evaluate_loss(model, cached, widths=name,
                                heads=name if cfg.nest_heads else None, precision=precision)
            for name in cfg.names}


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


# --------------------------------------------------------------------------- consistency
@dataclass(frozen=True)
class Submodel:
    """One model plus the widths/heads that pick a submodel of it; calling it gives logits."""

    model: MatFormerLM
    widths: WidthSpec = None
    heads: str | int | tuple[int, ...] | None = None

    def __call__(self, idx: Tensor) -> Tensor:
        return self.model(idx, widths=self.widths, heads=self.heads)


@torch.no_grad()
def evaluate_consistency(candidates: Mapping[str, Submodel], reference: Submodel,
                         batches: Iterable[tuple[Tensor, Tensor]], *,
                         precision: str = "fp32") -> dict[str, dict[str, float]]:
    """How closely each candidate's next-token predictions follow the reference's (sec. 3.4).

    Every position of every validation window is one prefix. Per candidate:

    * ``hard``: fraction of prefixes where the candidate's greedy next token equals the
      reference's (the paper reports it in %);
    * ``soft_kl``: mean KL(reference || candidate) of the next-token distributions, in nats.

    The reference runs once per batch, whatever the number of candidates.
    """
    models = {id(s.model): s.model for s in (*candidates.values(), reference)}
    device = next(reference.model.parameters()).device
    sums = {name: [0.0, 0.0] for name in candidates}
    count = 0
    with eval_mode(*models.values()):
        for x, _ in batches:
            x = x.to(device)
            with autocast(precision, device):
                ref = reference(x)
            ref_logp = ref.float().log_softmax(-1)
            ref_top = ref_logp.argmax(-1)
            for name, sub in candidates.items():
                with autocast(precision, device):
                    logits = sub(x)
                logp = logits.float().log_softmax(-1)
                sums[name][0] += (logp.argmax(-1) == ref_top).sum().item()
                sums[name][1] += (ref_logp.exp() * (ref_logp - logp)).sum().item()
            count += x.numel()
    if count == 0:
        raise ValueError("no validation batches to measure consistency on")
    return {name: {"hard": s[0] / count, "soft_kl": s[1] / count, "tokens": count}
            for name, s in sums.items()}


def granularity_consistency(model: MatFormerLM, batches: Iterable[tuple[Tensor, Tensor]], *,
                            extra: Mapping[str, WidthSpec] | None = None,
                            precision: str = "fp32") -> dict[str, dict[str, float]]:
    """Consistency of every named granularity (and any ``extra`` widths) with the full model.

    With nested heads a granularity also uses its head count; ``extra`` widths use every head.
    The full model appears too (hard 1.0, soft 0.0), as a check.
    """
    cfg = model.config
    candidates = {name: Submodel(model, name, name if cfg.nest_heads else None)
                  for name in cfg.names}
    for name, widths in (extra or {}).items():
        candidates[name] = Submodel(model, model.resolve_widths(widths))
    return evaluate_consistency(candidates, Submodel(model), batches, precision=precision)
