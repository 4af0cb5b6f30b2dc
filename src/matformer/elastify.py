"""Make a pretrained dense model elastic: import it, order its FFN units, train its prefixes.

A dense Llama-family model (imported with :func:`matformer.submodels.hf.import_hf`) already is a
MatFormer with one granularity; its prefixes just were never trained to work alone. Two steps
fix that (the paper, arXiv 2310.07707 sec. 4.2.2, induces elasticity in a pretrained ViT by
fine-tuning it this way):

1. **Reorder** (optional): score each FFN hidden unit by its mean contribution on calibration
   text, ``E|h_i| * ||W_down[:, i]||``, and permute the units (rows of ``gate``/``up``, columns
   of ``down``) so the most important come first. A permutation of hidden units is
   function-preserving: the full model's logits do not change, but a prefix now keeps the units
   that matter most.
2. **Train** in ``sample`` mode (one granularity per step) on the user's data with the ordinary
   :class:`~matformer.train.Trainer`, so every granularity becomes good. This is continued
   training of a pretrained model, not training from scratch: a small learning rate, no weight
   decay towards zero, and optionally distillation from the frozen original (every granularity
   learns the original's predictions, which keeps the full model what it was), only the FFNs
   trained, and a guard that stops when the full model gets worse.

The run directory holds ordinary checkpoints, so every command (eval, mixnmatch, extract,
export-hf, generate ...) works on the result. ``elastify.json`` in it records the validation
loss of every granularity by naive prefix slicing, after reordering and after training, on the
training corpus and on a second corpus the run never trains on (forgetting shows there).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .block import attention, hidden, rms_norm
from .config import DEFAULT_NAMES, DEFAULT_RATIOS
from .metrics import evaluate_granularities
from .model import MatFormerLM, autocast, eval_mode
from .outputs import write_text_atomic

if TYPE_CHECKING:
    from .distributed import DistEnv
    from .recipe import TrainConfig

log = logging.getLogger(__name__)

REPORT = "elastify.json"

DEFAULT_CONTEXT = 512
"""Training windows when none is asked for: a pretrained model's own context (8,192 tokens for
SmolLM2) makes every step far longer on a CPU."""


def _add_hidden(model: MatFormerLM, idx: Tensor, sums: list[Tensor]) -> None:
    """The full model's forward on ``idx``, layer by layer through the model's own functions,
    adding each layer's absolute FFN hidden activations (summed over tokens) to ``sums``."""
    B, T = idx.shape
    sub, at = model.submodel(), model.positions(T, None, 0)
    x = model.embed(idx).reshape(B * T, -1)  # (B * T, C)
    for i, (block, w, h) in enumerate(zip(model.blocks, sub.widths, sub.heads, strict=True)):
        L = block.weights(w, h)
        if L.n_head:
            x = attention(x, L, B, T, at, i)
        act = hidden(rms_norm(x, L.ffn_norm, L.eps), L.gate, L.up, L.activation)
        sums[i].add_(act.float().abs().sum(0).double().cpu())
        x = x + act @ L.down


@torch.no_grad()
def unit_importance(model: MatFormerLM, batches: Iterable[tuple[Tensor, Tensor]], *,
                    precision: str = "fp32") -> list[Tensor]:
    """Per layer, each FFN unit's mean contribution ``E|h_i| * ||W_down[:, i]||`` (full model)."""
    sums = [torch.zeros(b.ffn.d_ff, dtype=torch.float64) for b in model.blocks]
    count = 0
    device = next(model.parameters()).device
    with eval_mode(model):
        for x, _ in batches:
            with autocast(precision, device):
                _add_hidden(model, x.to(device), sums)
            count += x.numel()
    if count == 0:
        raise ValueError("no calibration batches")
    return [(s / count).float() * b.ffn.down_proj.weight.detach().float().norm(dim=0).cpu()
            for s, b in zip(sums, model.blocks, strict=True)]


@torch.no_grad()
def permute_units(model: MatFormerLM, orders: Sequence[Tensor]) -> None:
    """Reorder every layer's FFN hidden units in place: unit ``orders[l][k]`` moves to ``k``.
    The model computes the same function (up to float rounding)."""
    for block, order in zip(model.blocks, orders, strict=True):
        ffn = block.ffn
        order = order.to(ffn.up_proj.weight.device)
        if sorted(order.tolist()) != list(range(ffn.d_ff)):
            raise ValueError(f"not a permutation of {ffn.d_ff} units")
        for lin in (ffn.gate_proj, ffn.up_proj):
            if lin is not None:
                lin.weight.copy_(lin.weight[order])
        ffn.down_proj.weight.copy_(ffn.down_proj.weight[:, order])


def reorder_by_importance(model: MatFormerLM, batches: Iterable[tuple[Tensor, Tensor]], *,
                          precision: str = "fp32") -> dict[str, Any]:
    """Put each layer's most important FFN units first (see :func:`unit_importance`).

    Returns facts: per layer, the share of total importance the first half of the units held
    before and after the reordering.
    """
    scores = unit_importance(model, batches, precision=precision)
    orders = [torch.argsort(s, descending=True, stable=True) for s in scores]
    permute_units(model, orders)

    def half(s: Tensor) -> float:
        return float(s[: len(s) // 2].sum() / s.sum().clamp_min(1e-30))

    return {"first_half_share_before": [round(half(s), 4) for s in scores],
            "first_half_share_after": [round(half(s[o]), 4) for s, o in
                                       zip(scores, orders, strict=True)]}


def make_elastic(model: MatFormerLM, ratios: Sequence[float] = DEFAULT_RATIOS,
                 names: Sequence[str] = DEFAULT_NAMES) -> MatFormerLM:
    """The same weights (copied) under a config with the given granularities: a new model."""
    cfg = model.config.replace(ratios=tuple(ratios), names=tuple(names), nest_heads=False)
    return materialize_copy(model, cfg)


def materialize_copy(model: MatFormerLM, cfg: Any = None) -> MatFormerLM:
    """A copy of ``model`` (weights cloned), under ``cfg`` when given."""
    from .checkpoint import materialize

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return materialize(MatFormerLM, cfg or model.config, state)


def losses(model: MatFormerLM, batches: Sequence[tuple[Tensor, Tensor]], *,
           precision: str) -> dict[str, float]:
    """Validation loss of every granularity of ``model`` (rounded for reports)."""
    return {k: round(v, 4) for k, v in
            evaluate_granularities(model, batches, precision=precision).items()}


def write_report(run_dir: str | Path, report: dict[str, Any]) -> Path:
    """Store the elastify facts beside the run's checkpoints."""
    path = Path(run_dir) / REPORT
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
    return path


def _other_corpus(spec: str, tokenizer: Any, cfg: TrainConfig, seq_len: int,
                  eval_batches: int) -> list[tuple[Tensor, Tensor]]:
    """Held-out batches of a second corpus (its validation split), on which forgetting shows."""
    from .data import prepare_data

    data = prepare_data(spec, tokenizer, val_fraction=cfg.val_fraction)
    data.check_context(seq_len)
    return list(data.val_batches(cfg.batch_size, seq_len, eval_batches))


def elastify(folder: str | Path, run_dir: str | Path, cfg: TrainConfig, *,
             reorder: bool = True,
             train: bool = True,
             calib_batches: int = 8, ratios: Sequence[float] = DEFAULT_RATIOS,
             names: Sequence[str] = DEFAULT_NAMES, eval_batches: int = 20,
             eval_data: str | None = None, max_loss_increase: float | None = None,
             progress: bool = True, env: DistEnv | None = None) -> dict[str, Any]:
    """Import the model ``folder`` (a Hugging Face folder or a ``.gguf`` file), optionally
    reorder its FFN units, give it the granularities ``ratios``/``names`` and train it per
    ``cfg`` (a TrainConfig; ``sample`` mode is the recipe) into ``run_dir``.

    Returns (and stores as ``elastify.json``) the validation loss of every granularity at each
    stage: ``naive`` prefix slicing, ``reordered`` (its full model is the original model),
    ``elastified``; with ``eval_data`` also ``eval_data.reordered`` / ``eval_data.elastified``
    on that second corpus, which the run never trains on (where forgetting shows). Losses are
    measured on the same held-out windows at every stage, in ``cfg.precision`` (every stage
    shares its rounding).

    ``cfg.teacher == "original"`` distils from the original: it is saved once as the run's
    ``teacher`` checkpoint (so a resumed run finds it). ``max_loss_increase`` (nats) stops
    training when the full model's validation loss rises that far above the original's
    (:class:`~matformer.train.LossGuardError`; the last good checkpoint is kept).

    ``train=False``: nothing is trained; the (reordered) model is saved as it is.
    """
    from . import checkpoint as ckpt
    from .data import prepare_data
    from .outputs import check_output
    from .submodels.hf import import_model
    from .task import LMTask

    # a new folder (or an empty one), never one holding the input or anything else
    run_dir = check_output(run_dir, sources=[folder])
    dense, tokenizer = import_model(folder)
    model = make_elastic(dense, ratios, names)
    del dense
    seq_len = min(cfg.seq_len or DEFAULT_CONTEXT, model.config.max_seq_len)
    cfg = dataclasses.replace(cfg, seq_len=seq_len)  # recorded, so a resume uses the same
    data = prepare_data(cfg.data, tokenizer, val_fraction=cfg.val_fraction)
    task = LMTask(data, tokenizer, seq_len)
    task.check(model.config)
    val = list(data.val_batches(cfg.batch_size, seq_len, eval_batches))
    other = (None if eval_data is None else
             _other_corpus(eval_data, tokenizer, cfg, seq_len, eval_batches))
    report: dict[str, Any] = {
        "source": str(folder), "data": cfg.data, "ratios": list(ratios), "names": list(names),
        "widths": {n: model.config.ffn_widths(n)[0] for n in names}, "seq_len": seq_len,
        "val_tokens": sum(y.numel() for _, y in val), "train_config": cfg.to_dict(),
        "eval_precision": cfg.precision}
    calib = ([data.train_batch(i, cfg.batch_size, seq_len, cfg.seed + 7919)
              for i in range(calib_batches)] if reorder else None)
    _before_training(model, calib, val, other, eval_data, cfg.precision, report)
    if train:
        _train(model, task, cfg, run_dir, val, other, max_loss_increase, env, progress, report)
    else:
        meta = {"data": cfg.data, "val_fraction": cfg.val_fraction, "seq_len": seq_len}
        report["checkpoint"] = str(ckpt.save_checkpoint(run_dir, model, tokenizer,
                                                         metadata=meta))
    write_report(run_dir, report)
    return report


Batches = list[tuple[Tensor, Tensor]]


def _before_training(model: MatFormerLM, calib: Batches | None, val: Batches,
                     other: Batches | None, other_spec: str | None, precision: str,
                     report: dict[str, Any]) -> None:
    """The ``naive`` losses, the reordering on ``calib`` (None: none) and the ``reordered``
    losses, on the training corpus and on the second one, into ``report``."""
    report["naive"] = losses(model, val, precision=precision)
    log.info("naive prefix slicing: %s", report["naive"])
    if calib is not None:
        report["reorder"] = {"calibration_tokens": sum(x.numel() for x, _ in calib),
                             **reorder_by_importance(model, calib)}
    report["reordered"] = losses(model, val, precision=precision)
    log.info("after reordering: %s", report["reordered"])
    if other is not None:
        report["eval_data"] = {"data": other_spec, "val_tokens": sum(y.numel() for _, y in other),
                               "reordered": losses(model, other, precision=precision)}


def _train(model: MatFormerLM, task: Any, cfg: TrainConfig, run_dir: Path, val: Batches,
           other: Batches | None, max_loss_increase: float | None, env: DistEnv | None,
           progress: bool, report: dict[str, Any]) -> None:
    """Train (the guard's limit measured as the trainer will measure it, the teacher saved
    first) and add the ``elastified`` losses to ``report``."""
    from . import checkpoint as ckpt
    from . import distributed as dist
    from .metrics import evaluate_loss
    from .runs import RunDir
    from .train import TEACHER_DIR, run

    if max_loss_increase is not None:
        start = evaluate_loss(model, val[: cfg.eval_batches], widths=model.config.names[-1],
                              precision=cfg.precision)
        cfg = dataclasses.replace(cfg, max_val_loss=start + max_loss_increase)
        report["max_val_loss"] = round(cfg.max_val_loss, 4)
    if cfg.teacher == "original":
        RunDir(run_dir).mark()  # the run's first file, before the teacher beside it
        ckpt.save_checkpoint(run_dir / TEACHER_DIR, model, task.tokenizer,
                             metadata={"role": "the frozen original that teaches"})
    trainer, _, _, seconds = run(model, task, cfg, run_dir, env or dist.DistEnv(),
                                 progress=progress)
    model = dist.unwrap(trainer.model)
    report |= {"steps": trainer.step,
               "train_tokens": trainer.step * cfg.batch_size * task.tokens_per_sample,
               "seconds": round(seconds, 1),
               "elastified": losses(model, val, precision=cfg.precision)}
    if other is not None:
        report["eval_data"]["elastified"] = losses(model, other, precision=cfg.precision)
    report["checkpoint"] = str(ckpt.resolve(run_dir))
