"""Tests for the ``matformer`` command line, run in-process through ``matformer.cli.main``."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_corpus

from matformer import checkpoint as ckpt
from matformer import families
from matformer.cli import build_parser, main

TINY_TRAIN = ["--preset", "tiny", "--tokenizer", "byte", "--steps", "4", "--batch-size", "4",
              "--seq-len", "32", "--eval-interval", "2", "--eval-batches", "2",
              "--ckpt-interval", "2", "--warmup-steps", "2", "--precision", "fp32",
              "--no-progress"]
EVAL_FAST = ["--batches", "2", "--batch-size", "4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """One tiny CLI training run shared by this module: (run dir, corpus, train stdout)."""
    base = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(base / "corpus.txt")
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setenv("MATFORMER_CACHE", str(base / "token-cache"))
        rc = main(["train", *TINY_TRAIN, "--data", str(corpus), "--out", str(base / "run")])
    assert rc == 0, out.getvalue()
    return base / "run", corpus, out.getvalue()


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ----------------------------------------------------------------------------- train


def test_train_writes_a_run(trained: tuple[Path, Path, str]) -> None:
    run, _, stdout = trained
    assert "trained 4 steps" in stdout and "checkpoints/step_000004" in stdout
    assert "FFN widths S=16, M=32, L=64, XL=128" in stdout
    for name in ("S", "M", "L", "XL"):
        assert any(line.split()[:1] == [name] for line in stdout.splitlines())
    assert (run / "latest").read_text().strip() == "checkpoints/step_000004"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002",
                                                                       "step_000004"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    model, tok = families.load_checkpoint(run)
    assert model.config.vocab_size == tok.vocab_size == 257
    assert model.config.d_model == 32 and model.config.max_seq_len == 64
    meta = ckpt.read_metadata(run)
    assert meta["seq_len"] == 32 and meta["step"] == 4 and meta["data"].endswith("corpus.txt")


def test_train_resume_of_finished_run(trained: tuple[Path, Path, str], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "copy"
    shutil.copytree(trained[0], run)
    before = families.load_checkpoint(run)[0].state_dict()
    rc, out, err = _run(capsys, "train", "--out", run, "--resume", "--no-progress")
    assert rc == 0, err
    assert "resuming" in out and "trained 4 steps" in out
    after = families.load_checkpoint(run)[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_train_baseline_mode(trained: tuple[Path, Path, str], tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, "train", *TINY_TRAIN, "--steps", "2", "--mode", "baseline",
                        "--granularity", "M", "--data", trained[1], "--out", tmp_path / "b")
    assert rc == 0, err
    assert "FFN widths M=32" in out
    model, _ = families.load_checkpoint(tmp_path / "b")
    assert model.config.names == ("M",) and model.config.ffn_dims == (32, 32)


# ----------------------------------------------------------------------------- eval


def test_eval_json_has_every_granularity(trained: tuple[Path, Path, str],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, "eval", trained[0], "--json", *EVAL_FAST)
    assert rc == 0, err
    result = json.loads(out)
    rows = result["results"]
    assert [r["name"] for r in rows] == ["S", "M", "L", "XL"]
    assert [r["widths"] for r in rows] == [[16, 16], [32, 32], [64, 64], [128, 128]]
    params = [r["non_embedding_params"] for r in rows]
    assert params == sorted(params) and len(set(params)) == 4
    for r in rows:
        assert 0 < r["val_loss"] < math.log(257) + 1
        assert r["perplexity"] == pytest.approx(math.exp(r["val_loss"]))
        assert r["params"] > r["non_embedding_params"]
    assert result["val_tokens"] == 2 * 4 * 32
    assert result["checkpoint"].endswith("step_000004")
    assert 0 < result["unigram_entropy"] < math.log(257)

    rc, out, _ = _run(capsys, "eval", trained[0], "--json", "--granularity", "S", *EVAL_FAST)
    assert rc == 0
    assert json.loads(out)["results"] == rows[:1]  # same number, however it is asked for


def test_eval_per_layer_widths(trained: tuple[Path, Path, str],
                               capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, "eval", trained[0], "--json", "--widths", "16,128", *EVAL_FAST)
    assert rc == 0, err
    (row,) = json.loads(out)["results"]
    assert row["name"] == "custom" and row["widths"] == [16, 128]
    cfg = families.load_checkpoint(trained[0])[0].config
    assert row["non_embedding_params"] == cfg.num_params((16, 128), embedding=False)

    rc, out, _ = _run(capsys, "eval", trained[0], "--json", "--widths", "128", *EVAL_FAST)
    rc2, out_xl, _ = _run(capsys, "eval", trained[0], "--json", "--granularity", "XL",
                          *EVAL_FAST)
    assert rc == rc2 == 0
    assert json.loads(out)["results"][0]["val_loss"] == \
        json.loads(out_xl)["results"][0]["val_loss"]


def test_eval_table(trained: tuple[Path, Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, "eval", trained[0], *EVAL_FAST)
    assert rc == 0, err
    lines = out.splitlines()
    assert any(line.startswith("S ") and "16 (all layers)" in line for line in lines)
    assert any(line.startswith("XL ") and "128 (all layers)" in line for line in lines)
    assert "unigram entropy" in out


@pytest.mark.parametrize(
    ("args", "pattern"),
    [(["--widths", "16,16,16"], "got 3 values, the model has 2 layers"),
     (["--widths", "200"], "out of range"),
     (["--granularity", "XXL"], "unknown granularity 'XXL'")],
)
def test_eval_bad_submodel(trained: tuple[Path, Path, str], capsys: pytest.CaptureFixture[str],
                           args: list[str], pattern: str) -> None:
    rc, out, err = _run(capsys, "eval", trained[0], *args, *EVAL_FAST)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and pattern in err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- generate


def test_generate_prints_text(trained: tuple[Path, Path, str],
                              capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", trained[0], "--prompt", "the quick", "--max-new-tokens", "12"]
    rc, greedy, err = _run(capsys, *args, "--temperature", "0")
    assert rc == 0, err
    assert greedy.startswith("the quick") and greedy != "the quick\n"  # something was added
    assert _run(capsys, *args, "--temperature", "0")[1] == greedy  # greedy is deterministic
    sampled = _run(capsys, *args, "--temperature", "1.0", "--seed", "3")[1]
    assert _run(capsys, *args, "--temperature", "1.0", "--seed", "3")[1] == sampled

    rc, out, err = _run(capsys, *args, "--granularity", "S", "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["widths"] == [16, 16] and result["text"].startswith("the quick")
    rc, out, _ = _run(capsys, *args, "--widths", "16,64", "--json")
    assert rc == 0 and json.loads(out)["widths"] == [16, 64]


def test_generate_past_the_context(trained: tuple[Path, Path, str],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The tiny preset's context is 64 tokens; asking for more must not be an error."""
    rc, out, err = _run(capsys, "generate", trained[0], "--prompt", "the quick",
                        "--max-new-tokens", "70", "--temperature", "0", "--json")
    assert rc == 0, err
    assert json.loads(out)["text"].startswith("the quick")


def test_generate_dtype_adaptive_and_auto_drafter(trained: tuple[Path, Path, str],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", trained[0], "--prompt", "the quick", "--max-new-tokens", "10",
            "--temperature", "0", "--json"]
    plain = json.loads(_run(capsys, *args)[1])["text"]
    rc, out, err = _run(capsys, *args, "--dtype", "bf16")
    assert rc == 0, err
    assert json.loads(out)["text"].startswith("the quick")
    rc, out, err = _run(capsys, *args, "--draft", "S", "--adaptive")
    assert rc == 0 and json.loads(out)["text"] == plain, err  # greedy: the target's text
    rc, out, err = _run(capsys, *args, "--draft", "auto", "--draft-table")
    assert rc == 0, err
    assert json.loads(out)["text"] == plain
    assert "drafter" in err and "--draft auto:" in err  # the table, then the choice


def test_generate_bad_sampling(trained: tuple[Path, Path, str],
                               capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(capsys, "generate", trained[0], "--top-p", "1.5", "--max-new-tokens", "2")
    assert rc == 2 and "argument --top-p: expected a number in (0, 1], got '1.5'" in err


# ----------------------------------------------------------------------------- errors


def test_train_missing_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-corpus.txt"
    rc, _, err = _run(capsys, "train", *TINY_TRAIN, "--data", missing, "--out", tmp_path / "r")
    assert rc == 2
    assert str(missing) in err and err.startswith("error: ")
    assert not (tmp_path / "r").exists()


def test_eval_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(capsys, "eval", tmp_path)
    assert rc == 2 and "is neither a checkpoint directory" in err and str(tmp_path) in err
    rc, _, err = _run(capsys, "eval", tmp_path / "missing")
    assert rc == 2 and "does not exist" in err
    rc, _, err = _run(capsys, "generate", tmp_path)
    assert rc == 2 and "neither a checkpoint" in err


def test_train_refuses_existing_run(trained: tuple[Path, Path, str], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "copy"
    shutil.copytree(trained[0], run)
    metrics = (run / "metrics.jsonl").read_text()
    rc, _, err = _run(capsys, "train", *TINY_TRAIN, "--data", trained[1], "--out", run)
    assert rc == 2
    assert "already holds a run" in err and "--resume" in err
    assert (run / "metrics.jsonl").read_text() == metrics  # untouched


def test_resume_without_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(capsys, "train", "--out", tmp_path / "nothing", "--resume")
    assert rc == 2 and err.startswith("error: ")


def _subcommands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sorted(sub.choices)


@pytest.mark.parametrize("command", [None, *_subcommands()])
def test_help_mentions_examples(command: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(([command] if command else []) + ["--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "matformer " in out


def test_core_subcommands_exist() -> None:
    assert {"train", "eval", "generate"} <= set(_subcommands())


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--out", "x", "--preset", "nope"]) == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("world", ["1", "2"])
def test_module_entry_exit_code_and_output(world: str, tmp_path: Path) -> None:
    """``python -m matformer`` exits with main's code; a torchrun worker (WORLD_SIZE > 1)
    leaves without interpreter finalization, its buffered output still written."""
    env = {**os.environ, "WORLD_SIZE": world, "RANK": "0"}
    env.pop("PYTHONUNBUFFERED", None)  # buffered, as a pipe is by default
    help_run = subprocess.run([sys.executable, "-m", "matformer", "train", "--help"], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0, help_run.stderr
    assert help_run.stdout.startswith("usage: matformer train") and "examples:" in help_run.stdout
    bad = subprocess.run([sys.executable, "-m", "matformer", "eval", "--checkpoint",
                          str(tmp_path / "missing")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: "), bad.stderr
