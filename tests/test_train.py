"""Tests for matformer.train: schedules, granularity plans, gradients, resume == uninterrupted."""

from __future__ import annotations

import collections
import copy
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import pattern_dataset, state_equal, tiny_config, tiny_model, write_corpus

from matformer import checkpoint as ckpt
from matformer import families
from matformer.data import TokenDataset
from matformer.metrics import evaluate_granularities
from matformer.model import MatFormerLM, lm_loss
from matformer.recipe import TrainConfig, granularities_for_step, lr_at
from matformer.runs import METRICS, TRAIN_CONFIG
from matformer.task import LMTask
from matformer.tokenizer import Tokenizer
from matformer.train import Trainer

NAMES = ("S", "M", "L", "XL")

FAST: dict[str, Any] = dict(steps=8, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=2,
                            eval_interval=1000, eval_batches=2, ckpt_interval=4,
                            precision="fp32", data="pattern")


def make_trainer(run_dir: Path, model: MatFormerLM | None = None,
                 data: TokenDataset | None = None, **kw: Any) -> Trainer:
    on_step = kw.pop("on_step", None)
    cfg = TrainConfig(**{**FAST, **kw})
    model = model if model is not None else tiny_model(seed=0)
    task = LMTask(data if data is not None else pattern_dataset(), Tokenizer.byte_level(),
                  cfg.seq_len or model.config.max_seq_len)
    return Trainer(model, task, cfg, run_dir, progress=False, on_step=on_step)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]


# ----------------------------------------------------------------------------- config / schedule


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [(dict(mode="dense"), r"TrainConfig\.mode='dense': choose one of"),
     (dict(steps=0), r"TrainConfig\.steps=0 must be >= 1"),
     (dict(batch_size=6, grad_accum=4), r"batch_size=6 must be divisible by grad_accum=4"),
     (dict(probs=(0.5, -0.1, 0.3, 0.3)), r"TrainConfig\.probs=.*non-negative"),
     (dict(loss_weights=(0, 0, 0, 0)), r"TrainConfig\.loss_weights=.*sum > 0"),
     (dict(precision="fp16"), r"TrainConfig\.precision='fp16'"),
     (dict(lr=0.0), "need lr > 0")],
)
def test_train_config_validation(kw: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        TrainConfig(**kw)


def test_train_config_round_trip() -> None:
    cfg = TrainConfig(probs=[1, 2, 3, 4], betas=[0.9, 0.99], steps=5)
    assert cfg.probs == (1.0, 2.0, 3.0, 4.0)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_trainer_rejects_mismatched_probs_and_context(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="probs has 3 values; the model has 4 granularities"):
        make_trainer(tmp_path, probs=(1, 1, 1))
    with pytest.raises(ValueError, match="loss_weights has 2 values"):
        make_trainer(tmp_path, mode="joint", loss_weights=(1, 1))
    with pytest.raises(ValueError, match="seq_len=64 exceeds the model's max_seq_len=32"):
        make_trainer(tmp_path, seq_len=64)


def test_lr_schedule() -> None:
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)  # linear warm-up from lr / warmup
    assert lr_at(4, cfg) == pytest.approx(0.5)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(55, cfg) == pytest.approx(0.55)  # half-way: mean of peak and floor
    assert lr_at(100, cfg) == pytest.approx(0.1)  # ends at lr * min_lr_ratio
    assert lr_at(1000, cfg) == pytest.approx(0.1)  # and stays there
    decay = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    warm = [lr_at(s, cfg) for s in range(10)]
    assert all(a < b for a, b in itertools.pairwise(warm))
    assert lr_at(0, TrainConfig(warmup_steps=0, lr=0.5)) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- granularity plans


def test_sample_plan_is_pure_function_of_seed_and_step() -> None:
    cfg = TrainConfig(seed=3)
    forward = [granularities_for_step(s, cfg, NAMES) for s in range(50)]
    backward = [granularities_for_step(s, cfg, NAMES) for s in reversed(range(50))][::-1]
    assert forward == backward
    assert all(len(p) == 1 and p[0][1] == 1.0 and p[0][0] in NAMES for p in forward)
    other = [granularities_for_step(s, TrainConfig(seed=4), NAMES) for s in range(50)]
    assert other != forward
    assert len({p[0][0] for p in forward}) == 4  # uniform by default: every name shows up


def test_joint_plan_weights_sum_to_one() -> None:
    plan = granularities_for_step(7, TrainConfig(mode="joint"), NAMES)
    assert [n for n, _ in plan] == list(NAMES)
    assert [w for _, w in plan] == pytest.approx([0.25] * 4)
    plan = granularities_for_step(0, TrainConfig(mode="joint", loss_weights=(1, 1, 2, 4)), NAMES)
    assert sum(w for _, w in plan) == pytest.approx(1.0)
    assert [w for _, w in plan] == pytest.approx([0.125, 0.125, 0.25, 0.5])


def test_sample_plan_respects_probs() -> None:
    only_xl = TrainConfig(probs=(0, 0, 0, 1))
    assert {granularities_for_step(s, only_xl, NAMES)[0][0] for s in range(300)} == {"XL"}
    probs = (0.1, 0.2, 0.3, 0.4)
    cfg = TrainConfig(probs=probs, seed=11)
    n = 2000
    counts = collections.Counter(granularities_for_step(s, cfg, NAMES)[0][0] for s in range(n))
    for name, p in zip(NAMES, probs, strict=True):
        assert abs(counts[name] / n - p) < 0.035, (name, counts)
    # unnormalised probabilities mean the same thing
    scaled = TrainConfig(probs=tuple(10 * p for p in probs), seed=11)
    assert all(granularities_for_step(s, cfg, NAMES) == granularities_for_step(s, scaled, NAMES)
               for s in range(100))


# ----------------------------------------------------------------------------- learning


def test_sample_mode_reduces_loss(tmp_path: Path) -> None:
    data = pattern_dataset()
    model = tiny_model(seed=0)
    trainer = make_trainer(tmp_path, model=model, data=data, steps=20, ckpt_interval=100,
                           eval_interval=10)
    before = evaluate_granularities(model, data.val_batches(4, 16, 2))
    final = trainer.fit()
    after = evaluate_granularities(model, data.val_batches(4, 16, 2))
    assert final == after
    for name in NAMES:
        assert after[name] < before[name] - 0.5, (name, before, after)
    records = _metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 21))
    assert all(len(r["loss"]) == 1 for r in records)  # one granularity per step
    assert "val_loss" in records[9] and "val_loss" in records[19]
    first, last = records[0]["loss"], records[-1]["loss"]
    assert next(iter(last.values())) < next(iter(first.values()))
    assert (tmp_path / "latest").read_text().strip() == "checkpoints/step_000020"
    assert TrainConfig.from_dict(json.loads((tmp_path / TRAIN_CONFIG).read_text())) == \
        trainer.cfg


def test_joint_gradient_is_weighted_mean(tmp_path: Path) -> None:
    weights = (1.0, 2.0, 3.0, 4.0)
    trainer = make_trainer(tmp_path, mode="joint", loss_weights=weights, grad_clip=0.0)
    model = trainer.raw
    x, y = trainer.task.data.train_batch(0, 4, 16, trainer.cfg.seed)
    params = dict(model.named_parameters())
    ref = {n: torch.zeros_like(p) for n, p in params.items()}
    ref_losses = {}
    for name, w in zip(NAMES, weights, strict=True):
        loss = lm_loss(model(x, widths=name), y)
        ref_losses[name] = loss.item()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (n, _), g in zip(params.items(), grads, strict=True):
            if g is not None:
                ref[n] += (w / sum(weights)) * g

    captured: dict[str, torch.Tensor] = {}
    step = trainer.optimizer.step

    def capture(*a: Any, **k: Any) -> Any:
        captured.update({n: p.grad.clone() for n, p in params.items()})
        return step(*a, **k)

    trainer.optimizer.step = capture  # type: ignore[method-assign]
    record = trainer.train_step()
    assert record["loss"] == pytest.approx(ref_losses, rel=1e-6)
    assert captured.keys() == ref.keys()
    for n in ref:
        # summation order differs: tolerance relative to the tensor's gradient scale
        scale = float(ref[n].abs().max())
        torch.testing.assert_close(captured[n], ref[n], rtol=1e-5, atol=1e-6 * scale, msg=n)
    # the widest units only get the XL share of the gradient, which is nonzero
    assert captured["blocks.0.ffn.up_proj.weight"][32:].abs().sum() > 0


def _recorded_widths(model: MatFormerLM) -> list[Any]:
    seen: list[Any] = []
    model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs.get("widths")),
        with_kwargs=True)
    return seen


def test_grad_accum_matches_single_batch(tmp_path: Path) -> None:
    base = tiny_model(seed=1)
    one = make_trainer(tmp_path / "one", model=copy.deepcopy(base), batch_size=4, grad_accum=1)
    two = make_trainer(tmp_path / "two", model=copy.deepcopy(base), batch_size=4, grad_accum=2)
    grads: dict[str, list[dict[str, torch.Tensor]]] = {"one": [], "two": []}
    for key, trainer in (("one", one), ("two", two)):
        step = trainer.optimizer.step
        params = dict(trainer.raw.named_parameters())

        def capture(*a: Any, _k: str = key, _p: dict = params, _s: Any = step, **kw: Any) -> Any:
            grads[_k].append({n: p.grad.clone() for n, p in _p.items()})
            return _s(*a, **kw)

        trainer.optimizer.step = capture  # type: ignore[method-assign]
    seen = _recorded_widths(two.raw)
    for step in range(3):
        r1, r2 = one.train_step(), two.train_step()
        planned = granularities_for_step(step, two.cfg, NAMES)[0][0]
        assert seen[-2:] == [two.raw.submodel(planned)] * 2  # both micro-batches, same one
        assert seen[-1].name == planned
        assert list(r1["loss"]) == list(r2["loss"]) == [planned]
        assert r1["loss"][planned] == pytest.approx(r2["loss"][planned], rel=1e-5)
        for n, g in grads["one"][-1].items():
            scale = float(g.abs().max())
            torch.testing.assert_close(grads["two"][-1][n], g, rtol=1e-5, atol=1e-6 * scale,
                                       msg=n)
    assert len(seen) == 6
    for (n, p1), p2 in zip(one.raw.named_parameters(), two.raw.parameters(), strict=True):
        torch.testing.assert_close(p2, p1, rtol=1e-5, atol=1e-6, msg=n)


def test_nested_heads_are_trained_per_granularity(tmp_path: Path) -> None:
    model = tiny_model(tiny_config(n_head=4, nest_heads=True), seed=0)
    trainer = make_trainer(tmp_path, model=model, mode="joint")
    seen = _recorded_widths(model)
    trainer.train_step()
    assert seen == model.config.granularities()  # each with its own nested heads
    assert [s.name for s in seen] == list(NAMES) and seen[0].heads != seen[-1].heads


def test_baseline_mode_trains_one_dense_model(tmp_path: Path) -> None:
    model = tiny_model(tiny_config().dense("S"), seed=0)
    trainer = make_trainer(tmp_path, model=model, mode="baseline", steps=3, ckpt_interval=3)
    final = trainer.fit()
    assert list(final) == ["S"]
    assert all(list(r["loss"]) == ["S"] for r in _metrics(tmp_path))
    loaded, _ = families.load_checkpoint(tmp_path)
    assert loaded.config.ffn_dims == (8, 8) and state_equal(loaded, model) == []


# ----------------------------------------------------------------------------- resume


class Interrupted(RuntimeError):
    pass


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    data = pattern_dataset(seed=5)
    a = make_trainer(tmp_path / "a", model=tiny_model(seed=0), data=data)
    a.fit()

    def crash(step: int, record: dict) -> None:
        # fit() runs: train_step, log, on_step, save. Raising at step 5 comes after step 4's
        # checkpoint and after step 5's metrics line, which the resume must drop.
        if step == 5:
            raise Interrupted

    b = make_trainer(tmp_path / "b", model=tiny_model(seed=0), data=data, on_step=crash)
    with pytest.raises(Interrupted):
        b.fit()
    assert (tmp_path / "b" / "latest").read_text().strip() == "checkpoints/step_000004"
    assert [r["step"] for r in _metrics(tmp_path / "b")] == [1, 2, 3, 4, 5]

    resumed = make_trainer(tmp_path / "b", model=tiny_model(seed=123), data=data)
    resumed.resume()
    assert resumed.step == 4
    assert [r["step"] for r in _metrics(tmp_path / "b")] == [1, 2, 3, 4]
    resumed.fit()
    assert resumed.step == 8

    assert state_equal(a.raw, resumed.raw) == []
    la, _ = families.load_checkpoint(tmp_path / "a")
    lb, _ = families.load_checkpoint(tmp_path / "b")
    assert state_equal(la, lb) == []
    opt_a = ckpt.load_train_state(tmp_path / "a")["optimizer"]["state"]
    opt_b = ckpt.load_train_state(tmp_path / "b")["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for k in opt_a:
        assert all(torch.equal(opt_a[k][s], opt_b[k][s]) for s in opt_a[k])

    ma, mb = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [r["step"] for r in mb] == list(range(1, 9))  # no duplicated steps
    assert [r["loss"] for r in ma] == [r["loss"] for r in mb]  # identical trajectory
    assert ma[-1]["val_loss"] == mb[-1]["val_loss"]


def test_a_step_starts_from_zero_gradients(tmp_path: Path) -> None:
    """Gradients an interrupted step left behind (here: junk on every weight) do not leak into
    the next step: the run equals one that never had them."""
    data = pattern_dataset(seed=5)
    clean = make_trainer(tmp_path / "a", model=tiny_model(seed=0), data=data, steps=3)
    clean.fit()
    dirty = make_trainer(tmp_path / "b", model=tiny_model(seed=0), data=data, steps=3)
    for p in dirty.model.parameters():
        p.grad = torch.full_like(p, 7.0)
    dirty.fit()
    assert state_equal(clean.raw, dirty.raw) == []


def test_fit_again_finishes_a_step_an_interruption_left(tmp_path: Path) -> None:
    """Interrupted during step 4's evaluation, the same trainer's next fit() evaluates, logs
    and checkpoints step 4 before going on: the run equals an uninterrupted one."""
    data = pattern_dataset(seed=5)
    straight = make_trainer(tmp_path / "a", model=tiny_model(seed=0), data=data, steps=8,
                            eval_interval=4, ckpt_interval=4)
    straight.fit()
    t = make_trainer(tmp_path / "b", model=tiny_model(seed=0), data=data, steps=8,
                     eval_interval=4, ckpt_interval=4)
    evaluate = t.evaluate

    def interrupted() -> dict[str, float]:
        t.evaluate = evaluate  # only once
        raise KeyboardInterrupt

    t.evaluate = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert t.step == 4 and [r["step"] for r in _metrics(tmp_path / "b")] == [1, 2, 3]
    t.fit()
    assert [r["step"] for r in _metrics(tmp_path / "b")] == list(range(1, 9))
    assert (tmp_path / "b" / "checkpoints" / "step_000004").is_dir()
    assert state_equal(straight.raw, t.raw) == []
    la, lb = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    assert [r.get("val_loss") for r in la] == [r.get("val_loss") for r in lb]


def test_fit_refuses_to_start_over_an_existing_run(tmp_path: Path) -> None:
    make_trainer(tmp_path, steps=2).fit()
    before = (tmp_path / "latest").read_text()
    with pytest.raises(ValueError, match=r"already holds a run.*resume"):
        make_trainer(tmp_path, steps=2).fit()
    assert (tmp_path / "latest").read_text() == before and len(_metrics(tmp_path)) == 2


def test_resume_takes_this_runs_optimizer_settings(tmp_path: Path) -> None:
    """The saved optimizer state keeps its moments; weight decay and betas come from the
    config of the run that resumes."""
    make_trainer(tmp_path, steps=2).fit()
    later = make_trainer(tmp_path, steps=4, weight_decay=0.0, betas=(0.5, 0.6))
    later.resume()
    decay, no_decay = later.optimizer.param_groups
    assert decay["weight_decay"] == 0.0 and no_decay["weight_decay"] == 0.0
    assert all(tuple(g["betas"]) == (0.5, 0.6) for g in later.optimizer.param_groups)
    assert later.optimizer.state  # the moments were loaded


@pytest.mark.parametrize("state", [{}, [1]])
def test_resume_with_a_foreign_optimizer_state(tmp_path: Path, state: object) -> None:
    make_trainer(tmp_path, steps=2).fit()
    path = ckpt.resolve(tmp_path)
    train_state = ckpt.load_train_state(path)
    torch.save({**train_state, "optimizer": state}, path / ckpt.TRAIN_STATE)
    m = json.loads((path / ckpt.MANIFEST).read_text())
    m["files"][ckpt.TRAIN_STATE] = ckpt._sha256(path / ckpt.TRAIN_STATE)
    (path / ckpt.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ckpt.CheckpointError, match="not an optimizer state of this model"):
        make_trainer(tmp_path, steps=4).resume()


def test_resume_rejects_other_model(tmp_path: Path) -> None:
    make_trainer(tmp_path, steps=4).fit()
    other = make_trainer(tmp_path, model=tiny_model(activation="gelu"))
    with pytest.raises(ckpt.CheckpointError, match="different model config"):
        other.resume()


def test_resume_of_finished_run_is_a_no_op(tmp_path: Path) -> None:
    first = make_trainer(tmp_path, steps=4)
    first.fit()
    again = make_trainer(tmp_path, model=tiny_model(seed=9), steps=4)
    again.resume()
    again.fit()
    assert again.step == 4 and state_equal(first.raw, again.raw) == []
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- real SIGKILL


def _train_cmd(corpus: Path, out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "matformer", "train", "--preset", "tiny", "--tokenizer",
            "byte", "--data", str(corpus), "--steps", str(steps), "--ckpt-interval", "2",
            "--precision", "fp32", "--batch-size", "4", "--seq-len", "32", "--warmup-steps",
            "5", "--eval-interval", "100000", "--eval-batches", "2", "--no-progress",
            "--out", str(out)]


def _latest_step(run: Path) -> int:
    try:
        return int((run / "latest").read_text().strip().rsplit("_", 1)[1])
    except (OSError, ValueError, IndexError):
        return -1


def _env() -> dict[str, str]:
    # One thread: tiny models gain nothing from more, and a busy CPU then slows them down less.
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _run_ok(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_exact(tmp_path: Path) -> None:
    """kill -9 mid-run, resume: bit-identical to a straight run, leftovers of interrupted
    checkpoint writes cleaned."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    steps = 100
    for attempt in range(3):
        killed = tmp_path / f"killed{attempt}"
        proc = subprocess.Popen(_train_cmd(corpus, killed, steps), env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 240
            while proc.poll() is None and _latest_step(killed) < 4:
                assert time.monotonic() < deadline, "training never reached step 4"
                time.sleep(0.05)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode == -signal.SIGKILL and _latest_step(killed) < steps:
            break
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read()[-3000:]
        steps *= 4  # it finished before the kill landed: try a longer run
    else:
        pytest.fail(f"could not kill the run mid-way in 3 attempts (last: {steps // 4} steps)")

    killed_at = _latest_step(killed)
    assert 4 <= killed_at < steps
    # What a kill in the middle of a checkpoint write leaves (the kill above may have, too): a
    # half-written temporary directory, a moved-aside old one, a half-written latest.
    cdir = killed / "checkpoints"
    (cdir / f".step_{killed_at + 2:06d}.tmp-killed").mkdir(exist_ok=True)
    (cdir / f".step_{killed_at + 2:06d}.tmp-killed" / "model.safetensors").write_bytes(b"\0")
    shutil.copytree(cdir / f"step_{killed_at:06d}", cdir / f".step_{killed_at:06d}.old-1-dead")
    (killed / ".latest.tmp").write_text("checkpoints/step_9")
    _run_ok([sys.executable, "-m", "matformer", "train", "--out", str(killed), "--resume",
             "--no-progress"])
    assert _latest_step(killed) == steps
    leftovers = [p.name for d in (killed, cdir) for p in d.iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"leftovers of interrupted writes survived the resume: {leftovers}"

    straight = tmp_path / "straight"
    _run_ok(_train_cmd(corpus, straight, steps))
    a, _ = families.load_checkpoint(straight)
    b, _ = families.load_checkpoint(killed)
    assert state_equal(a, b) == [], f"resumed from step {killed_at} differs from a straight run"
    recorded = [r["step"] for r in _metrics(killed)]
    assert recorded == list(range(1, steps + 1)), "metrics.jsonl has missing or repeated steps"


def test_train_config_from_dict_rejects_unknown_fields() -> None:
    data = TrainConfig(steps=5).to_dict()
    assert TrainConfig.from_dict(data) == TrainConfig(steps=5)
    with pytest.raises(ValueError, match=r"unknown TrainConfig field\(s\) \['stepz'\]"):
        TrainConfig.from_dict({**data, "stepz": 3})


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path) -> None:
    """--compile changes how the step runs, not what it computes: the same losses (to float
    tolerance) and weights as eager steps, here on two granularities (two graphs)."""
    runs = {}
    for compiled in (False, True):
        trainer = make_trainer(tmp_path / str(compiled), steps=4, probs=(0.5, 0.0, 0.0, 0.5),
                               compile=compiled)
        cfg = trainer.cfg
        runs[compiled] = ([trainer.train_step()["loss"] for _ in range(cfg.steps)], trainer.raw)
    (eager, m_eager), (comp, m_comp) = runs[False], runs[True]
    assert [list(r) for r in eager] == [list(r) for r in comp]  # same granularity each step
    for a, b in zip(eager, comp, strict=True):
        for name in a:
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-5)
    for (n, p), q in zip(m_eager.named_parameters(), m_comp.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=n)
