"""Depth elasticity: width 0 skips a layer's FFN in the model, extract, checkpoints and exports."""

from __future__ import annotations

import copy
import importlib.util

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


# ----------------------------------------------------------------------------- skipped attention
HEADS = (4, 0, 4)  # the middle layer skips its attention


def _model4(**overrides):
    kw = dict(vocab_size=257, n_layer=3, n_head=4, d_model=32, d_ff=64, max_seq_len=64,
              rope_theta=500.0, norm_eps=1e-6, init_std=0.2)
    return tiny_model(**{**kw, **overrides}).eval()


def test_skipped_attention_passes_the_residual_to_the_ffn():
    model = _model4()
    block = model.blocks[1]
    x = torch.randn(2, 7, 32)
    at = model.positions(7, None, 0)
    with torch.no_grad():
        ref = x + block.ffn(block.ffn_norm(x))
        torch.testing.assert_close(block(x, at, 64, 0), ref, rtol=0, atol=0)
        # the whole model: as if the layer's attention output were exactly 0
        zeroed = copy.deepcopy(model)
        zeroed.blocks[1].attn.o_proj.weight.zero_()
        ids = random_tokens(2, 20, vocab=257)
        skipped = model.submodel(None, HEADS)
        torch.testing.assert_close(model(ids, widths=skipped), zeroed(ids), rtol=0, atol=0)
        a = generate(model, ids[:, :5], 12, widths=model.submodel(WIDTHS, HEADS),
                     temperature=0.0)
        b = generate(zeroed, ids[:, :5], 12, widths=WIDTHS, temperature=0.0)
    assert torch.equal(a, b)


def test_runner_skips_attention_like_forward():
    from matformer.cache import KVCache
    from matformer.runner import SubmodelRunner

    model = _model4(n_kv_head=2)
    heads = (0, 4, 0)
    ids = random_tokens(1, 12, vocab=257)
    runner = SubmodelRunner(model, model.submodel(WIDTHS, heads))
    cache = KVCache.for_model(model, 1, 16)
    with torch.no_grad():
        got = torch.cat([runner(ids[:, :8], cache, 0), runner(ids[:, 8:], cache, 8)], 1)
        torch.testing.assert_close(got, model(ids, widths=model.submodel(WIDTHS, heads)))


def test_extract_skipped_attention_drops_its_weights_and_round_trips(tmp_path):
    from matformer.config import ModelConfig

    model = _model4()
    sub = extract(model, model.submodel(WIDTHS, HEADS))
    assert sub.config.skip_attention == (1,) and sub.blocks[1].attn is None
    assert not [k for k in sub.state_dict() if k.startswith(("blocks.1.attn", "blocks.1.attn_"))]
    assert sub.num_params() == model.num_params(model.submodel(WIDTHS, HEADS)) == sum(
        p.numel() for p in sub.parameters())
    assert sub.num_params() < model.num_params(WIDTHS)
    assert sub.submodel().heads == HEADS and sub.submodel(None, 4).heads == HEADS
    with pytest.raises(ValueError, match=r"layers \[1\] of this model have no attention"):
        sub.submodel(None, (4, 4, 4))
    assert ModelConfig.from_dict(sub.config.to_dict()) == sub.config
    assert "skip_attention" not in model.config.to_dict()  # unchanged files without skips
    ckpt.save_checkpoint(tmp_path / "sub", sub, Tokenizer.byte_level())
    back = load_checkpoint(tmp_path / "sub")[0]
    x = random_tokens(2, 16, vocab=257)
    with torch.no_grad():
        ref = model(x, widths=model.submodel(WIDTHS, HEADS))
        assert torch.equal(sub(x), ref) and torch.equal(back(x), ref)


def test_bad_skip_attention():
    from matformer.cli.args import parse_layers

    cfg = _model4().config
    with pytest.raises(ValueError, match=r"skip_attention=\(3,\) is invalid: must be distinct "
                       r"layer indices in 0\.\.2"):
        cfg.replace(skip_attention=(3,))
    with pytest.raises(ValueError, match=r"--skip-attention '1,1': need distinct layer indices"):
        parse_layers("1,1", 3)
    with pytest.raises(ValueError, match="expected layer indices"):
        parse_layers("a", 3)


def test_export_hf_refuses_skipped_attention(tmp_path):
    pytest.importorskip("transformers")
    from matformer.submodels.hf import ExportError, export_hf

    with pytest.raises(ExportError, match=r"skips the attention of layers \[1\].*export-gguf"):
        m = _model4()
        export_hf(m, Tokenizer.byte_level(), tmp_path / "hf", widths=m.submodel(None, HEADS))
    assert not (tmp_path / "hf").exists()


def test_gguf_refuses_what_llama_cpp_cannot_run(tmp_path):
    pytest.importorskip("gguf")
    from matformer.submodels.gguf import GGUFExportError, export_gguf

    tok = Tokenizer.byte_level()
    with pytest.raises(GGUFExportError, match="layer 0 skips its attention"):
        m = _model4()
        export_gguf(m, tok, tmp_path / "a.gguf", widths=m.submodel(None, (0, 4, 4)))
    with pytest.raises(GGUFExportError, match="only deci"):
        m = _model4(activation="relu2")
        export_gguf(m, tok, tmp_path / "c.gguf", widths=m.submodel(None, HEADS))
    assert not list(tmp_path.iterdir())


def test_cli_skip_attention_in_eval_extract_generate_and_exports(tmp_path, capsys):
    import json

    from helpers import write_corpus

    corpus = write_corpus(tmp_path / "corpus.txt", 800)
    run = ckpt.save_checkpoint(tmp_path / "run", _model4(), Tokenizer.byte_level(),
                               metadata={"data": str(corpus), "val_fraction": 0.1,
                                         "seq_len": 32})
    assert main(["eval", str(run), "--widths", "8,0,16", "--skip-attention", "1", "--batches",
                 "2", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["results"]
    assert row["heads"] == [4, 0, 4] and row["widths"] == list(WIDTHS)
    assert main(["extract", str(run), "--widths", "8,0,16", "--skip-attention", "1",
                 "--out", str(tmp_path / "sub")]) == 0
    assert "no attention in layers [1]" in capsys.readouterr().out
    sub = load_checkpoint(tmp_path / "sub")[0]
    assert sub.config.skip_attention == (1,) and sub.config.ffn_dims == WIDTHS
    assert main(["eval", str(tmp_path / "sub"), "--batches", "2", "--json"]) == 0
    loss = json.loads(capsys.readouterr().out)["results"][0]["val_loss"]
    assert loss == pytest.approx(row["val_loss"], abs=1e-5)
    if importlib.util.find_spec("gguf") is not None:  # the extracted checkpoint exports as is
        assert main(["export-gguf", str(tmp_path / "sub"), "--out", str(tmp_path / "s.gguf")]) == 0
        assert "no attention in layers [1]" in capsys.readouterr().out
    gen = ["generate", str(run), "--skip-attention", "1", "--prompt", "ab", "--max-new-tokens",
           "4", "--temperature", "0", "--json"]
    assert main(gen) == 0
    plain = json.loads(capsys.readouterr().out)["text"]
    # A drafter of the same weights skips the attention the target skips (nested in it), as
    # given (--draft S) or searched (--draft auto); greedy, the text is the target's.
    for draft in (["--draft", "S"], ["--draft", "auto", "--draft-table"]):
        assert main([*gen, *draft]) == 0, capsys.readouterr().err
        assert json.loads(capsys.readouterr().out)["text"] == plain
    assert main(["export-hf", str(run), "--skip-attention", "1",
                 "--out", str(tmp_path / "hf")]) == 2
    assert "skips the attention of layers [1]" in capsys.readouterr().err
    assert main(["generate", str(run), "--skip-attention", "3", "--prompt", "a"]) == 2
    assert "need distinct layer indices in 0..2" in capsys.readouterr().err


def test_mixnmatch_depth_candidates(tmp_path, capsys):
    import json

    from helpers import write_corpus

    cfg = _model4().config
    cands = mm.depth_candidates(cfg)
    assert [c.name for c in cands] == [f"XL-ffn{i}" for i in range(3)] + [
        f"XL-attn{i}" for i in range(3)]
    assert cands[1].widths == (64, 0, 64) and cands[4].heads == (4, 0, 4)
    corpus = write_corpus(tmp_path / "corpus.txt", 800)
    run = ckpt.save_checkpoint(tmp_path / "run", _model4(), Tokenizer.byte_level(),
                               metadata={"data": str(corpus), "val_fraction": 0.1,
                                         "seq_len": 32})
    assert main(["mixnmatch", str(run), "--depth", "M", "--batches", "2", "--repeats", "1",
                 "--prefill-len", "8", "--no-progress", "--out", str(tmp_path / "sw")]) == 0
    capsys.readouterr()
    rows = json.loads((tmp_path / "sw" / "mixnmatch.json").read_text())["candidates"]
    depth = {r["name"]: r for r in rows if r["pattern"].startswith("depth-")}
    assert sorted(depth) == sorted([f"M-ffn{i}" for i in range(3)] + [
        f"M-attn{i}" for i in range(3)])
    m = {r["name"]: r for r in rows}["M"]
    assert depth["M-attn1"]["heads"] == [4, 0, 4] and "prefill_ms" in depth["M-attn1"]
    assert depth["M-attn1"]["params"] < m["params"] and depth["M-ffn2"]["params"] < m["params"]
    assert depth["M-attn1"]["val_loss"] != m["val_loss"]


def test_budget_pick_of_an_attention_skipping_row_extracts_that_skip(tmp_path, capsys):
    import json

    model = _model4()
    run = ckpt.save_checkpoint(tmp_path / "run", model, Tokenizer.byte_level())
    cfg = model.config
    rows = [{"name": "M", "widths": list(cfg.ffn_widths("M")), "val_loss": 2.0,
             **mm.static_cost(cfg, cfg.submodel("M"), 64)},
            {"name": "XL-attn1", "widths": list(cfg.ffn_dims), "heads": list(HEADS),
             "val_loss": 1.0, **mm.static_cost(cfg, cfg.submodel(None, HEADS), 64)}]
    (tmp_path / "mixnmatch.json").write_text(json.dumps({"candidates": rows}))
    assert main(["extract", str(run), "--max-params", str(rows[1]["params"]), "--sweep",
                 str(tmp_path), "--out", str(tmp_path / "sub"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["heads"] == list(HEADS)
    sub = load_checkpoint(tmp_path / "sub")[0]
    assert sub.config.skip_attention == (1,) and sub.num_params() == rows[1]["params"]
