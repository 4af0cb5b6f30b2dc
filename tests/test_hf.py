"""Export to / import from Hugging Face transformers: same logits, stock loaders, no remote code."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import random_tokens, tiny_model

from matformer import checkpoint as ckpt
from matformer import families
from matformer.cli import main
from matformer.submodels.hf import ExportError, export_hf, import_hf
from matformer.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

TOK = Tokenizer.byte_level()


def _model(**overrides):
    kw = dict(vocab_size=257, n_layer=3, n_head=4, d_model=32, rope_theta=500.0, norm_eps=1e-6)
    return tiny_model(**{**kw, **overrides}).eval()


def _hf_logits(folder, x):
    hf = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert hf.dtype == torch.float32
    with torch.no_grad():
        return hf, hf(x).logits


@pytest.mark.parametrize(("overrides", "widths", "arch"), [
    ({}, None, "LlamaForCausalLM"),
    ({"n_kv_head": 2, "tie_embeddings": False}, "M", "LlamaForCausalLM"),
    ({}, (8, 64, 16), "LlamaForCausalLM"),
    ({"activation": "relu2", "n_kv_head": 1}, (64, 8, 32), "ArceeForCausalLM"),
    ({"activation": "gelu"}, "S", "ArceeForCausalLM"),
])
def test_round_trip_logits(tmp_path, overrides, widths, arch):
    model = _model(**overrides)
    info = export_hf(model, TOK, tmp_path / "hf", widths=widths)
    assert info["architecture"] == arch
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "auto_map" not in config  # stock architecture, no trust_remote_code
    x = random_tokens(2, 24, vocab=257)
    hf, got = _hf_logits(tmp_path / "hf", x)
    assert type(hf).__name__ == arch
    with torch.no_grad():
        ref = model(x, widths=widths)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    ws = model.submodel(widths).widths
    assert info["padded"] == (len(set(ws)) > 1)
    assert hf.config.intermediate_size == max(ws)
    back, tok = import_hf(tmp_path / "hf")  # padding trimmed: the per-layer model comes back
    assert back.config.ffn_dims == ws and tok == TOK
    with torch.no_grad():
        torch.testing.assert_close(back(x), ref, rtol=0, atol=1e-6)
    assert back.num_params() == model.num_params(widths)


def test_hf_tokenizer_loads_and_matches(tmp_path):
    export_hf(_model(), TOK, tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "ROMEO. But soft, what light through yonder window breaks?\n"
    assert hf_tok(text)["input_ids"] == TOK.encode(text)
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == TOK.eos_id
    assert hf_tok.decode(TOK.encode(text)) == text


def test_hf_generate_matches_greedy(tmp_path):
    model = _model()
    export_hf(model, TOK, tmp_path / "hf", widths="M")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    x = random_tokens(1, 5, vocab=257)
    out = hf.generate(x, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    ids = x
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids, widths="M")[:, -1:].argmax(-1)], dim=1)
    assert out.tolist() == ids.tolist()


def test_export_errors(tmp_path):
    model = _model()
    with pytest.raises(ExportError, match="one intermediate_size"):
        export_hf(model, TOK, tmp_path / "a", widths=(8, 16, 64), pad=False)
    export_hf(model, TOK, tmp_path / "ok")
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    for change, match in (({"model_type": "gpt2"}, "not a Llama/Arcee"),
                          ({"attention_bias": True}, "attention_bias"),
                          ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4,
                                                "factor": 2.0}}, "rope_type=linear")):
        (tmp_path / "ok" / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ExportError, match=match):
            import_hf(tmp_path / "ok")


def test_cli_export_check_and_import(tmp_path, capsys):
    model = _model()
    src = ckpt.save_checkpoint(tmp_path / "src", model, TOK)
    hf_dir = tmp_path / "hf"
    assert main(["export-hf", str(src), "--widths", "8,64,16", "--out", str(hf_dir),
                 "--check"]) == 0
    text = capsys.readouterr().out
    assert "zero-padded" in text and "no speed gain" in text and "max abs diff" in text
    assert main(["export-hf", str(src), "--granularity", "L", "--out", str(hf_dir),
                 "--check", "--json", "--force"]) == 0  # replaces the folder as a whole
    info = json.loads(capsys.readouterr().out)
    assert info["check_max_abs_logit_diff"] < 1e-5 and not info["padded"]
    assert main(["export-hf", str(src), "--widths", "8,64,16", "--no-pad",
                 "--out", str(tmp_path / "x")]) == 2
    assert "one intermediate_size" in capsys.readouterr().err
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "back"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["widths"] == [32, 32, 32]
    back, _ = families.load_checkpoint(tmp_path / "back")
    x = random_tokens(1, 9, vocab=257)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x, widths="L"), rtol=0, atol=1e-6)
