"""GGUF export: llama.cpp computes our logits, continues text greedily as we do, and tokenises
text as we do; bad requests fail with clear errors."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from helpers import random_tokens, tiny_model, write_corpus

from matformer import checkpoint as ckpt
from matformer.block import rotate, signed_rope_tables
from matformer.cli import main
from matformer.generate import generate
from matformer.submodels.gguf import (
    GGUFExportError,
    architecture,
    export_gguf,
    load_llama,
    rope_permute,
)
from matformer.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python is not installed")

TEXT = ("The quick brown fox's king sat on the mat, while 42 birds sang;\n"
        "  the queen's castle   in 2024 ... don't   stop!\n\tTabs, ünïcödé, 東京 and 🙂.")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Tokenizer:
    corpus = write_corpus(tmp_path_factory.mktemp("corpus") / "c.txt", n_words=2000)
    return Tokenizer.train_bpe([corpus.read_text()], vocab_size=320)


def _model(vocab: int, **overrides):
    # A larger init spreads the logits, so greedy choices are far from ties at fp32 precision.
    kw = dict(vocab_size=vocab, n_layer=3, n_head=4, d_model=32, d_ff=64, max_seq_len=64,
              rope_theta=500.0, norm_eps=1e-6, init_std=0.2)
    return tiny_model(**{**kw, **overrides}).eval()


def test_rope_permute_matches_pair_layout():
    """Rotating permuted rows in consecutive pairs equals rotating the originals by halves."""
    hd, n_head = 8, 2
    x = torch.randn(1, 5, n_head, hd)  # (B, T, heads, hd)
    cos, sin = signed_rope_tables(hd, 5, 100.0)
    ours = rotate(x, cos[:, None], sin[:, None])  # rotate-half layout
    perm = rope_permute(torch.arange(n_head * hd).float()[:, None], n_head).long().flatten()
    xp = x.reshape(1, 5, n_head * hd)[..., perm].reshape(1, 5, n_head, hd)
    ang = torch.outer(torch.arange(5).float(), 1.0 / 100.0 ** (torch.arange(0, hd, 2) / hd))
    even, odd = xp[..., 0::2], xp[..., 1::2]
    c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
    pairs = torch.stack([even * c - odd * s, even * s + odd * c], -1).flatten(-2)
    expect = ours.reshape(1, 5, n_head * hd)[..., perm].reshape(1, 5, n_head, hd)
    torch.testing.assert_close(pairs, expect)


@pytest.mark.parametrize(("overrides", "widths", "heads", "arch"), [
    ({}, None, None, "llama"),
    ({"n_kv_head": 2, "tie_embeddings": False}, "M", None, "llama"),
    ({}, (8, 64, 16), None, "deci"),
    ({"n_kv_head": 1}, (16, 8, 32), None, "deci"),
    ({}, (8, 0, 16), None, "deci"),  # a skipped FFN (depth elasticity)
    ({}, (16, 64, 0), None, "deci"),  # ... on the last layer
    ({}, None, (4, 0, 4), "deci"),  # a skipped attention
    ({"n_kv_head": 2}, (8, 0, 16), (4, 4, 0), "deci"),  # ... on the last layer, GQA
    ({}, (8, 0, 16), (4, 0, 0), "deci"),  # ... and a layer with neither
    ({"activation": "relu2"}, "L", None, "arcee"),
    ({"nest_heads": True}, "S", "S", "llama"),  # a head-nested granularity: its own heads
    ({"n_kv_head": 2}, (8, 64, 16), (4, 2, 4), "deci"),  # fewer heads in one layer, GQA
])
@needs_llama
def test_llama_cpp_logits_equal_ours(tmp_path, bpe, overrides, widths, heads, arch):
    model = _model(bpe.vocab_size, **overrides)
    sub = model.submodel(widths, heads)
    info = export_gguf(model, bpe, tmp_path / "m.gguf", widths=sub)
    assert info["architecture"] == arch
    assert info["ffn_widths"] == list(sub.widths)
    assert info["skip_attention"] == [i for i, h in enumerate(sub.heads) if not h]
    full_heads = sub.heads == model.config.attention_heads
    assert info["heads"] == (None if full_heads else list(sub.heads))
    ids = random_tokens(1, 40, vocab=bpe.vocab_size, seed=1)
    llm = load_llama(tmp_path / "m.gguf", logits_all=True)
    llm.eval(ids[0].tolist())
    got = np.array(llm.scores[:40])
    llm.close()
    with torch.no_grad():
        ref = model(ids, widths=sub)[0].numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=5e-5)  # |logits| ~4, seen: <1e-5


@pytest.mark.parametrize(("widths", "heads"), [
    ("S", None), ((8, 64, 16), None), ((0, 16, 64), None), ((8, 0, 16), (4, 0, 4)),
])
@needs_llama
def test_llama_cpp_greedy_continuation_and_tokenisation(tmp_path, bpe, widths, heads):
    model = _model(bpe.vocab_size)
    sub = model.submodel(widths, heads)
    export_gguf(model, bpe, tmp_path / "m.gguf", widths=sub)
    llm = load_llama(tmp_path / "m.gguf")
    prompt = "the king sat on"
    ids = bpe.encode(prompt)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids
    n_new = 24
    with torch.no_grad():
        ours = generate(model, [ids], n_new, widths=sub, temperature=0.0)[0, len(ids):]
        # The test is only meaningful if no step is a near-tie at fp32 precision.
        logits = model(torch.cat([torch.tensor(ids), ours])[None, :-1], widths=sub)[0]
        top2 = logits[len(ids) - 1:].topk(2, -1).values
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-3
    theirs = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        theirs.append(tok)
        if len(theirs) == n_new:
            break
    llm.close()
    assert theirs == ours.tolist()


@needs_llama
@pytest.mark.parametrize("kind", ["bpe", "bytes"])
def test_llama_cpp_tokenises_like_us(tmp_path, bpe, kind):
    tok = bpe if kind == "bpe" else Tokenizer.byte_level()
    export_gguf(_model(tok.vocab_size), tok, tmp_path / "m.gguf")
    llm = load_llama(tmp_path / "m.gguf")
    for text in (TEXT, " leading space", "trailing  \n\n", "a" * 50):
        ids = tok.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text
        assert llm.detokenize(ids) == text.encode()
    # Our tokenizer always reads "<|endoftext|>" in text as the EOS token, as llama.cpp does
    # when asked to parse special tokens.
    text = "one<|endoftext|>two"
    ids = tok.encode(text)
    assert tok.eos_id in ids
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    assert llm.detokenize(ids, special=True) == text.encode()
    assert llm.token_eos() == tok.eos_id
    llm.close()


def test_unsupported_activation_and_dtype(tmp_path):
    tok = Tokenizer.byte_level()
    gelu = _model(257, activation="gelu")
    with pytest.raises(GGUFExportError, match="GELU"):
        export_gguf(gelu, tok, tmp_path / "g.gguf")
    relu2 = _model(257, activation="relu2")
    with pytest.raises(GGUFExportError, match="per-layer FFN widths"):
        export_gguf(relu2, tok, tmp_path / "r.gguf", widths=(8, 16, 64))
    assert architecture(relu2.config) == "arcee"
    with pytest.raises(GGUFExportError, match="dtype"):
        export_gguf(_model(257), tok, tmp_path / "x.gguf", dtype="q2_k")
    assert not list(tmp_path.iterdir())  # nothing written, no temp files left


def test_quantised_exports_shrink(tmp_path):
    model, tok = _model(257, d_model=64, d_ff=128), Tokenizer.byte_level()
    sizes = {d: export_gguf(model, tok, tmp_path / f"{d}.gguf", dtype=d)["bytes"]
             for d in ("f32", "f16", "bf16", "q8_0")}
    assert sizes["q8_0"] < sizes["f16"] == sizes["bf16"] < sizes["f32"]


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "run"
    ckpt.save_checkpoint(path, _model(257), Tokenizer.byte_level())
    return path


def test_cli_bad_requests(tmp_path, saved, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export-gguf", str(saved), "--widths", "8,12,16", "--out", str(out)]) == 2
    assert "not in the nested set" in capsys.readouterr().err and not out.exists()
    assert main(["export-gguf", str(saved), "--widths", "8,12,16", "--any-width",
                 "--out", str(out), "--json"]) == 0
    assert '"deci"' in capsys.readouterr().out
    before = out.read_bytes()
    assert main(["export-gguf", str(saved), "--granularity", "S", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["export-gguf", str(saved), "--granularity", "S", "--out", str(out),
                 "--force"]) == 0
    assert "exported llama" in capsys.readouterr().out and out.read_bytes() != before
    # --force never writes over what the command reads (a file of the checkpoint)
    for target in (saved / ckpt.WEIGHTS, saved / ckpt.CONFIG):
        before = target.read_bytes()
        assert main(["export-gguf", str(saved), "--out", str(target), "--force"]) == 2
        assert "part of the input" in capsys.readouterr().err
        assert target.read_bytes() == before
    assert main(["export-gguf", str(saved), "--out", str(tmp_path), "--force"]) == 2
    assert "is a directory" in capsys.readouterr().err
    gelu = tmp_path / "gelu"
    ckpt.save_checkpoint(gelu, _model(257, activation="gelu"), Tokenizer.byte_level())
    assert main(["export-gguf", str(gelu), "--out", str(tmp_path / "g.gguf")]) == 2
    assert "no architecture" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gelu", "m.gguf", "run"]


@needs_llama
def test_cli_check(tmp_path, saved, capsys):
    assert main(["export-gguf", str(saved), "--widths", "16,32,64", "--check", "--json",
                 "--out", str(tmp_path / "m.gguf")]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "deci" and info["check_max_abs_logit_diff"] < 1e-3
    # A head-nested checkpoint: --granularity S is S's widths and S's heads, as eval measures.
    nested = _model(257, nest_heads=True)
    ckpt.save_checkpoint(tmp_path / "nested", nested, Tokenizer.byte_level())
    assert main(["export-gguf", str(tmp_path / "nested"), "--granularity", "S", "--check",
                 "--json", "--out", str(tmp_path / "s.gguf")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["heads"] == list(nested.submodel("S").heads) and "zeroed" in info["note"]
    ids = random_tokens(1, 24, vocab=257, seed=2)
    from matformer.submodels.gguf import llama_logits

    got = llama_logits(tmp_path / "s.gguf", ids[0].tolist())
    with torch.no_grad():
        ref = nested(ids, widths="S")[0].numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=5e-5)


def test_cli_budget_picks_from_a_sweep(tmp_path, saved, capsys):
    """A budget flag picks the lowest-loss sweep row that fits, as extract does."""
    import json

    from matformer.config import ModelConfig

    cfg = ModelConfig.load(saved / "config.json")
    subs = {"S": (cfg.ffn_widths("S"), 3.0), "M": (cfg.ffn_widths("M"), 2.0),
            "L": (cfg.ffn_widths("L"), 1.0), "mix": ((8, 16, 32), 1.5)}  # L is over budget
    rows = [{"name": n, "widths": list(w), "params": cfg.num_params(w), "val_loss": loss}
            for n, (w, loss) in subs.items()]
    (tmp_path / "mixnmatch.json").write_text(json.dumps({"candidates": rows}))
    limit = cfg.num_params((8, 16, 32))
    assert main(["export-gguf", str(saved), "--max-params", str(limit), "--sweep",
                 str(tmp_path), "--out", str(tmp_path / "b.gguf"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ffn_widths"] == [8, 16, 32] and info["architecture"] == "deci"
    assert info["selected"]["name"] == "mix"


def test_file_name_and_permissions(tmp_path):
    """general.name is the exported submodel's granularity (the largest one's for a nested
    model exported as it is), and files and folders are created with the umask's permissions,
    like any other (readable by a server running as another user)."""
    import os

    from gguf import GGUFReader

    model, tok = _model(257), Tokenizer.byte_level()

    def name(path):
        field = GGUFReader(path).fields["general.name"]
        return bytes(field.parts[field.data[0]]).decode()

    old = os.umask(0o022)
    try:
        export_gguf(model, tok, tmp_path / "full.gguf")
        export_gguf(model, tok, tmp_path / "s.gguf", widths="S")
        run = ckpt.save_checkpoint(tmp_path / "run", model, tok)  # folders, the same way
    finally:
        os.umask(old)
    assert name(tmp_path / "full.gguf") == "XL" and name(tmp_path / "s.gguf") == "S"
    assert (tmp_path / "full.gguf").stat().st_mode & 0o777 == 0o644
    assert run.stat().st_mode & 0o777 == 0o755
