"""Bad input gets one clear error and exit code 2, never a traceback or silence (issue 9).

Every case runs in-process through ``matformer.cli.main``. Argument errors stop before any
checkpoint is read, so most cases need no files at all.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from helpers import tiny_model, write_corpus

import matformer
from matformer import checkpoint as ckpt
from matformer.cli import args as cli_args
from matformer.cli import build_parser, main
from matformer.config import ModelConfig
from matformer.recipe import MAX_SEED, TrainConfig
from matformer.tokenizer import Tokenizer

cli_main = importlib.import_module("matformer.cli.main")  # the module (the package exports main)

CKPT = "no/such/run"  # argument errors are reported before the checkpoint is opened


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny byte-level LM checkpoint (untrained) that records a small corpus."""
    base = tmp_path_factory.mktemp("inputs")
    corpus = write_corpus(base / "corpus.txt", n_words=2000)
    model = tiny_model(vocab_size=257)
    return ckpt.save_checkpoint(base / "run", model, Tokenizer.byte_level(),
                                metadata={"data": str(corpus), "seq_len": 32})


# ------------------------------------------------------------------ numbers, one rule per flag
INT1 = "an integer >= 1"
INT0 = "an integer >= 0"
POS = "a finite number > 0"
NONNEG = "a finite number >= 0"
SEED = f"an integer in [0, {MAX_SEED}]"
WEIGHTS = "one or more comma-separated values, each a finite number >= 0, with a positive sum"
RATIOS = "one or more comma-separated values, each a number in (0, 1]"
PATTERNS = "one or more comma-separated names from rule,decreasing,inc-dec,dec-inc,random"

VALUE_CASES = [
    # (argv before the value, flag, bad value, allowed range in the message)
    (["train", "--out", "x"], "--steps", "0", INT1),
    (["train", "--out", "x"], "--steps", "-3", INT1),
    (["train", "--out", "x"], "--steps", "1.5", INT1),
    (["train", "--out", "x"], "--batch-size", "0", INT1),
    (["train", "--out", "x"], "--lr", "nan", POS),
    (["train", "--out", "x"], "--lr", "inf", POS),
    (["train", "--out", "x"], "--lr", "0", POS),
    (["train", "--out", "x"], "--warmup-steps", "-1", INT0),
    (["train", "--out", "x"], "--weight-decay", "nan", NONNEG),
    (["train", "--out", "x"], "--grad-clip", "-inf", NONNEG),
    (["train", "--out", "x"], "--probs", "nan,1,1,1", WEIGHTS),
    (["train", "--out", "x"], "--probs", "0,0,0,0", WEIGHTS),
    (["train", "--out", "x"], "--probs", "1,,1,1", WEIGHTS),
    (["train", "--out", "x", "--mode", "joint"], "--loss-weights", "1,-1,1,1", WEIGHTS),
    (["train", "--out", "x"], "--eval-interval", "0", INT1),
    (["train", "--out", "x"], "--ckpt-interval", "0", INT1),
    (["train", "--out", "x"], "--seed", "-1", SEED),
    (["train", "--out", "x"], "--seed", str(2**32), SEED),
    (["train", "--out", "x"], "--ratios", "", RATIOS),
    (["train", "--out", "x"], "--ratios", "0,1", RATIOS),
    (["train", "--out", "x"], "--ratios", "0.5,1.5", RATIOS),
    (["train", "--out", "x"], "--n-kv-head", "0", INT1),
    (["train", "--out", "x"], "--vocab-size", "100", "an integer >= 257"),
    (["train", "--out", "x"], "--val-fraction", "0", "a number in (0, 0.5]"),
    (["train", "--out", "x"], "--val-fraction", "nan", "a number in (0, 0.5]"),
    (["train", "--out", "x"], "--tokens", "0", POS),
    (["train", "--out", "x"], "--tokens", "-5", POS),
    (["train", "--out", "x"], "--tokens", "inf", POS),
    (["train", "--out", "x"], "--grad-accum", "0", INT1),
    (["train", "--out", "x"], "--seq-len", "0", INT1),
    (["train", "--out", "x"], "--eval-batches", "0", INT1),
    ([], "--threads", "0", INT1),
    (["eval", CKPT], "--batches", "0", INT1),
    (["eval", CKPT], "--batch-size", "0", INT1),
    (["consistency", CKPT], "--batches", "-1", INT1),
    (["generate", CKPT], "--max-new-tokens", "-5", INT0),
    (["generate", CKPT, "--no-cache"], "--max-new-tokens", "-5", INT0),
    (["generate", CKPT], "--temperature", "nan", NONNEG),
    (["generate", CKPT], "--temperature", "inf", NONNEG),
    (["generate", CKPT], "--temperature", "-1", NONNEG),
    (["generate", CKPT], "--top-k", "0", INT1),
    (["generate", CKPT], "--top-p", "0", "a number in (0, 1]"),
    (["generate", CKPT], "--top-p", "nan", "a number in (0, 1]"),
    (["generate", CKPT], "--seed", "99999999999999999999999", SEED),
    (["generate", CKPT, "--draft", "S"], "--draft-len", "0", INT1),
    (["mixnmatch", CKPT], "--patterns", ",", PATTERNS),
    (["mixnmatch", CKPT], "--patterns", "rule,nope", PATTERNS),
    (["vision", "mixnmatch", CKPT], "--patterns", "", PATTERNS),
    (["mixnmatch", CKPT], "--repeats", "0", INT1),
    (["mixnmatch", CKPT], "--prefill-len", "0", INT1),
    (["mixnmatch", CKPT], "--seed", "-2", SEED),
    (["mixnmatch", CKPT], "--max-params", "0", POS),
    (["mixnmatch", CKPT], "--max-params", "nan", POS),
    (["mixnmatch", CKPT], "--max-latency-ms", "-1", POS),
    (["mixnmatch", CKPT], "--max-decode-ms", "inf", POS),
    (["extract", CKPT, "--out", "y"], "--max-flops", "inf", POS),
    (["extract", CKPT, "--out", "y"], "--repeats", "0", INT1),
    (["extract", CKPT, "--out", "y"], "--batches", "0", INT1),
    (["vision", "train", "--out", "x"], "--image-size", "0", INT1),
    (["vision", "train", "--out", "x"], "--patch-size", "0", INT1),
    (["vision", "train", "--out", "x"], "--d-model", "-8", INT1),
    (["vision", "train", "--out", "x"], "--d-ff", "0", INT1),
    (["vision", "train", "--out", "x"], "--n-layer", "0", INT1),
    (["vision", "train", "--out", "x"], "--n-head", "0", INT1),
    (["vision", "train", "--out", "x"], "--max-shift", "-1", INT0),
    (["vision", "train", "--out", "x"], "--val-fraction", "1", "a number in (0, 1)"),
    (["vision", "train", "--out", "x"], "--steps", "0", INT1),
    (["vision", "train", "--out", "x"], "--lr", "nan", POS),
    (["vision", "train", "--out", "x"], "--ratios", "", RATIOS),
    (["vision", "retrieve", CKPT], "--k", "0", "one or more comma-separated values, each an integer >= 1"),
    (["vision", "retrieve", CKPT], "--k", "1,,5", "one or more comma-separated values, each an integer >= 1"),
    (["vision", "retrieve", CKPT], "--repeats", "0", INT1),
    (["vision", "mixnmatch", CKPT], "--repeats", "0", INT1),
    (["vision", "mixnmatch", CKPT], "--seed", "-1", SEED),
    (["vision", "mixnmatch", CKPT], "--max-params", "-1", POS),
]


@pytest.mark.parametrize(("before", "flag", "value", "allowed"), VALUE_CASES,
                         ids=[f"{c[0][0] if c[0] else ''} {c[1]}={c[2]}" for c in VALUE_CASES])
def test_bad_value_names_flag_and_range(capsys: pytest.CaptureFixture[str], before: list[str],
                                         flag: str, value: str, allowed: str) -> None:
    rc, out, err = _run(capsys, *before, f"{flag}={value}")
    assert rc == 2 and out == ""
    assert err.startswith(f"error: argument {flag}: expected {allowed}, got {value!r} (see: "
                          "matformer "), err
    assert err.count("\n") == 1  # one line, pointing at --help instead of printing the usage


@pytest.mark.parametrize("argv", [
    ["train", "--out", "x", "--seed", str(MAX_SEED), "--warmup-steps", "0", "--grad-clip", "0",
     "--weight-decay", "0", "--val-fraction", "0.5", "--tokens", "1e6", "--probs", "0,0,0,1"],
    ["generate", CKPT, "--temperature", "0", "--top-p", "1", "--max-new-tokens", "0"],
    ["mixnmatch", CKPT, "--patterns", " rule, random", "--max-params", "1e-3"],
    ["vision", "train", "--out", "x", "--max-shift", "0", "--ratios", "0.5,1"],
])
def test_boundary_values_are_accepted(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    args.check_args(args)
    assert getattr(args, "patterns", "rule,random") == "rule,random"


def test_corrupt_train_config_names_the_file(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "train_config.json").write_text('{"steps": 4')
    rc, _, err = _run(capsys, "train", "--out", tmp_path, "--resume")
    assert rc == 2
    assert f"error: {tmp_path / 'train_config.json'} is not a valid training config" in err


def _parsers(parser: argparse.ArgumentParser, path: str = "matformer"
             ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_numeric_flag_is_range_checked() -> None:
    """No command takes a bare int/float: each numeric flag has a range-checked type, so the
    rule is in one place (cli/common.py) and --help shows the range."""
    bare = [f"{path} {'/'.join(a.option_strings)}" for path, p in _parsers(build_parser())
            for a in p._actions
            if a.type in (int, float) and not a.choices]
    assert bare == []


def test_only_the_global_threads_flag() -> None:
    """A subcommand flag with dest 'threads' would override `matformer --threads N`."""
    owners = [path for path, p in _parsers(build_parser())
              if any(a.dest == "threads" for a in p._actions)]
    assert owners == ["matformer"]


def test_no_flag_shadows_the_check_hook() -> None:
    """``check_args`` holds each command's cross-flag rules; a flag of that name would hide it."""
    assert not [a for _, p in _parsers(build_parser()) for a in p._actions
                if a.dest == "check_args" and a.option_strings]


def test_seed_range_matches_the_library() -> None:
    assert cli_args.SEED.high == MAX_SEED
    TrainConfig(seed=MAX_SEED)
    with pytest.raises(ValueError, match=r"TrainConfig\.seed=4294967296 must be <= 4294967295"):
        TrainConfig(seed=MAX_SEED + 1)


def test_help_shows_ranges_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "optimizer steps (an integer >= 1; default: 600)" in out
    assert "(a finite number > 0; default: 0.003)" in out
    assert "(an integer in [0, 4294967295]; default: 0)" in out
    assert main(["vision", "retrieve", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "recall@k (one or more comma-separated values, each an integer >= 1; default: 1,5,10)" in out


# ------------------------------------------------------------------ library configs: NaN, inf
@pytest.mark.parametrize(
    ("kw", "pattern"),
    [(dict(lr=math.inf), r"TrainConfig\.lr=inf: need lr > 0, a finite number"),
     (dict(lr=math.nan), r"TrainConfig\.lr=nan: need lr > 0"),
     (dict(weight_decay=math.nan), r"TrainConfig\.weight_decay=nan: need weight_decay >= 0"),
     (dict(grad_clip=-1.0), r"TrainConfig\.grad_clip=-1\.0: need grad_clip >= 0"),
     (dict(min_lr_ratio=math.nan), r"TrainConfig\.min_lr_ratio=nan"),
     (dict(val_fraction=math.inf), r"TrainConfig\.val_fraction=inf"),
     (dict(betas=(0.9, math.nan)), r"TrainConfig\.betas=\(0\.9, nan\): need two numbers"),
     (dict(probs=(math.nan, 1, 1, 1)), r"TrainConfig\.probs=\(nan, .*finite non-negative"),
     (dict(loss_weights=(math.inf, 1, 1, 1)), r"TrainConfig\.loss_weights=\(inf, .*finite"),
     (dict(steps=math.nan), r"TrainConfig\.steps=nan must be an integer"),
     (dict(seq_len=0), r"TrainConfig\.seq_len=0 must be >= 1"),
     (dict(seed=-1), r"TrainConfig\.seed=-1 must be >= 0"),
     (dict(warmup_steps=-1), r"TrainConfig\.warmup_steps=-1 must be >= 0"),
     (dict(keep_checkpoints=0), r"TrainConfig\.keep_checkpoints=0 must be >= 1")],
)
def test_train_config_refuses_non_finite(kw: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        TrainConfig(**kw)


@pytest.mark.parametrize("field", ["rope_theta", "norm_eps", "init_std"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0])
def test_model_config_refuses_non_finite(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}=.*positive finite number"):
        ModelConfig(**{field: value})


# ------------------------------------------------------------------ flags that would be ignored
CONFLICTS = [
    (["train", "--out", "{tmp}/r", "--granularity", "S"],
     "--granularity S applies to --mode baseline only; --mode sample trains every granularity"),
    (["train", "--out", "{tmp}/r", "--mode", "joint", "--granularity", "M"],
     "--granularity M applies to --mode baseline only; --mode joint"),
    (["train", "--out", "{tmp}/r", "--mode", "joint", "--probs", "1,1,1,1"],
     "--probs applies to --mode sample only, not --mode joint"),
    (["train", "--out", "{tmp}/r", "--loss-weights", "1,1,1,2"],
     "--loss-weights applies to --mode joint only, not --mode sample"),
    (["train", "--out", "{tmp}/r", "--probs", "1,2"],
     "--probs has 2 values; the model has 4 granularities"),
    (["train", "--out", "{tmp}/r", "--ratios", "0.5,1", "--probs", "1,1,1"],
     "--probs has 3 values; the model has 2 granularities"),
    (["train", "--out", "{tmp}/r", "--tokens", "1e6", "--steps", "5"],
     "give --steps or --tokens"),
    (["train", "--out", "{tmp}/r", "--preset", "tiny", "--seq-len", "65"],
     "--seq-len 65 exceeds the context of --preset tiny (max_seq_len=64)"),
    (["train", "--out", "{tmp}/r", "--preset", "tiny", "--n-kv-head", "3"],
     "ModelConfig.n_kv_head=3 is invalid: must divide n_head=2"),
    (["train", "--out", "{tmp}/r", "--names", "a,b"], "ModelConfig.names=('a', 'b') is invalid"),
    (["train", "--out", "{tmp}/r", "--mode", "baseline", "--granularity", "XXL"],
     "unknown granularity 'XXL'"),
    (["vision", "train", "--out", "{tmp}/r", "--granularity", "S"],
     "--granularity S applies to --mode baseline only"),
    (["eval", CKPT, "--granularity", "S", "--widths", "16"],
     "give --granularity (S) or --widths (16), not both"),
    (["generate", CKPT, "--granularity", "S", "--widths", "16"], "not both"),
    (["export-hf", CKPT, "--out", "{tmp}/h", "--granularity", "S", "--widths", "16"],
     "give --granularity (S) or --widths (16), not both"),
    (["generate", CKPT, "--adaptive"], "--adaptive applies to speculative decoding: add --draft"),
    (["generate", CKPT, "--shared-cache"], "--shared-cache applies to speculative decoding"),
    (["generate", CKPT, "--draft-len", "3"], "--draft-len applies to speculative decoding"),
    (["generate", CKPT, "--draft", "S", "--draft-table"],
     "--draft-table prints the table that --draft auto searches"),
    (["generate", CKPT, "--draft", "S", "--max-draft-len", "2"],
     "--max-draft-len bounds the drafts of --adaptive"),
    (["generate", CKPT, "--draft", "S", "--adaptive", "--max-draft-len", "2", "--draft-len",
      "4"], "--draft-len 4 exceeds --max-draft-len 2"),
    (["generate", CKPT, "--stream", "--json"], "--stream prints one prompt's text"),
    (["generate", CKPT, "--stream", "--prompt", "a", "--prompt", "b"], "takes one --prompt"),
    (["mixnmatch", CKPT, "--sweep", "s.json", "--max-params", "1e6", "--widths", "16"],
     "--sweep reads a stored sweep; --widths would only apply to a new one"),
    (["mixnmatch", CKPT, "--sweep", "s.json"], "--sweep needs a budget"),
    (["mixnmatch", CKPT, "--no-latency", "--max-latency-ms", "5"],
     "--max-latency-ms needs latency measurements; drop --no-latency"),
    (["vision", "mixnmatch", CKPT, "--no-latency", "--max-latency-ms", "5"],
     "--max-latency-ms needs latency measurements"),
    (["extract", CKPT, "--out", "{tmp}/e", "--granularity", "S", "--max-params", "1e6"],
     "give a submodel (--granularity/--widths) or a budget, not both"),
    (["extract", CKPT, "--out", "{tmp}/e", "--granularity", "S", "--sweep", "s.json"],
     "--sweep goes with a budget"),
]


@pytest.mark.parametrize(("argv", "message"), CONFLICTS,
                         ids=[" ".join(a for a in c[0] if a.startswith("--") and a != "--out")
                              for c in CONFLICTS])
def test_ignored_flag_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  argv: list[str], message: str) -> None:
    rc, out, err = _run(capsys, *(a.format(tmp=tmp_path) for a in argv))
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and message in err, err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("command", [["train"], ["vision", "train"]])
def test_resume_names_the_flags_it_ignores(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           command: list[str]) -> None:
    rc, _, err = _run(capsys, *command, "--out", tmp_path, "--resume", "--steps", "900",
                      "--lr", "0.01", "--no-progress", "--parallel", "none")
    assert rc == 2  # no run to resume here
    assert (f"warning: --resume continues {tmp_path} with its saved settings; ignoring "
            "--steps, --lr\n") in err
    rc, _, err = _run(capsys, *command, "--out", tmp_path, "--resume")
    assert "warning" not in err


def test_unknown_draft_name_lists_the_granularities(run_dir: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(capsys, "generate", run_dir, "--draft", "Q", "--max-new-tokens", "2")
    assert rc == 2
    assert "--draft 'Q' is not a granularity name" in err and "S, M, L, XL" in err
    assert "--widths" not in err


def test_baseline_granularity_defaults_to_the_largest(tmp_path: Path) -> None:
    args = build_parser().parse_args(["train", "--out", str(tmp_path), "--mode", "baseline",
                                      "--names", "a,b", "--ratios", "0.5,1"])
    args.check_args(args)
    assert args.granularity == "b" and args.steps == 600


# ------------------------------------------------------------------ the global --threads
@pytest.fixture
def restore_threads() -> Iterator[None]:
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def test_global_threads_is_what_latency_uses(run_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch,
                                             restore_threads: None) -> None:
    from matformer.submodels import latency

    seen: list[int] = []
    measure = latency.measure

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(torch.get_num_threads())
        return measure(*args, **kwargs)

    monkeypatch.setattr(latency, "measure", spy)
    want = 1 if torch.get_num_threads() != 1 else 2
    rc, out, err = _run(capsys, "--threads", want, "mixnmatch", run_dir, "--out",
                        tmp_path / "mm", "--batches", "1", "--batch-size", "2", "--repeats",
                        "1", "--prefill-len", "4", "--no-progress", "--json")
    assert rc == 0, err
    assert seen and set(seen) == {want}
    assert json.loads(out)["latency"]["threads"] == want


# ------------------------------------------------------------------ errors at the CLI boundary
def test_out_that_is_a_file(tmp_path: Path, run_dir: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    for argv in (["train", "--out", target], ["extract", run_dir, "--granularity", "S",
                                             "--out", target],
                 ["vision", "train", "--out", target]):
        rc, _, err = _run(capsys, *argv)
        assert rc == 2 and f"error: --out {target} is an existing file" in err, err
        assert target.read_text() == "keep me"


def test_full_disk_during_training(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A real run whose checkpoint write meets a full disk: one line and exit code 2."""
    corpus = write_corpus(tmp_path / "c.txt", n_words=2000)

    def full(obj: object, path: object, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(torch, "save", full)
    rc, _, err = _run(capsys, "train", "--preset", "tiny", "--tokenizer", "byte", "--steps",
                        "2", "--batch-size", "2", "--seq-len", "16", "--eval-interval", "2",
                        "--eval-batches", "1", "--ckpt-interval", "2", "--precision", "fp32",
                        "--no-progress", "--data", corpus, "--out", tmp_path / "r")
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    # the checkpoint writer names the file it could not write and that nothing was replaced
    assert "no space left on device writing" in err and "train_state.pt" in err
    assert "nothing was replaced" in err


def _failing(exc: BaseException) -> Callable[[argparse.Namespace], None]:
    def command(args: argparse.Namespace) -> None:
        raise exc

    return command


@pytest.mark.parametrize(
    ("exc", "message"),
    [(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "runs/x/model.safetensors"),
      f"error: runs/x/model.safetensors: {os.strerror(errno.ENOSPC)} (the disk is full"),
     (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/root/runs"),
      f"error: /root/runs: {os.strerror(errno.EACCES)} (choose a path you may write to"),
     (IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), "runs/x/latest"),
      f"error: runs/x/latest: {os.strerror(errno.EISDIR)}"),
     (OSError(errno.EXDEV, os.strerror(errno.EXDEV), "a", None, "b"),
      f"error: a -> b: {os.strerror(errno.EXDEV)}"),
     (KeyError("files"), "error: missing entry 'files' in a file this command read"),
     (json.JSONDecodeError("Expecting value", "{", 1),
      "error: a file this command read is not valid JSON (Expecting value: line 1")],
)
def test_environment_errors_are_one_line(capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch,
                                         exc: BaseException, message: str) -> None:
    monkeypatch.setitem(cli_main.COMMANDS, "import-hf", _failing(exc))
    rc, out, err = _run(capsys, "import-hf", "folder", "--out", "somewhere")
    assert rc == 2 and out == ""
    assert err.startswith(message) and err.count("\n") == 1, err


def test_verbose_logs_the_traceback(capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch,
                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(cli_main.COMMANDS, "import-hf", _failing(KeyError("config")))
    with caplog.at_level(logging.DEBUG, logger="matformer.cli"):
        rc, _, err = _run(capsys, "-v", "import-hf", "folder", "--out", "somewhere")
    assert rc == 2 and "missing entry 'config'" in err
    assert any(r.exc_info and isinstance(r.exc_info[1], KeyError) for r in caplog.records)


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli_main.COMMANDS, "import-hf", _failing(ZeroDivisionError("bug")))
    with pytest.raises(ZeroDivisionError):
        main(["import-hf", "folder", "--out", "somewhere"])


def test_interrupt_exits_130(capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli_main.COMMANDS, "import-hf", _failing(KeyboardInterrupt()))
    rc, _, err = _run(capsys, "import-hf", "folder", "--out", "somewhere")
    assert rc == 130 and err == "interrupted\n"


def test_incomplete_sweep_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A user's file without the fields the command needs: a clear line, not a KeyError."""
    sweep = tmp_path / "mixnmatch.json"
    sweep.write_text(json.dumps({"candidates": [{"name": "x"}]}))
    rc, _, err = _run(capsys, "mixnmatch", CKPT, "--sweep", sweep, "--max-params", "1e6")
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err, err
    sweep.write_text("{not json")
    rc, _, err = _run(capsys, "mixnmatch", CKPT, "--sweep", sweep, "--max-params", "1e6")
    assert rc == 2 and err.startswith(f"error: cannot read sweep {sweep}"), err


def test_decompression_bomb_is_an_unreadable_image(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from matformer.vision.data import load_image_folder

    for cls, value in (("a", 30), ("b", 220)):
        for i in range(3):
            (tmp_path / cls).mkdir(exist_ok=True)
            Image.new("L", (4, 4), value).save(tmp_path / cls / f"{i}.png")
    Image.new("L", (16, 16), 0).save(tmp_path / "a" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 256 pixels > 2 x 50: a "bomb"
    with pytest.raises(ValueError, match=r"cannot read image .*bomb\.png.*skip_unreadable=True"):
        load_image_folder(tmp_path, image_size=4, channels=1)
    data = load_image_folder(tmp_path, image_size=4, channels=1, skip_unreadable=True)
    assert len(data.train_y) + len(data.val_y) == 6


# ------------------------------------------------------------------ torchrun: every rank clean
@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_failure_on_rank0_is_clean_on_every_rank(tmp_path: Path) -> None:
    """Rank 0 fails before a collective (missing corpus) while rank 1 waits in a barrier:
    rank 0 prints the error, rank 1 says it stopped because of it; no rank prints a traceback
    (what remains is torchrun's own summary of the failed processes)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "matformer", "train", "--preset", "tiny", "--tokenizer", "byte", "--steps", "2",
           "--data", "missing.txt", "--out", "r", "--device", "cpu", "--no-progress"]
    src = str(Path(matformer.__file__).parents[1])  # the code under test, not an installed copy
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MATFORMER_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    err = proc.stderr
    assert proc.returncode != 0
    assert "error: rank 0: corpus 'missing.txt' is neither" in err, err
    rank1_clean = "error: rank 1: stopped because another process of this run failed" in err
    assert rank1_clean or "exitcode  : -15" in err, err  # or torchrun stopped it first
    assert "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err, err
    assert "gloo" not in err and "matformer/" not in err, err
    assert not (tmp_path / "r").exists()
