"""Second pass on never losing or silently corrupting a user's data: empty corpus specs, file
permissions, text that is not Unicode, timings of every generation path, OpenAI fields the
server does not implement. Each case runs through ``matformer.cli.main`` or the HTTP server."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from helpers import tiny_model, write_corpus

from matformer import checkpoint as ckpt
from matformer.cli import main
from matformer.corpora import load_corpus
from matformer.tokenizer import InvalidTextError, Tokenizer


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    corpus = write_corpus(tmp_path / "corpus.txt", n_words=1000)
    return ckpt.save_checkpoint(tmp_path / "m", tiny_model(vocab_size=257),
                                Tokenizer.byte_level(),
                                metadata={"data": str(corpus), "seq_len": 32})


def test_an_empty_corpus_spec_is_an_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "private.txt").write_text("not for training")
    for spec in ("", "   "):
        with pytest.raises(ValueError, match="empty"):
            load_corpus(spec)
        rc, _, err = _run(capsys, "train", "--preset", "tiny", "--data", spec, "--steps", "1",
                          "--out", tmp_path / "run")
        assert rc == 2 and "corpus spec" in err and "empty" in err, err
    assert not (tmp_path / "run").exists()


def test_checkpoint_files_get_the_umask_modes(tmp_path):
    old = os.umask(0o022)
    try:
        path = ckpt.save_checkpoint(tmp_path / "c", tiny_model(vocab_size=257),
                                    Tokenizer.byte_level())
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()}
    assert modes[ckpt.WEIGHTS] == 0o644 and set(modes.values()) == {0o644}, modes


def test_text_that_is_not_unicode_is_one_line_error(model_dir, capsys):
    with pytest.raises(InvalidTextError, match="lone surrogate"):
        Tokenizer.byte_level().encode("ok \ud800")
    bad = b"\xff\xfe".decode("utf-8", "surrogateescape")  # what argv makes of such bytes
    rc, _, err = _run(capsys, "generate", model_dir, "--prompt", bad, "--max-new-tokens", "2")
    assert rc == 2 and "lone surrogate" in err and "Traceback" not in err, err


def test_generate_stats_time_every_path(model_dir, capsys):
    """A prompt and generation longer than the context takes the uncached sliding-window
    path: it is timed like the others (it once printed 0.00s)."""
    rc, out, _ = _run(capsys, "generate", model_dir, "--prompt", "x" * 40, "--max-new-tokens",
                      "8", "--json", "--stats")
    assert rc == 0
    stats = json.loads(out)["stats"]
    assert stats["new_tokens"] == 8 and stats["seconds"] > 0
    assert stats["tokens_per_second"] == pytest.approx(8 / stats["seconds"])


def test_elastify_records_its_corpora_absolute(tmp_path, capsys, monkeypatch):
    """Relative corpus paths are stored absolute, so eval and --resume work from anywhere."""
    pytest.importorskip("transformers")
    from matformer.submodels.hf import export_hf

    export_hf(tiny_model(vocab_size=257, ratios=(1.0,), names=("XL",)), Tokenizer.byte_level(),
              tmp_path / "hf")
    write_corpus(tmp_path / "a.txt", n_words=1500)
    write_corpus(tmp_path / "b.txt", n_words=800, seed=3)
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run(capsys, "--threads", "1", "elastify", "hf", "--out", "e", "--data",
                        "a.txt", "--eval-data", "b.txt", "--steps", "2", "--batch-size", "2",
                        "--seq-len", "16", "--eval-batches", "1", "--precision", "fp32",
                        "--no-progress", "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["data"] == str(tmp_path / "a.txt")
    assert rep["eval_data"]["data"] == str(tmp_path / "b.txt")
    saved = json.loads((tmp_path / "e" / "train_config.json").read_text())
    assert saved["data"] == str(tmp_path / "a.txt")
    monkeypatch.chdir(tmp_path / "e")
    assert main(["eval", str(tmp_path / "e"), "--batches", "1"]) == 0


def test_serve_refuses_what_it_would_ignore_and_invalid_text(model_dir):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from test_serve import Running

    running = Running(model_dir, measure_latency=False)
    try:
        def post(path: str, body: dict) -> httpx.Response:
            return httpx.post(running.url + path, json={"model": "tiny-XL", **body}, timeout=30)

        for field, value in (("logprobs", 2), ("echo", True), ("best_of", 3),
                             ("top_logprobs", 1), ("logit_bias", {"1": 5})):
            r = post("/v1/completions", {"prompt": "hi", field: value})
            assert r.status_code == 400, (field, r.text)
            assert r.json()["error"]["param"] == field
        r = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                          "logprobs": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
        for field, value in (("logprobs", None), ("echo", False), ("best_of", 1),
                             ("presence_penalty", 0.0)):  # asking for nothing is fine
            r = post("/v1/completions", {"prompt": "hi", "max_tokens": 2, field: value})
            assert r.status_code == 200, (field, r.text)
        raw = '{"model": "tiny-XL", "prompt": "a \\ud800 b", "max_tokens": 2}'
        r = httpx.post(running.url + "/v1/completions", content=raw, timeout=30,
                       headers={"content-type": "application/json"})
        assert r.status_code == 400 and "lone surrogate" in r.json()["error"]["message"]
        raw = ('{"model": "tiny-XL", "max_tokens": 2, "messages": [{"role": "user", '
               '"content": "\\udfff"}]}')
        r = httpx.post(running.url + "/v1/chat/completions", content=raw, timeout=30,
                       headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    finally:
        running.stop()


def test_untrained_widths_need_any_width_everywhere(model_dir, capsys):
    """One rule for every command that takes --widths: eval and consistency refuse a width
    outside the nested set (as export-hf, export-gguf and mixnmatch do) unless --any-width."""
    for cmd in (["eval", model_dir, "--widths", "17"],
                ["consistency", model_dir, "--widths", "17"],
                ["generate", model_dir, "--widths", "17", "--max-new-tokens", "2"]):
        extra = [] if cmd[0] == "generate" else ["--batches", "1", "--batch-size", "2"]
        rc, _, err = _run(capsys, *cmd, *extra)
        assert rc == 2 and "not in the nested set" in err and "--any-width" in err, err
        rc, _, err = _run(capsys, *cmd, *extra, "--any-width")
        assert rc == 0, err


def test_reproduce_refuses_a_recipe_named_twice(tmp_path, capsys):
    rc, _, err = _run(capsys, "reproduce", "--recipes", "sample,sample", "--out",
                      tmp_path / "r")
    assert rc == 2 and "sample more than once" in err, err
    assert not (tmp_path / "r").exists()


def test_a_dangling_latest_link_is_named(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / ckpt.LATEST).symlink_to(run / "checkpoints" / "step_000009")
    rc, _, err = _run(capsys, "eval", run)
    assert rc == 2 and "dangling" in err and "step_000009" in err, err


def test_damaged_resume_state_does_not_block_the_weights(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.txt", n_words=800)
    path = ckpt.save_checkpoint(tmp_path / "m", tiny_model(vocab_size=257), Tokenizer.byte_level(),
                                train_state={"step": 3},
                                metadata={"data": str(corpus), "seq_len": 32})
    (path / ckpt.TRAIN_STATE).write_bytes(b"damaged")
    rc, _, err = _run(capsys, "eval", path, "--batches", "1")
    assert rc == 0, err
    rc, _, err = _run(capsys, "generate", path, "--max-new-tokens", "2")
    assert rc == 0, err
    with pytest.raises(ckpt.CheckpointError, match="checksum"):
        ckpt.load_train_state(path)  # a resume still refuses it


def test_serve_on_a_busy_port_says_so_before_anything_else(model_dir, capsys):
    pytest.importorskip("uvicorn")
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        rc, _, err = _run(capsys, "serve", model_dir, "--port", port, "--no-measure")
    assert rc == 2 and f"cannot listen on 127.0.0.1:{port}" in err, err
    assert "serving" not in err


def test_wide_grayscale_images_keep_their_values(tmp_path):
    """16-bit PNGs and float TIFFs are scaled by their own range (Pillow's 8-bit conversion
    clipped every pixel to 255); values outside the range are refused by name."""
    import numpy as np
    from PIL import Image

    from matformer.vision.data import load_image_folder

    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    for cls, flip in (("a", False), ("b", True)):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        values = ramp[:, ::-1] if flip else ramp
        for i in range(3):
            Image.fromarray((values * 65535).astype(np.uint16)).save(
                tmp_path / "imgs" / cls / f"{i}.png")
            Image.fromarray(values.copy()).save(tmp_path / "imgs" / cls / f"{i}.tiff")
    with Image.open(tmp_path / "imgs" / "a" / "0.png") as im:
        assert im.mode.startswith("I")  # a wide mode indeed
    data = load_image_folder(tmp_path / "imgs", image_size=8, channels=1, val_fraction=0.5)
    images = torch.cat([data.train_x, data.val_x])
    for x in images:
        img = x[0].numpy()
        assert np.allclose(img, ramp, atol=2e-3) or np.allclose(img, ramp[:, ::-1], atol=2e-3)
    rgb = load_image_folder(tmp_path / "imgs", image_size=8, channels=3, val_fraction=0.5)
    assert torch.equal(rgb.train_x[:, 0], rgb.train_x[:, 2])
    Image.fromarray(ramp * 3).save(tmp_path / "imgs" / "a" / "hot.tiff")
    with pytest.raises(ValueError, match=r"hot\.tiff.*floats span 0\.\.3"):
        load_image_folder(tmp_path / "imgs", image_size=8, channels=1)


def test_a_full_disk_is_named_by_every_writer(model_dir, tmp_path, capsys, monkeypatch):
    """export-hf (safetensors' own error text), export-gguf (a short write without an errno,
    on a file system with no space left) and a checkpoint all say "no space left on device
    writing PATH", and leave nothing behind."""
    from safetensors import SafetensorError

    import matformer.outputs as outputs
    from matformer.submodels import hf

    pytest.importorskip("transformers")

    def full_safetensors(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(hf, "save_file", full_safetensors)
    rc, _, err = _run(capsys, "export-hf", model_dir, "--out", tmp_path / "hf")
    assert rc == 2 and f"no space left on device writing {tmp_path / 'hf'}" in err, err
    assert "Traceback" not in err and not (tmp_path / "hf").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    pytest.importorskip("gguf")
    import gguf

    def short_write(self, *args, **kwargs):
        raise OSError("1048576 requested and 492160 written")

    class Full:
        f_bavail, f_frsize = 0, 4096

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", short_write)
    monkeypatch.setattr(outputs.os, "statvfs", lambda path: Full())
    rc, _, err = _run(capsys, "export-gguf", model_dir, "--out", tmp_path / "m.gguf")
    assert rc == 2 and f"no space left on device writing {tmp_path / 'm.gguf'}" in err, err
    assert not (tmp_path / "m.gguf").exists()


def test_missing_parent_folders_of_an_output_are_created(model_dir, tmp_path, capsys):
    """One rule for every output path: missing parent folders are created (docs/guarantees)."""
    pytest.importorskip("gguf")
    for argv in (["export-gguf", model_dir, "--out", tmp_path / "a" / "b" / "m.gguf"],
                 ["extract", model_dir, "--granularity", "S", "--out", tmp_path / "c" / "d"],
                 ["export-hf", model_dir, "--out", tmp_path / "e" / "f"]):
        rc, _, err = _run(capsys, *argv)
        assert rc == 0, (argv, err)
        assert Path(argv[-1]).exists()
