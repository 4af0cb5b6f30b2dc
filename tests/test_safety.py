"""Never lose a user's data: refusals, atomic replacement, pruning by the run's own history,
leftovers of interrupted writes, divergence, the data a run was trained on, and clear errors
for damaged checkpoints. Through ``matformer.cli.main`` where a user would meet them."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import pattern_dataset, random_tokens, tiny_model, write_corpus

from matformer import checkpoint as ckpt
from matformer import families
from matformer.cli import main
from matformer.outputs import OutputExistsError, atomic_output, clean_leftovers
from matformer.runs import RunDir
from matformer.submodels.extract import extract
from matformer.task import LMTask
from matformer.tokenizer import Tokenizer
from matformer.train import NonFiniteError, TrainConfig, Trainer

TINY_TRAIN = ["--preset", "tiny", "--tokenizer", "byte", "--steps", "4", "--batch-size", "4",
              "--seq-len", "32", "--eval-interval", "100", "--eval-batches", "1",
              "--ckpt-interval", "2", "--warmup-steps", "2", "--precision", "fp32",
              "--no-progress"]
TOK = Tokenizer.byte_level()


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _refused(result: tuple[int, str, str], *needles: str) -> None:
    rc, out, err = result
    assert rc == 2, (rc, out, err)
    assert err.splitlines()[-1].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def _snapshot(path: Path) -> dict[str, bytes]:
    """Every file below ``path`` (or ``path`` itself) with its bytes."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved nested LM checkpoint that records its corpus."""
    base = tmp_path_factory.mktemp("safety-src")
    corpus = write_corpus(base / "corpus.txt", 1500)
    return ckpt.save_checkpoint(base / "src", tiny_model(vocab_size=257), TOK,
                                metadata={"data": str(corpus), "val_fraction": 0.1,
                                          "seq_len": 32})


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training run of the CLI (4 steps, checkpoints at 2 and 4)."""
    base = tmp_path_factory.mktemp("safety-run")
    corpus = write_corpus(base / "corpus.txt", 1500)
    assert main(["train", *TINY_TRAIN, "--data", str(corpus), "--out", str(base / "run")]) == 0
    return base / "run"


# ----------------------------------------------------------------------------- refusing outputs
def test_extract_refuses_an_existing_out_and_keeps_it(source: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    (mine / "sub" / "data.bin").write_bytes(b"\x00\x01")
    a_file = tmp_path / "model.txt"
    a_file.write_text("keep me")
    before = _snapshot(tmp_path)
    _refused(_run(capsys, "extract", source, "--granularity", "S", "--out", mine),
             f"output {mine} already exists", "--force")
    _refused(_run(capsys, "extract", source, "--granularity", "S", "--out", a_file),
             f"--out {a_file} is an existing file")
    assert _snapshot(tmp_path) == before  # nothing deleted, nothing added

    (tmp_path / "empty").mkdir()  # nothing to lose: used as it is
    assert _run(capsys, "extract", source, "--granularity", "S", "--out", tmp_path / "empty")[0] == 0
    for out in (mine,):  # asked for: replaced as a whole (a file is never a checkpoint's --out)
        rc, _, err = _run(capsys, "extract", source, "--granularity", "S", "--out", out, "--force")
        assert rc == 0, err
        assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors",
                                                   "tokenizer.json", "manifest.json"}
        assert families.load_checkpoint(out)[0].config.ffn_dims == (8, 8)
    assert _hidden(tmp_path) == []  # no temporary or moved-aside directory left behind


def test_the_input_is_never_the_output(source: Path, lm_run: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(lm_run, run)
    before = _snapshot(run), _snapshot(source)
    latest = ckpt.resolve(run)
    for src, out in ((source, source), (source, source.parent), (run, run), (run, latest),
                     (run, run / "checkpoints"), (latest, run)):
        _refused(_run(capsys, "extract", src, "--granularity", "S", "--out", out, "--force"),
                 "is the input", "--force does not allow this")
    _refused(_run(capsys, "import-hf", run, "--out", run, "--force"), "is the input")
    _refused(_run(capsys, "export-hf", run, "--out", latest, "--force"), "is the input")
    assert (_snapshot(run), _snapshot(source)) == before
    ckpt.verify(latest)


def test_atomic_output_failure_keeps_the_old_target(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_output(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("half")
        raise RuntimeError("boom")
    assert _snapshot(target) == {"old.txt": b"old"} and _hidden(tmp_path) == []
    with atomic_output(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _snapshot(target) == {"new.txt": b"new"} and _hidden(tmp_path) == []
    with pytest.raises(OutputExistsError, match="already exists"), atomic_output(target):
        pass


def test_clean_leftovers_restores_a_target_caught_between_renames(tmp_path: Path) -> None:
    (tmp_path / ".step_000002.old-7-abc").mkdir()  # the only copy: renamed back
    (tmp_path / ".step_000002.old-7-abc" / "f").write_text("kept")
    (tmp_path / "step_000004").mkdir()
    (tmp_path / ".step_000004.old-7-def").mkdir()  # its target exists: stale
    (tmp_path / ".step_000006.tmp-xyz").mkdir()  # never finished
    done = clean_leftovers(tmp_path, ".step_*")
    assert len(done) == 3 and _hidden(tmp_path) == []
    assert (tmp_path / "step_000002" / "f").read_text() == "kept"


@pytest.mark.parametrize("heads", [False, True])
def test_export_hf_force_leaves_no_stale_files(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               heads: bool) -> None:
    pytest.importorskip("transformers")
    model = tiny_model(vocab_size=257, n_head=4, nest_heads=heads)
    src = ckpt.save_checkpoint(tmp_path / "src", model, TOK)
    hf = tmp_path / "hf"
    assert _run(capsys, "export-hf", src, "--out", hf)[0] == 0  # XL
    # A sharded export of other weights left its index: import-hf would follow it.
    shutil.copy(hf / "model.safetensors", hf / "model-00001-of-00001.safetensors")
    (hf / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00001.safetensors"}}))
    before = _snapshot(hf)
    _refused(_run(capsys, "export-hf", src, "--granularity", "S", "--out", hf), "already exists")
    assert _snapshot(hf) == before
    rc, out, err = _run(capsys, "export-hf", src, "--granularity", "S", "--out", hf, "--force",
                        "--check", "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert info["check_max_abs_logit_diff"] < 1e-5  # against what eval measures for S
    names = {p.name for p in hf.iterdir()}
    assert "model.safetensors.index.json" not in names and not any("00001" in n for n in names)
    assert _run(capsys, "import-hf", hf, "--out", tmp_path / "back")[0] == 0
    back, _ = families.load_checkpoint(tmp_path / "back")
    x = random_tokens(1, 9, vocab=257)
    with torch.no_grad():
        want = model(x, widths="S")  # S's nested heads when heads are nested
        torch.testing.assert_close(back(x), want, rtol=0, atol=1e-5)
    _refused(_run(capsys, "import-hf", hf, "--out", tmp_path / "back"), "already exists")


# ----------------------------------------------------------------------------- head nesting
def test_head_nested_extract_ships_what_eval_measures(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_model(vocab_size=257, n_head=8, n_kv_head=4, nest_heads=True, seed=4).eval()
    x = random_tokens(2, 12, vocab=257)
    sub = extract(model, "S").eval()
    with torch.no_grad():
        want, all_heads = model(x, widths="S"), model(x, widths=model.submodel("S").widths)
        torch.testing.assert_close(sub(x), want, rtol=0, atol=1e-5)
        assert (sub(x) - all_heads).abs().max() > 1e-3  # the heads do matter

    corpus = write_corpus(tmp_path / "corpus.txt", 1500)
    src = ckpt.save_checkpoint(tmp_path / "src", model, TOK, metadata={
        "data": str(corpus), "val_fraction": 0.1, "seq_len": 32})
    rc, out, err = _run(capsys, "extract", src, "--granularity", "S", "--out", tmp_path / "S",
                        "--json")
    assert rc == 0, err
    assert json.loads(out)["heads"] == [2, 2]
    assert ckpt.read_metadata(tmp_path / "S")["origin"]["heads"] == [2, 2]
    losses = []
    for path, extra in ((src, ["--granularity", "S"]), (tmp_path / "S", [])):
        rc, out, err = _run(capsys, "eval", path, "--json", "--batches", "2", *extra)
        assert rc == 0, err
        losses.append(json.loads(out)["results"][0]["val_loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


# ----------------------------------------------------------------------------- train --out
def test_train_refuses_a_directory_that_is_not_a_fresh_run(
        source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = write_corpus(tmp_path / "corpus.txt", 1500)
    extracted = tmp_path / "extracted"
    shutil.copytree(source, extracted)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    stale = tmp_path / "stale"  # checkpoints of some run, but no latest
    ckpt.save_checkpoint(stale / "checkpoints" / "step_000500", tiny_model(), TOK)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    before = _snapshot(tmp_path)
    for out, why in ((extracted, "config.json"), (mine, "thesis.tex"),
                     (stale, "holds checkpoints (step 500 the newest) but no latest"),
                     (a_file, "is an existing file")):
        _refused(_run(capsys, "train", *TINY_TRAIN, "--data", corpus, "--out", out), why)
    assert _snapshot(tmp_path) == before
    ckpt.verify(extracted)  # its tokenizer.json still matches its checksum

    lookalike = tmp_path / "lookalike"  # the user's files with run-like names: not a run
    lookalike.mkdir()
    (lookalike / "metrics.jsonl").write_text("my own metrics\n")
    (lookalike / "tokenizer.json").write_text("my own tokenizer")
    before = _snapshot(tmp_path)
    _refused(_run(capsys, "train", *TINY_TRAIN, "--data", corpus, "--out", lookalike),
             "not a training run")
    assert _snapshot(tmp_path) == before

    killed = tmp_path / "killed"  # a run killed before its first checkpoint starts afresh
    killed.mkdir()
    (killed / "matformer_run.json").write_text('{"matformer_run": 1}\n')  # written first
    (killed / "metrics.jsonl").write_text('{"step": 1, "loss": {"S": 9}}\n{"step": 2')
    (killed / "tokenizer.json").write_text("{}")
    rc, _, err = _run(capsys, "train", *TINY_TRAIN, "--data", corpus, "--out", killed)
    assert rc == 0, err
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- pruning
def test_pruning_follows_the_runs_own_history(tmp_path: Path) -> None:
    for step in (500, 600):  # higher-numbered checkpoints of an earlier attempt, no latest
        ckpt.save_checkpoint(tmp_path / "checkpoints" / f"step_{step:06d}", tiny_model(), TOK)
    for step in (2, 4, 6):
        path = RunDir(tmp_path).save_checkpoint(step, tiny_model(seed=step), TOK,
                                        {"step": step}, keep=2)
        assert ckpt.resolve(tmp_path) == path  # latest's target is never pruned
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_000004", "step_000006", "step_000500", "step_000600"]
    (tmp_path / "latest").write_text("checkpoints/step_000004\n")  # a rollback
    RunDir(tmp_path).save_checkpoint(5, tiny_model(), TOK, {"step": 5}, keep=1)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_000005", "step_000006", "step_000500", "step_000600"]


def _trainer(run_dir: Path, **kw: object) -> Trainer:
    cfg = TrainConfig(**{**dict(steps=8, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=2,
                                eval_interval=1000, eval_batches=1, ckpt_interval=2,
                                precision="fp32", data="pattern"), **kw})
    return Trainer(tiny_model(seed=0), LMTask(pattern_dataset(), TOK, 16), cfg, run_dir,
                   progress=False)


def test_leftovers_of_interrupted_writes_are_cleaned_on_resume(tmp_path: Path) -> None:
    _trainer(tmp_path, steps=4).fit()
    cdir = tmp_path / "checkpoints"
    (cdir / ".step_000006.tmp-abc").mkdir()
    (cdir / ".step_000006.tmp-abc" / "model.safetensors").write_bytes(b"half")
    (cdir / ".step_000004.old-99-deadbeef").mkdir()
    (tmp_path / ".latest.tmp").write_text("checkpoints/step_000006\n")
    resumed = _trainer(tmp_path)
    resumed.resume()
    resumed.fit()
    assert _hidden(cdir) == [] and _hidden(tmp_path) == []
    assert sorted(p.name for p in cdir.iterdir()) == ["step_000006", "step_000008"]


# ----------------------------------------------------------------------------- divergence
def _all_finite(run_dir: Path) -> bool:
    return all(torch.isfinite(t).all() for d in (run_dir / "checkpoints").glob("step_*")
               for t in families.load_checkpoint(d)[0].state_dict().values())


def test_non_finite_loss_aborts_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteError, match=r"diverged at step 2: .* is nan.*last good "
                                             r"checkpoint is kept: .*step_000001") as info:
        _trainer(tmp_path / "lr", lr=1e30, ckpt_interval=1).fit()
    assert isinstance(info.value, ValueError)  # the CLI reports it as an error
    assert ckpt.resolve(tmp_path / "lr").name == "step_000001" and _all_finite(tmp_path / "lr")
    with pytest.raises(ValueError, match=r"weight_decay=nan"):  # refused before training
        _trainer(tmp_path / "wd", weight_decay=math.nan, ckpt_interval=1)
    trainer = _trainer(tmp_path / "w", ckpt_interval=1)

    def poison(step: int, record: dict) -> None:  # weights go bad after a finite step
        with torch.no_grad():
            next(trainer.raw.parameters()).fill_(math.nan)

    trainer.on_step = poison
    with pytest.raises(NonFiniteError, match=r"weights became NaN .*not saved"):
        trainer.fit()
    assert not (tmp_path / "w" / "latest").exists()
    assert list((tmp_path / "w" / "checkpoints").glob("*")) == []


@pytest.mark.parametrize("flags", [["--lr", "1e30"], ["--weight-decay", "nan"], ["--lr", "inf"]])
def test_cli_training_never_saves_a_non_finite_checkpoint(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str]) -> None:
    corpus = write_corpus(tmp_path / "corpus.txt", 1500)
    run = tmp_path / "run"
    rc, _, err = _run(capsys, "train", *TINY_TRAIN, "--ckpt-interval", "1", *flags,
                      "--data", corpus, "--out", run)
    _refused((rc, "", err))  # refused up front, or stopped with the step it diverged at
    assert "diverged" in err or flags[0] in err
    if (run / "checkpoints").exists():
        assert _all_finite(run)


# ----------------------------------------------------------------------------- data identity
def test_runs_record_absolute_data_and_notice_changed_data(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    corpus = write_corpus(tmp_path / "c.txt", 1500)
    assert _run(capsys, "train", *TINY_TRAIN, "--data", "c.txt", "--out", "run")[0] == 0
    run = tmp_path / "run"
    assert json.loads((run / "train_config.json").read_text())["data"] == str(corpus)
    meta = ckpt.read_metadata(run)
    assert meta["data"] == str(corpus)
    assert meta["data_sha256"] == hashlib.sha256(b"matformer-corpus-v1\0" + len(
        corpus.read_bytes()).to_bytes(8, "little") + corpus.read_bytes()).hexdigest()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # another working directory: same data
    rc, _, err = _run(capsys, "eval", run, "--batches", "1")
    assert rc == 0, err

    write_corpus(corpus, 1500, seed=1)  # the corpus changed under the run
    _refused(_run(capsys, "eval", run, "--batches", "1"), "has changed since the checkpoint",
             "--data")
    assert _run(capsys, "eval", run, "--batches", "1", "--data", corpus)[0] == 0
    _refused(_run(capsys, "train", "--out", run, "--resume", "--steps", "6"), "has changed")


def _png(path: Path, size: int, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (size, size), value).save(path)


def _images(root: Path, classes: tuple[str, ...], n: int = 4) -> Path:
    for c, name in enumerate(classes):
        for i in range(n):
            _png(root / name / f"{i}.png", 8, 40 + 60 * c + i)
    return root


def test_vision_checkpoints_refuse_other_classes(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    train = _images(tmp_path / "pets", ("cat", "dog"))
    other = _images(tmp_path / "bugs", ("ant", "bee"))
    more = _images(tmp_path / "zoo", ("ant", "bee", "cat"))
    run = tmp_path / "vit"
    rc, _, err = _run(capsys, "vision", "train", "--data", train, "--preset", "vit-tiny",
                      "--steps", "2", "--batch-size", "4", "--no-progress", "--out", run)
    assert rc == 0, err
    assert ckpt.read_metadata(run)["classes"] == ["cat", "dog"]
    assert ckpt.read_metadata(run)["data"] == str(train)
    assert _run(capsys, "vision", "eval", run)[0] == 0
    for data in (other, more):
        _refused(_run(capsys, "vision", "eval", run, "--data", data),
                 "was trained on the classes ['cat', 'dog']")


def test_decompression_bombs_are_refused_or_skipped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    from PIL import Image

    from matformer.vision.data import load_images

    root = _images(tmp_path / "imgs", ("a", "b"))
    _png(root / "a" / "bomb.png", 32, 0)  # 1,024 pixels: over twice the limit set below
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValueError, match=r"bomb\.png: it is too large to decode safely"):
        load_images(str(root), 8, 1)
    with caplog.at_level(logging.WARNING):
        data = load_images(str(root), 8, 1, skip_unreadable=True)
    assert len(data.train_y) + len(data.val_y) == 8 and "bomb.png" in caplog.text
    _refused(_run(capsys, "vision", "train", "--data", root, "--preset", "vit-tiny", "--steps",
                  "1", "--no-progress", "--out", tmp_path / "r"), "too large to decode safely",
             "--skip-unreadable")


# ----------------------------------------------------------------------------- damaged files
def test_full_disk_during_a_checkpoint_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    corpus = write_corpus(tmp_path / "corpus.txt", 1500)
    real, calls = ckpt.save_model, []

    def fill_the_disk(model: torch.nn.Module, filename: str) -> None:
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(model, filename)

    monkeypatch.setattr(ckpt, "save_model", fill_the_disk)
    run = tmp_path / "run"
    _refused(_run(capsys, "train", *TINY_TRAIN, "--data", corpus, "--out", run),
             f"no space left on device writing {run / 'checkpoints' / 'step_000004'}"
             "/model.safetensors")
    assert ckpt.resolve(run).name == "step_000002"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002"]
    ckpt.verify(run / "checkpoints" / "step_000002")


def test_damaged_run_files_give_clear_errors(lm_run: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    def copy(name: str) -> tuple[Path, Path]:
        run = tmp_path / name
        shutil.copytree(lm_run, run)
        return run, ckpt.resolve(run)

    run, last = copy("dir-latest")
    (run / "latest").unlink()
    (run / "latest").mkdir()
    _refused(_run(capsys, "eval", run), f"{run / 'latest'} should be a file")
    _refused(_run(capsys, "train", "--out", run, "--resume"), "should be a file")

    run, last = copy("no-file-list")
    (last / "manifest.json").write_text(json.dumps({"metadata": {}}))
    _refused(_run(capsys, "eval", run), f"{last / 'manifest.json'} has no file list")

    run, last = copy("corrupt-state")
    state = last / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    _refused(_run(capsys, "train", "--out", run, "--resume"),
             f"{state} does not match its checksum")
    manifest = json.loads((last / "manifest.json").read_text())  # a consistent but bad file
    manifest["files"]["train_state.pt"] = hashlib.sha256(state.read_bytes()).hexdigest()
    (last / "manifest.json").write_text(json.dumps(manifest))
    _refused(_run(capsys, "train", "--out", run, "--resume"), f"cannot read {state}")


def test_import_hf_of_a_damaged_folder_is_a_clear_error(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    src = ckpt.save_checkpoint(tmp_path / "src", tiny_model(vocab_size=257), TOK)
    hf = tmp_path / "hf"
    assert _run(capsys, "export-hf", src, "--out", hf)[0] == 0
    weights = hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    _refused(_run(capsys, "import-hf", hf, "--out", tmp_path / "a"), f"cannot read weights {weights}")
    (hf / "model.safetensors.index.json").write_text("{}")
    _refused(_run(capsys, "import-hf", hf, "--out", tmp_path / "b"), "not a valid safetensors index")
    config = json.loads((hf / "config.json").read_text())
    del config["rms_norm_eps"]
    (hf / "config.json").write_text(json.dumps(config))
    _refused(_run(capsys, "import-hf", hf, "--out", tmp_path / "c"), "lacks ['rms_norm_eps']")
    assert not any((tmp_path / n).exists() for n in "abc")
