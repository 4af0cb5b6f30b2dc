"""Quality metrics of submodels, any widths, in place: validation loss and perplexity, and
consistency (hard: greedy next-token agreement; soft: KL) with the full model or any reference.
Metrics take a model and batches; where the batches come from is the caller's business."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from .config import SubmodelSpec
from .model import MatFormerLM, autocast, eval_mode, lm_loss


@torch.no_grad()
def evaluate_loss(model: MatFormerLM, batches: Iterable[tuple[Tensor, Tensor]], *,
                  widths: SubmodelSpec = None,
                  precision: str = "fp32") -> float:
    """Mean next-token loss (nats) of one submodel over ``batches``, token-weighted."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with eval_mode(model):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast(precision, device):
                logits = model(x, widths=widths)
            total += lm_loss(logits, y).item() * y.numel()
            count += y.numel()
    if count == 0:
        raise ValueError("no validation batches to evaluate on")
    return total / count


def evaluate_granularities(model: MatFormerLM, batches: Iterable[tuple[Tensor, Tensor]], *,
                           precision: str = "fp32") -> dict[str, float]:
    """Validation loss of every named granularity (heads nested too when the model does)."""
    cached = list(batches)  # iterate the same batches for every granularity
    return {sub.name: evaluate_loss(model, cached, widths=sub, precision=precision)
            for sub in model.config.granularities()}


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


# --------------------------------------------------------------------------- consistency
@torch.no_grad()
def evaluate_consistency(candidates: Mapping[str, tuple[MatFormerLM, SubmodelSpec]],
                         reference: tuple[MatFormerLM, SubmodelSpec], batches: Iterable[tuple[Tensor, Tensor]], *,
                         precision: str = "fp32") -> dict[str, dict[str, float]]:
    """How closely each candidate's next-token predictions follow the reference's (sec. 3.4).

    Every position of every validation window is one prefix. Per candidate:

    * ``hard``: fraction of prefixes where the candidate's greedy next token equals the
      reference's (the paper reports it in %);
    * ``soft_kl``: mean KL(reference || candidate) of the next-token distributions, in nats.

    Candidates and reference are (model, submodel) pairs: submodels of one model, or other
    models (independently trained baselines). The reference runs once per batch, whatever the
    number of candidates.
    """
    pairs = {name: (m, m.config.submodel(s)) for name, (m, s) in candidates.items()}
    ref_model, ref_sub = reference[0], reference[0].config.submodel(reference[1])
    models = {id(m): m for m, _ in (*pairs.values(), reference)}
    device = next(ref_model.parameters()).device
    sums = {name: [0.0, 0.0] for name in candidates}
    count = 0
    with eval_mode(*models.values()):
        for x, _ in batches:
            x = x.to(device)
            with autocast(precision, device):
                ref = ref_model(x, widths=ref_sub)
            ref_logp = ref.float().log_softmax(-1)
            ref_top = ref_logp.argmax(-1)
            for name, (m, sub) in pairs.items():
                with autocast(precision, device):
                    logits = m(x, widths=sub)
                logp = logits.float().log_softmax(-1)
                sums[name][0] += (logp.argmax(-1) == ref_top).sum().item()
                sums[name][1] += (ref_logp.exp() * (ref_logp - logp)).sum().item()
            count += x.numel()
    if count == 0:
        raise ValueError("no validation batches to measure consistency on")
    return {name: {"hard": s[0] / count, "soft_kl": s[1] / count, "tokens": count}
            for name, s in sums.items()}


def granularity_consistency(model: MatFormerLM, batches: Iterable[tuple[Tensor, Tensor]], *,
                            extra: Mapping[str, SubmodelSpec] | None = None,
                            precision: str = "fp32") -> dict[str, dict[str, float]]:
    """Consistency of every named granularity (and any ``extra`` widths) with the full model.

    With nested heads a granularity also uses its head count; ``extra`` widths use every head.
    The full model appears too (hard 1.0, soft 0.0), as a check.
    """
    candidates = {s.name: (model, s) for s in model.config.granularities()}
    candidates |= {name: (model, w) for name, w in (extra or {}).items()}
    return evaluate_consistency(candidates, (model, None), batches, precision=precision)
