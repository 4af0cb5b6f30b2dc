"""Depth elasticity: width 0 skips a layer's FFN in the model, extract, checkpoints and exports."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import random_tokens, tiny_model

from matformer import checkpoint as ckpt
from matformer.cli import main
from matformer.families import load_checkpoint
from matformer.generate import generate
from matformer.submodels import candidates as mm
from matformer.submodels.extract import extract
from matformer.tokenizer import Tokenizer

WIDTHS = (8, 0, 16)


def _model():
    return tiny_model(vocab_size=257, n_layer=3, init_std=0.2).eval()


def _zeroed(model, layer: int):
    """A copy whose FFN at ``layer`` outputs exactly 0 (down projection zeroed)."""
    z = copy.deepcopy(model)
    with torch.no_grad():
        z.blocks[layer].ffn.down_proj.weight.zero_()
    return z


def test_skip_equals_a_zero_ffn_in_forward_and_cached_decoding():
    model = _model()
    ref = _zeroed(model, 1)
    full = (8, 64, 16)
    x = random_tokens(2, 20, vocab=257)
    with torch.no_grad():
        torch.testing.assert_close(model(x, widths=WIDTHS), ref(x, widths=full), rtol=0, atol=0)
        a = generate(model, x[:, :5], 12, widths=WIDTHS, temperature=0.0)
        b = generate(ref, x[:, :5], 12, widths=full, temperature=0.0)
    assert torch.equal(a, b)


def test_extract_save_load_with_a_skipped_ffn(tmp_path):
    model = _model()
    assert mm.check_widths(model.config, WIDTHS) == WIDTHS  # allowed without any_width
    assert mm.describe(model.config, WIDTHS) == "S+0+M"
    sub = extract(model, WIDTHS)
    assert sub.config.d_ff == WIDTHS and sub.config.ffn_widths(0) == WIDTHS
    assert sub.num_params() == model.num_params(WIDTHS) < model.num_params((8, 1, 16))
    ckpt.save_checkpoint(tmp_path / "sub", sub, Tokenizer.byte_level())
    back = load_checkpoint(tmp_path / "sub")[0]
    x = random_tokens(1, 16, vocab=257)
    with torch.no_grad():
        assert torch.equal(back(x), model(x, widths=WIDTHS))


def test_bad_depth_widths():
    model = _model()
    with pytest.raises(ValueError, match=r"allowed 0\.\.64 \(0 skips the layer's FFN\)"):
        model(random_tokens(1, 4, vocab=257), widths=(8, -1, 16))
    with pytest.raises(ValueError, match="at least one > 0"):
        model.config.replace(d_ff=(0, 0, 0), ratios=(1.0,), names=("x",))


def test_cli_extract_with_a_skipped_ffn(tmp_path, capsys):
    ckpt.save_checkpoint(tmp_path / "run", _model(), Tokenizer.byte_level())
    assert main(["extract", str(tmp_path / "run"), "--widths", "8,0,16",
                 "--out", str(tmp_path / "sub")]) == 0
    assert "FFN widths 8,0,16" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "sub")[0].config.ffn_dims == WIDTHS


def test_export_hf_pads_a_skipped_ffn_exactly(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from matformer.submodels.hf import export_hf, import_hf

    model = _model()
    info = export_hf(model, Tokenizer.byte_level(), tmp_path / "hf", widths=WIDTHS)
    assert info["padded"]
    x = random_tokens(1, 16, vocab=257)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        ref = model(x, widths=WIDTHS)
        torch.testing.assert_close(hf(x).logits, ref, rtol=0, atol=1e-5)
        back = import_hf(tmp_path / "hf")[0]
        assert back.config.ffn_dims == WIDTHS
        torch.testing.assert_close(back(x), ref, rtol=0, atol=1e-6)
