"""Self-distillation in training (``TrainConfig.distill``): the loss, the gradient of a step,
and the rules (off for baselines, the full model trains on cross-entropy alone)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import pattern_dataset, tiny_model

from matformer.model import lm_loss
from matformer.recipe import TrainConfig, granularities_for_step
from matformer.task import LMTask, kl_to_teacher
from matformer.tokenizer import Tokenizer
from matformer.train import Trainer

FAST: dict[str, Any] = dict(steps=8, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=2,
                            eval_interval=1000, eval_batches=2, ckpt_interval=4,
                            precision="fp32", data="pattern", grad_clip=0.0)


def make_trainer(run_dir: Path, **kw: Any) -> Trainer:
    cfg = TrainConfig(**{**FAST, **kw})
    model = tiny_model(seed=0)
    task = LMTask(pattern_dataset(), Tokenizer.byte_level(), cfg.seq_len)
    return Trainer(model, task, cfg, run_dir, progress=False)


def test_kl_to_teacher_matches_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    p, q = t.log_softmax(-1), s.log_softmax(-1)
    ref = (p.exp() * (p - q)).sum(-1).mean()
    assert float(kl_to_teacher(s, t)) == pytest.approx(float(ref), rel=1e-6)
    assert float(kl_to_teacher(s, s)) == pytest.approx(0.0, abs=1e-7)
    t.requires_grad_(True)
    kl_to_teacher(s.requires_grad_(True), t).backward()
    assert t.grad is None and s.grad is not None  # the teacher is detached


@pytest.mark.parametrize(("kw", "pattern"), [
    (dict(distill=1.5), r"distill=1.5 must be in \[0, 1\]"),
    (dict(distill=-0.1), r"must be in \[0, 1\]"),
    (dict(distill=0.5, mode="baseline"), "needs a nested model")])
def test_distill_validation(kw: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        TrainConfig(**kw)


def _step_of(cfg: TrainConfig, names: tuple[str, ...], want: str) -> int:
    return next(s for s in range(200) if granularities_for_step(s, cfg, names)[0][0] == want)


@pytest.mark.parametrize("granularity", ["S", "XL"])
def test_distill_step_gradient(tmp_path: Path, granularity: str) -> None:
    """A distilled step's gradient is that of (1-W) CE + W KL(detached full || submodel); a step
    that draws the full model is plain cross-entropy; the logged loss is the cross-entropy."""
    w = 0.6
    trainer = make_trainer(tmp_path, distill=w)
    names = trainer.names
    trainer.step = _step_of(trainer.cfg, names, granularity)
    model = trainer.raw
    x, y = trainer.task.data.train_batch(trainer.step, 4, 16, trainer.cfg.seed)
    params = dict(model.named_parameters())
    logits = model(x, widths=granularity)
    ce = lm_loss(logits, y)
    if granularity == "XL":
        loss = ce
    else:
        loss = (1 - w) * ce + w * kl_to_teacher(logits, model(x).detach())
    ref = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True),
                   strict=True))

    captured: dict[str, torch.Tensor] = {}
    step = trainer.optimizer.step

    def capture(*a: Any, **k: Any) -> Any:
        captured.update({n: p.grad.clone() for n, p in params.items() if p.grad is not None})
        return step(*a, **k)

    trainer.optimizer.step = capture  # type: ignore[method-assign]
    record = trainer.train_step()
    assert record["loss"] == {granularity: pytest.approx(ce.item(), rel=1e-6)}
    for n, g in ref.items():
        if g is None:
            assert n not in captured or not captured[n].any()
            continue
        scale = float(g.abs().max())
        torch.testing.assert_close(captured[n], g, rtol=1e-5, atol=1e-6 * scale, msg=n)


def test_distill_changes_training_and_zero_is_off(tmp_path: Path) -> None:
    a = make_trainer(tmp_path / "a")
    b = make_trainer(tmp_path / "b", distill=0.0)
    c = make_trainer(tmp_path / "c", distill=0.5)
    for t in (a, b, c):
        for _ in range(4):
            t.train_step()
    sa, sb, sc = (t.raw.state_dict() for t in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_distill_in_joint_mode_runs(tmp_path: Path) -> None:
    t = make_trainer(tmp_path, mode="joint", distill=0.5)
    record = t.train_step()
    assert set(record["loss"]) == {"S", "M", "L", "XL"}
