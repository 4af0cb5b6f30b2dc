"""Data-parallel training under torchrun (2 CPU processes, gloo): DDP and FSDP2.

The invariants: a 2-rank run follows the single-process loss trajectory with the same global
batch; checkpoints are consolidated, load in one process, and resume on another world size.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_corpus

from matformer.checkpoint import LATEST
from matformer.families import load_checkpoint

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ARGS = ["--preset", "tiny", "--tokenizer", "byte", "--steps", "8", "--batch-size", "8",
        "--seq-len", "32", "--ckpt-interval", "4", "--eval-interval", "4", "--eval-batches", "2",
        "--precision", "fp32", "--no-progress", "--device", "cpu"]


def _run(cmd: list[str], cwd: Path) -> None:
    # The token cache lives beside the runs (module-scoped fixtures start before the autouse
    # fixture that isolates the cache for each test).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MATFORMER_CACHE": str(cwd / "token-cache")}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"


def _train(cwd: Path, out: str, nproc: int, *extra: str) -> None:
    if nproc == 1:
        cmd = [sys.executable, "-m", "matformer", "train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "matformer", "train"]
    _run([*cmd, "--out", out, *extra], cwd)


def _losses(run: Path) -> list[tuple[str, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [next(iter(r["loss"].items())) for r in records]


def _rewind_to_step4(run: Path) -> None:
    """Make the run look as if it had been killed right after its step-4 checkpoint."""
    shutil.rmtree(run / "checkpoints" / "step_000008")
    (run / LATEST).write_text("checkpoints/step_000004\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    write_corpus(root / "c.txt", n_words=30000)
    common = [*ARGS, "--data", "c.txt"]
    _train(root, "single", 1, *common, "--parallel", "none")
    _train(root, "ddp", 2, *common, "--parallel", "ddp")
    _train(root, "fsdp", 2, *common, "--parallel", "fsdp")
    return root


def _weights(path: Path) -> dict[str, torch.Tensor]:
    model, _ = load_checkpoint(path)
    return model.state_dict()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_follow_single_process_trajectory(runs: Path, parallel: str) -> None:
    single, multi = _losses(runs / "single"), _losses(runs / parallel)
    assert [n for n, _ in single] == [n for n, _ in multi], "granularity draws differ by rank"
    for (name, a), (_, b) in zip(single, multi, strict=True):
        assert abs(a - b) < 1e-4 * max(1.0, abs(a)), (name, a, b)
    w1, w2 = _weights(runs / "single"), _weights(runs / parallel)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)


def test_distributed_checkpoint_resumes_in_one_process(runs: Path, tmp_path: Path) -> None:
    """An FSDP (2-rank) checkpoint at step 4, resumed by one process, ends where 'single' did."""
    run = tmp_path / "fsdp"
    shutil.copytree(runs / "fsdp", run)
    _rewind_to_step4(run)
    _run([sys.executable, "-m", "matformer", "train", "--out", str(run), "--resume",
          "--no-progress"], runs)
    w_resumed, w_single = _weights(run), _weights(runs / "single")
    for k in w_single:
        torch.testing.assert_close(w_resumed[k], w_single[k], rtol=1e-4, atol=1e-5, msg=k)


def test_single_process_checkpoint_resumes_on_two_ranks(runs: Path, tmp_path: Path) -> None:
    """World size 1 -> 2 (and DDP -> FSDP): optimizer state is stored unsharded, by name."""
    run = tmp_path / "single"
    shutil.copytree(runs / "single", run)
    _rewind_to_step4(run)
    _train(runs, str(run), 2, "--resume", "--no-progress", "--parallel", "fsdp")
    resumed = [v for _, v in _losses(run)]
    single = [v for _, v in _losses(runs / "single")]
    assert resumed == pytest.approx(single, rel=1e-4)
    w_resumed, w_single = _weights(run), _weights(runs / "single")
    for k in w_single:
        torch.testing.assert_close(w_resumed[k], w_single[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL runs need two CUDA devices")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_nccl_two_gpus_follow_single_process_trajectory(runs: Path, parallel: str) -> None:
    """The same invariant on NCCL with bf16 off: 2 GPUs vs the single-process CPU run."""
    out = f"nccl-{parallel}"
    _train(runs, out, 2, *ARGS[:-2], "--device", "cuda", "--data", "c.txt",
           "--parallel", parallel)
    single, multi = _losses(runs / "single"), _losses(runs / out)
    assert [n for n, _ in single] == [n for n, _ in multi]
    for (name, a), (_, b) in zip(single, multi, strict=True):
        assert abs(a - b) < 1e-3 * max(1.0, abs(a)), (name, a, b)
