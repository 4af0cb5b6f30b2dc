"""Bring your own model: Gemma 3n slicing (rules, streaming, in-place equivalence, sweep) and
elastify (function-preserving reordering, training a dense import into S/M/L/XL).

Every model is a tiny random one built from a transformers config: no downloads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import random_tokens, tiny_model, write_corpus

from matformer.cli import main
from matformer.elastify import permute_units, reorder_by_importance, unit_importance
from matformer.submodels.gemma3n import (
    SliceError,
    SlicePlan,
    kv_producers,
    parse_int_list,
    plan_slice,
    slice_hf,
    table_slice,
)
from matformer.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
from transformers import Gemma3nForCausalLM, Gemma3nTextConfig  # noqa: E402

from matformer.submodels.gemma3n_sweep import in_place  # noqa: E402
from matformer.submodels.hf import save_hf_tokenizer  # noqa: E402

TYPES = ["sliding_attention"] * 3 + ["full_attention"]
#: 8 layers, KV shared by the last 3 (5, 6, 7): producers are 4 (sliding) and 3 (full).
TEXT = dict(vocab_size=264, vocab_size_per_layer_input=264, hidden_size=64,
            hidden_size_per_layer_input=8, intermediate_size=[128] * 8, num_hidden_layers=8,
            num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_kv_shared_layers=3,
            laurel_rank=8, altup_num_inputs=2, max_position_embeddings=128,
            layer_types=TYPES * 2, sliding_window=16,
            activation_sparsity_pattern=[0.95, 0.95, 0.95, 0.0, 0.0, 0.0, 0.0, 0.0])


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Gemma3nForCausalLM]:
    """(single-file folder, sharded folder, model) of a tiny random Gemma 3n text model."""
    torch.manual_seed(0)
    model = Gemma3nForCausalLM(Gemma3nTextConfig(**TEXT)).eval()
    base = tmp_path_factory.mktemp("gemma")
    one, sharded = base / "one", base / "sharded"
    model.save_pretrained(str(one))
    model.save_pretrained(str(sharded), max_shard_size="200KB")
    for folder in (one, sharded):
        save_hf_tokenizer(Tokenizer.byte_level(), folder)
    assert len(list(sharded.glob("*.safetensors"))) > 1
    return one, sharded, model


def _load(folder: Path) -> Gemma3nForCausalLM:
    model, info = Gemma3nForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


SLICES = [([64, 32, 128, 100, 16, 128], [1, 6]),   # a skipped layer on both sides of sharing
          ([96] * 8, []),                           # FFN only
          ([128, 8, 64, 128, 40], [0, 2, 7])]       # first and last layers gone


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize(("widths", "skip"), SLICES)
def test_slice_loads_in_transformers_and_equals_in_place(gemma, tmp_path, widths, skip,
                                                         sharded):
    one, many, model = gemma
    info = slice_hf(many if sharded else one, tmp_path / "s", widths, skip)
    sliced = _load(tmp_path / "s")
    cfg = sliced.config
    kept = [i for i in range(8) if i not in skip]
    assert cfg.num_hidden_layers == len(kept) == info["num_hidden_layers"]
    assert list(cfg.intermediate_size) == widths
    assert cfg.layer_types == [TEXT["layer_types"][i] for i in kept]
    assert cfg.activation_sparsity_pattern == [TEXT["activation_sparsity_pattern"][i]
                                               for i in kept]
    assert cfg.num_kv_shared_layers == 3 - sum(i >= 5 for i in skip)
    assert sliced.model.embed_tokens_per_layer.weight.shape[1] == 8 * len(kept)
    x = random_tokens(2, 40, vocab=264)
    plan = SlicePlan(8, tuple(widths), tuple(skip))
    with torch.no_grad():
        got = sliced(x).logits
        with in_place(model, plan.layer_widths):
            ref = model(x, use_cache=False).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    if sharded:
        index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(sliced.state_dict()) - {"lm_head.weight"}


def test_in_place_restores_the_model(gemma):
    _, _, model = gemma
    x = random_tokens(1, 24, vocab=264)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = list(model.model.layers)
    with torch.no_grad():
        ref = model(x, use_cache=False).logits
        with in_place(model, [0, 16, 16, 16, 16, 0, 16, 16]):
            small = model(x, use_cache=False).logits
        again = model(x, use_cache=False).logits
    assert not torch.allclose(small, ref)
    torch.testing.assert_close(again, ref, rtol=0, atol=0)
    assert list(model.model.layers) == layers
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("widths", "skip", "rule"), [
    ([128] * 7, [], "one-width-per-kept-layer"),
    ([128] * 7, [1, 2], "one-width-per-kept-layer"),
    ([128] * 7, [8], "skip-in-range"),
    ([128] * 6, [1, 1], "skip-in-range"),
    ([], list(range(8)), "skip-in-range"),
    ([0] + [128] * 7, [], "width-in-range"),
    ([129] + [128] * 7, [], "width-in-range"),
    ([128] * 7, [4], "kv-producers-kept"),
    ([128] * 7, [3], "kv-producers-kept"),
])
def test_every_rule_violation_is_refused(gemma, tmp_path, widths, skip, rule):
    one, _, _ = gemma
    with pytest.raises(SliceError, match=rf"\[{rule}\]"):
        slice_hf(one, tmp_path / "s", widths, skip)
    assert not (tmp_path / "s").exists()


def test_kv_producers_match_transformers():
    cfg = Gemma3nTextConfig(**TEXT)
    modes = cfg.kv_sharing_modes
    assert kv_producers(TEXT) == [i for i, m in enumerate(modes) if m == "store"] == [3, 4]
    e4b = {"num_hidden_layers": 35, "num_kv_shared_layers": 15}  # default layer types
    assert kv_producers(e4b) == [18, 19]
    assert kv_producers({**TEXT, "num_kv_shared_layers": 0}) == []
    plan = plan_slice(e4b, [8192] * 30, [20, 21, 22, 23, 24])
    assert plan.kept == tuple(range(20)) + tuple(range(25, 35))


def test_parse_int_list():
    assert parse_int_list("[2_048 * 4, 2_048 * 8]") == [8192, 16384]
    assert parse_int_list("[8] * 2 + [16] * 3") == [8, 8, 16, 16, 16]
    assert parse_int_list("1, 2,3") == [1, 2, 3]
    assert parse_int_list("(4096 // 2,)") == [2048]
    assert parse_int_list("[200_000 * 2]") == [400_000]
    assert parse_int_list("") == parse_int_list("[]") == []
    for bad in ("__import__('os').system('true')", "[1] * 10**9", "[1.5]", "[[1]]", "x",
                "[1] * 1_000_000", "'a' * 3", "[1, 2"):
        with pytest.raises(ValueError):
            parse_int_list(bad)


def _table(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "# Layers", "# Effective Params (B)", "MMLU PT accuracy",
                    "FFN Hidden Dims", "Layers Skipped"])
        w.writerows(rows)
    return path


def test_config_table_row_slices_like_widths(gemma, tmp_path, capsys):
    one, _, _ = gemma
    table = _table(tmp_path / "configs.csv", [
        ["Full", "8", "0.0003", "1%", "[2 * 64] * 8", ""],
        ["Small", "6", "0.0002", "1%", "[2_0 * 3, 32, 32 * 2, 64, 2 * 8, 128]", "[1, 6]"],
        ["Wrong count", "7", "0", "0", "[64] * 6", "[1, 6]"]])
    assert table_slice(table, "Small")[:2] == ([60, 32, 64, 64, 16, 128], [1, 6])
    with pytest.raises(SliceError, match="table-layer-count"):
        table_slice(table, "Wrong count")
    with pytest.raises(ValueError, match="no row named"):
        table_slice(table, "Nope")
    rc = main(["slice-hf", str(one), str(tmp_path / "t"), "--config-table", str(table),
               "--config-name", "Small", "--check"])
    out = capsys.readouterr().out
    assert rc == 0 and "max abs logit diff" in out
    rc = main(["--threads", "1", "slice-hf", str(one), str(tmp_path / "w"), "--widths",
               "60,32,64,64,16,128", "--skip-layers", "[1, 6]", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["widths"] == [60, 32, 64, 64, 16, 128]
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "t" / name).read_bytes() == (tmp_path / "w" / name).read_bytes()
    rc = main(["slice-hf", str(one), str(tmp_path / "x"), "--widths", "[128] * 7",
               "--skip-layers", "[4]"])
    assert rc == 2 and "kv-producers-kept" in capsys.readouterr().err


def test_multimodal_text_part_sliced_towers_untouched(gemma, tmp_path):
    """The multimodal layout (``model.language_model.*`` beside vision/audio towers), written
    by hand: its vision tower needs timm to build. The text part must slice exactly like the
    text checkpoint; the other tensors must be copied bit for bit."""
    from safetensors.torch import load_file, save_file

    one, _, _ = gemma
    text = load_file(str(one / "model.safetensors"))
    towers = {"model.vision_tower.timm_model.conv_stem.weight": torch.randn(4, 3, 3, 3),
              "model.audio_tower.conformer.0.ffw.weight": torch.randn(8, 8),
              "model.embed_vision.embedding.weight": torch.randn(5, 64)}
    mm = tmp_path / "mm"
    mm.mkdir()
    lm = {k.replace("model.", "model.language_model.", 1): v for k, v in text.items()}
    save_file(dict(list(lm.items())[:40]), str(mm / "model-00001-of-00002.safetensors"))
    save_file({**dict(list(lm.items())[40:]), **towers},
              str(mm / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in list(lm)[:40]}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in [*list(lm)[40:], *towers]}
    (mm / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    text_cfg = json.loads((one / "config.json").read_text())
    (mm / "config.json").write_text(json.dumps({"model_type": "gemma3n",
                                                "text_config": text_cfg,
                                                "vision_config": {"model_type": "x"}}))
    widths, skip = [64, 32, 128, 100, 16, 128], [1, 6]
    slice_hf(mm, tmp_path / "mm-s", widths, skip)
    slice_hf(one, tmp_path / "s", widths, skip)
    got, ref = {}, load_file(str(tmp_path / "s" / "model.safetensors"))
    for f in (tmp_path / "mm-s").glob("*.safetensors"):
        got |= load_file(str(f))
    for k, v in towers.items():
        assert torch.equal(got.pop(k), v)
    assert {k.replace("model.language_model.", "model.", 1) for k in got} == set(ref)
    for k, v in got.items():
        assert torch.equal(v, ref[k.replace("model.language_model.", "model.", 1)])
    cfg = json.loads((tmp_path / "mm-s" / "config.json").read_text())
    assert cfg["vision_config"] == {"model_type": "x"}
    assert cfg["text_config"]["intermediate_size"] == widths
    assert cfg["text_config"]["num_kv_shared_layers"] == 2


def test_sweep_hf_picks_and_writes_a_slice(gemma, tmp_path, capsys):
    one, _, _ = gemma
    corpus = write_corpus(tmp_path / "text.txt", n_words=600)
    table = _table(tmp_path / "configs.csv", [
        ["Row", "6", "0", "0", "[96] * 6", "[1, 6]"], ["E4B row", "35", "0", "0", "[8] * 35",
                                                       ""]])
    rc = main(["--threads", "1", "sweep-hf", str(one), "--data", str(corpus), "--out",
               str(tmp_path / "sweep"), "--ratios", "0.25,0.5,1", "--skip-set", "[1, 6]",
               "--config-table", str(table), "--seq-len", "32", "--batches", "2",
               "--repeats", "1", "--prefill-len", "16", "--no-progress",
               "--max-params", "300000", "--slice-to", str(tmp_path / "picked"), "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0
    for f in ("mixnmatch.json", "mixnmatch.png", "mixnmatch.md"):
        assert (tmp_path / "sweep" / f).exists()
    names = {r["name"] for r in res["candidates"]}
    assert {"Row", "0.25x skip 1,6", "0.25x", "1x"} <= names
    assert res["table_rows_not_fitting"] == ["E4B row"]
    assert all("prefill_ms" in r for r in res["candidates"])
    chosen = res["selected"]
    assert chosen["params"] <= 300_000
    assert chosen["val_loss"] == min(r["val_loss"] for r in res["candidates"]
                                     if r["params"] <= 300_000)
    sliced = _load(tmp_path / "picked")
    assert sum(p.numel() for p in sliced.model.parameters()) == chosen["params"]
    # pick again from the stored sweep, without evaluating anything
    rc = main(["sweep-hf", str(one), "--sweep", str(tmp_path / "sweep"), "--max-params",
               "200000", "--slice-to", str(tmp_path / "again"), "--json"])
    again = json.loads(capsys.readouterr().out)["selected"]
    assert rc == 0 and again["params"] <= 200_000 < chosen["params"]
    assert json.loads((tmp_path / "again" / "matformer_slice.json").read_text())[
        "skipped_layers"] == [i for i, w in enumerate(again["widths"]) if w == 0]
    assert main(["sweep-hf", str(one), "--sweep", str(tmp_path / "sweep"), "--slice-to",
                 str(tmp_path / "x")]) == 2
    assert "needs a budget" in capsys.readouterr().err


# ----------------------------------------------------------------------------- elastify
def _batches(vocab: int, n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(random_tokens(4, 16, vocab=vocab, seed=s), random_tokens(4, 16, vocab=vocab,
                                                                       seed=s + 99))
            for s in range(n)]


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu2"])
def test_reordering_preserves_the_full_model(activation):
    model = tiny_model(activation=activation, ratios=(1.0,), names=("XL",)).eval()
    x = random_tokens(2, 24)
    with torch.no_grad():
        ref = model(x)
        before = model.blocks[0].ffn.up_proj.weight.clone()
    facts = reorder_by_importance(model, _batches(64))
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert not torch.equal(before, model.blocks[0].ffn.up_proj.weight)  # units did move
    scores = unit_importance(model, _batches(64))
    for s in scores:  # the most important units come first now
        assert torch.all(s[:-1] >= s[1:] - 1e-6)
    assert all(a >= b for a, b in zip(facts["first_half_share_after"],
                                       facts["first_half_share_before"], strict=True))
    with pytest.raises(ValueError, match="permutation"):
        permute_units(model, [torch.zeros(64, dtype=torch.long)] * 2)


TINY_TRAIN = ["--preset", "tiny", "--tokenizer", "byte", "--batch-size", "8",
              "--precision", "fp32", "--no-progress", "--warmup-steps", "5"]


def test_elastify_end_to_end(tmp_path, capsys):
    """A dense model we pretrain ourselves, exported to transformers, made elastic: S/M/L get
    better than naive prefix slicing and the result works with every command."""
    corpus = write_corpus(tmp_path / "corpus.txt", n_words=4000)
    assert main(["--threads", "1", "train", *TINY_TRAIN, "--mode", "baseline",
                 "--granularity", "XL", "--steps", "150", "--lr", "1e-2",
                 "--eval-interval", "150", "--data", str(corpus),
                 "--out", str(tmp_path / "dense")]) == 0
    assert main(["export-hf", str(tmp_path / "dense"), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert main(["--threads", "1", "elastify", str(tmp_path / "hf"), "--out",
                 str(tmp_path / "elastic"), "--data", str(corpus), "--steps", "80",
                 "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "5",
                 "--precision", "fp32", "--eval-batches", "8", "--eval-interval", "80",
                 "--no-progress", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    naive, reordered, final = rep["naive"], rep["reordered"], rep["elastified"]
    assert abs(naive["XL"] - reordered["XL"]) < 1e-3  # the permutation kept the full model
    for g in ("S", "M", "L"):
        assert final[g] < naive[g] - 0.05, (g, naive, reordered, final)
    assert final["XL"] < naive["S"]
    assert rep["train_tokens"] == 80 * 8 * 64
    assert json.loads((tmp_path / "elastic" / "elastify.json").read_text()) == rep
    for argv in (["eval", str(tmp_path / "elastic"), "--batches", "2"],
                 ["extract", str(tmp_path / "elastic"), "--granularity", "M", "--out",
                  str(tmp_path / "m")],
                 ["generate", str(tmp_path / "elastic"), "--granularity", "S",
                  "--max-new-tokens", "5"]):
        assert main(argv) == 0, argv


def test_sweep_and_slice_refuse_damaged_weights_and_missing_layers(gemma, tmp_path, capsys):
    import shutil

    one, _, _ = gemma
    corpus = write_corpus(tmp_path / "text.txt", n_words=300)
    sweep = ["--threads", "1", "sweep-hf", str(one), "--data", str(corpus), "--out",
             str(tmp_path / "sweep"), "--seq-len", "16", "--batches", "1", "--no-latency",
             "--no-progress"]
    assert main([*sweep, "--skip-set", "[9]"]) == 2  # the model has layers 0..7
    assert "layers [9] do not exist" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(one, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    for argv in (["slice-hf", str(bad), str(tmp_path / "s"), "--widths", "[64] * 8"],
                 ["sweep-hf", str(bad), *sweep[4:]]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "model.safetensors" in err or str(bad) in err, err
        assert "Traceback" not in err and "damaged" in err, err
    assert not (tmp_path / "s").exists()
