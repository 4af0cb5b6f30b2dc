"""The training loop for nested models (``sample``, ``joint`` and ``baseline`` modes):
:class:`Trainer` runs steps, evaluates, logs and checkpoints; :func:`run` wraps it for torchrun.

The recipe (modes, learning-rate schedule, granularity plan, optimizer) is in
:mod:`matformer.recipe`; this module runs it.

Everything a step needs (batch, granularity, learning rate) is a function of the step number
and the seed, so a run resumed from a checkpoint ends with bit-identical weights.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import distributed as dist
from .model import autocast
from .recipe import (
    TrainConfig,
    check_plan,
    freeze,
    granularities_for_step,
    lr_at,
    make_optimizer,
    set_hyperparameters,
)
from .runs import RunDir, check_same_data, data_facts
from .task import Task

log = logging.getLogger(__name__)


class NonFiniteError(ValueError):
    """Training diverged: a loss, the gradient norm or a weight is NaN or infinite."""


class LossGuardError(ValueError):
    """The full model's validation loss rose above ``TrainConfig.max_val_loss``."""


#: Where a run that distils from the original keeps the frozen teacher (a checkpoint).
TEACHER_DIR = "teacher"


class Trainer:
    """Owns a model, its optimizer and a run directory; ``fit()`` trains to ``cfg.steps``.

    Args:
        model: The model, already wrapped for data parallelism if ``env`` is distributed
            (``distributed.wrap``); its unwrapped module carries ``config``.
        task: Batches, loss and evaluation (``LMTask`` for language models, ``VisionTask``).
        cfg: Training configuration.
        run_dir: Where checkpoints, ``metrics.jsonl`` and ``train_config.json`` go.
        env: This process's rank and device (default: one process on the model's device).
        progress: Show a progress bar (rank 0 only).
        on_step: Optional callback ``(step, record)`` after every optimizer step.
        teacher: The frozen model that teaches every granularity when ``cfg.teacher`` is
            ``original`` (on this process's device; never trained).
    """

    def __init__(self, model: nn.Module, task: Task, cfg: TrainConfig, run_dir: str | Path,
                 *, env: dist.DistEnv | None = None, progress: bool = True,
                 on_step: Callable[[int, dict], None] | None = None,
                 teacher: nn.Module | None = None) -> None:
        self.model, self.raw = model, dist.unwrap(model)
        self.task, self.cfg = task, cfg
        if (teacher is None) != (cfg.teacher != "original"):
            raise ValueError("a teacher model is needed exactly when TrainConfig.teacher is "
                             f"'original' (it is {cfg.teacher!r})")
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        freeze(self.raw, cfg)
        self.run_dir = Path(run_dir)
        self.run = RunDir(self.run_dir)
        mcfg = self.raw.config
        task.check(mcfg)
        self.env = env or dist.DistEnv(device=next(self.raw.parameters()).device)
        if cfg.batch_size % (self.env.world_size * cfg.grad_accum):
            raise ValueError(f"batch_size={cfg.batch_size} must be divisible by world size "
                             f"{self.env.world_size} x grad_accum={cfg.grad_accum}")
        self.names = mcfg.names
        check_plan(cfg, self.names)
        if cfg.distill and not hasattr(task, "distill_loss"):
            raise ValueError(f"TrainConfig.distill: {type(task).__name__} has no distillation "
                             "loss (language models only)")
        self.optimizer = make_optimizer(self.model, cfg)
        compiled = (lambda fn: torch.compile(fn, dynamic=False)) if cfg.compile else (lambda fn: fn)
        self._loss = compiled(task.loss)
        self._distill_loss = compiled(task.distill_loss) if cfg.distill else None
        self.step = 0
        #: The record of a step taken whose evaluation, metrics line or checkpoint did not
        #: finish (an exception or Ctrl-C in between); the next fit() finishes it first.
        self._pending: dict[str, Any] | None = None
        self.progress, self.on_step = progress, on_step

    # ----------------------------------------------------------------- state
    def save(self) -> None:
        """Checkpoint weights and optimizer, consolidated (a collective: every rank calls it).

        Weights that are no longer finite are never saved: NonFiniteError instead, on every
        rank, and the previous checkpoint stays ``latest``."""
        self._check_finite_weights()
        optim = dist.full_optimizer_state(self.model, self.optimizer)
        weights = dist.full_model_state(self.model) if self.env.distributed else None
        if not self.env.is_main:
            return
        model = self.raw
        if weights is not None:  # sharded or replicated: save a plain CPU copy
            model = type(self.raw)(self.raw.config)
            model.load_state_dict(weights)
        state = {"step": self.step, "optimizer": optim,
                 "train_config": json.dumps(self.cfg.to_dict())}
        meta = {"data": self.cfg.data, "val_fraction": self.cfg.val_fraction,
                "seq_len": self.task.tokens_per_sample, "step": self.step,
                **data_facts(self.task)}
        self.run.save_checkpoint(self.step, model, self.task.tokenizer, state,
                                 keep=self.cfg.keep_checkpoints, metadata=meta)

    def resume(self) -> None:
        """Load the latest checkpoint of ``run_dir``; works on any number of ranks."""
        path = ckpt.resolve(self.run_dir)
        model = ckpt.load_model(path, type(self.raw.config), type(self.raw))
        if model.config != self.raw.config:
            raise ckpt.CheckpointError(f"{path} holds a different model config than this run")
        dist.load_full_model_state(self.model, model.state_dict())
        check_same_data(ckpt.read_metadata(path), data_facts(self.task), str(path))
        state = ckpt.load_train_state(path)
        if "optimizer" not in state:
            raise ckpt.CheckpointError(f"{path / ckpt.TRAIN_STATE} holds no optimizer state")
        try:
            dist.load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        except (RuntimeError, TypeError, AttributeError, KeyError, ValueError, IndexError) as e:
            raise ckpt.CheckpointError(f"{path / ckpt.TRAIN_STATE}: not an optimizer state of "
                                       f"this model ({type(e).__name__}: {e})") from e
        # this run's settings, not the saved ones (resuming keeps moments and step counts)
        set_hyperparameters(self.optimizer, self.cfg)
        self.step, self._pending = int(state["step"]), None
        if self.env.is_main:
            self.run.truncate_metrics(self.step)
        log.info("resumed %s at step %d", path, self.step)


    def _check_finite_weights(self) -> None:
        """NonFiniteError (on every rank) when a weight is NaN or infinite."""
        bad = [n for n, p in self.model.named_parameters()
               if not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()]
        agreed = dist.mean_across_ranks({"bad": float(len(bad))}, self.env)["bad"]
        if agreed > 0:
            raise NonFiniteError(
                f"training diverged by step {self.step}: weights became NaN or infinite "
                f"({', '.join(bad[:3]) or 'on another rank'}) although the loss was finite "
                f"(lr={self.cfg.lr}, weight_decay={self.cfg.weight_decay}); step {self.step} "
                f"was not saved and {self.run.describe_latest()}; lower the learning rate (lr) or check "
                f"the weight decay (weight_decay)")

    def _check_guard(self, record: dict[str, Any]) -> None:
        """LossGuardError when the full model's validation loss rose above the limit (the
        step is logged, not saved)."""
        limit, val = self.cfg.max_val_loss, record.get("val_loss")
        if limit is None or val is None:
            return
        full = val[self.names[-1]]
        if not full <= limit:  # NaN included
            raise LossGuardError(
                f"stopped at step {self.step}: the validation loss of {self.names[-1]} rose to "
                f"{full:.4f}, above the limit {limit:.4f} (max_val_loss); step {self.step} was "
                f"not saved and {self.run.describe_latest()}; lower the learning rate (lr={self.cfg.lr}) "
                "or distil from the original")

    def _log(self, record: dict[str, Any]) -> None:
        if self.env.is_main:
            self.run.append_metrics(record)

    # ----------------------------------------------------------------- the loop
    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns the losses (averaged over ranks) per granularity."""
        cfg, step, env = self.cfg, self.step, self.env
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Gradients left by a step that was interrupted (an exception or Ctrl-C between its
        # backward passes, in a session that goes on) must not leak into this one.
        self.optimizer.zero_grad(set_to_none=True)
        x, y = self.task.batch(step, cfg.batch_size, cfg.seed, env.rank, env.world_size)
        plan = granularities_for_step(step, cfg, self.names)
        micro = cfg.grad_accum
        losses = {name: 0.0 for name, _ in plan}
        n_backward, k = micro * len(plan), 0
        subs = {s.name: s for s in self.raw.config.granularities()}
        full = self.names[-1]
        # who learns from a teacher: every granularity from the original, else the smaller ones
        taught = {name for name, _ in plan if cfg.distill > 0
                  and (self.teacher is not None or name != full)}
        for xm, ym in zip(x.chunk(micro), y.chunk(micro), strict=True):
            xm, ym = xm.to(env.device), ym.to(env.device)
            teacher = None
            if taught:  # the teacher's predictions on this micro-batch, no gradient
                with torch.no_grad(), autocast(cfg.precision, env.device):
                    teacher = (self.teacher or self.model)(xm).float()
            for name, weight in plan:
                k += 1
                # Gradients are synchronised across ranks once, on the last backward of the step.
                with dist.gradient_sync(self.model, enabled=k == n_backward):
                    with autocast(cfg.precision, env.device):
                        if teacher is not None and name in taught:
                            loss, ce = self._distill_loss(self.model, xm, ym, subs[name],
                                                          teacher, cfg.distill)
                        else:
                            loss = ce = self._loss(self.model, xm, ym, subs[name])
                    (loss * weight / micro).backward()
                losses[name] += ce.item() / micro  # logged: the cross-entropy alone
        norm = None
        if cfg.grad_clip > 0:
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        losses = dist.mean_across_ranks(losses, env)  # the same numbers on every rank
        bad = [f"the loss of {n} is {v}" for n, v in losses.items() if not math.isfinite(v)]
        if norm is not None and not math.isfinite(norm):
            bad.append(f"the gradient norm is {norm}")
        if bad or not math.isfinite(lr):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(
                f"training diverged at step {step + 1}: {'; '.join(bad) or f'lr is {lr}'} "
                f"(lr={lr}, weight_decay={cfg.weight_decay}); the optimizer step was not taken "
                f"and {self.run.describe_latest()}; lower the learning rate (lr) or check the weight "
                "decay (weight_decay)")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "lr": lr, "loss": losses, "grad_norm": norm}

    def evaluate(self) -> dict[str, float]:
        """Validation loss of every granularity (every rank runs it: FSDP needs them all)."""
        result = self.task.evaluate(self.raw, self.cfg)
        dist.reshard(self.model)
        return result

    def fit(self) -> dict[str, float]:
        """Train until ``cfg.steps``, evaluating and checkpointing on the way; return final eval."""
        cfg = self.cfg
        if self.step == 0 and self.run.has_checkpoint():
            raise ValueError(f"{self.run_dir} already holds a run ({self.run.latest}); call "
                             "resume() to continue it, or train into another folder (starting "
                             "over here would overwrite its checkpoints and metrics)")
        if self.env.is_main:
            self.run.mark()  # before any other file of the run
            self.run.clean_leftovers()  # of writes a kill interrupted
            # a new run killed before its first checkpoint; a step left unfinished logs again
            self.run.truncate_metrics(self.step - (self._pending is not None))
            self.run.write_train_config(cfg)
        self.model.train()
        tokens_per_step = cfg.batch_size * self.task.tokens_per_sample
        ema: dict[str, float] = {}
        bar = tqdm(total=cfg.steps, initial=self.step - (self._pending is not None),
                   disable=not self.progress
                   or not self.env.is_main, desc=f"train[{cfg.mode}]", unit="step",
                   dynamic_ncols=True)
        final: dict[str, float] = {}
        while self.step < cfg.steps or self._pending is not None:
            if self._pending is None:
                t0 = time.perf_counter()
                record = self.train_step()
                dt = time.perf_counter() - t0
                record.update(tokens=self.step * tokens_per_step,
                              tok_per_s=tokens_per_step / dt)
                self._pending = record
            record = self._pending
            for name, value in record["loss"].items():
                ema[name] = value if name not in ema else 0.9 * ema[name] + 0.1 * value
            checkpoint = self.step % cfg.ckpt_interval == 0 or self.step == cfg.steps
            guarded = checkpoint and cfg.max_val_loss is not None  # validate what is kept
            if (self.step % cfg.eval_interval == 0 or self.step == cfg.steps or guarded) \
                    and "val_loss" not in record:
                record["val_loss"] = self.evaluate()
            final = record.get("val_loss", final)
            self._log(record)
            if self.on_step is not None:
                self.on_step(self.step, record)
            self._check_guard(record)
            if checkpoint:
                self.save()
            self._pending = None
            bar.set_postfix_str(" ".join(f"{n}={v:.3f}" for n, v in ema.items())
                                + f" tok/s={record['tok_per_s']:.0f}")
            bar.update(1)
        bar.close()
        return final or self.evaluate()


def run(model: nn.Module, task: Task, cfg: TrainConfig, run_dir: str | Path,
        env: dist.DistEnv, *, resume: bool = False, progress: bool = True
        ) -> tuple[Trainer, nn.Module, dict[str, float], float]:
    """Wrap ``model`` for ``cfg.parallel``, train it (resuming ``run_dir``'s latest checkpoint
    when asked) and return (trainer, wrapped model, final validation losses, seconds)."""
    teacher = None
    if cfg.teacher == "original":  # saved beside the run when it started (elastify)
        from .families import load_checkpoint

        teacher = load_checkpoint(Path(run_dir) / TEACHER_DIR)[0].to(env.device)
    freeze(model, cfg)
    wrapped = dist.wrap(model.to(env.device), cfg.parallel, env, cfg.precision)
    trainer = Trainer(wrapped, task, cfg, run_dir, env=env, progress=progress, teacher=teacher)
    if resume:
        trainer.resume()
    t0 = time.perf_counter()
    final = trainer.fit()
    return trainer, wrapped, final, time.perf_counter() - t0
