"""Consistency metrics (hard agreement, soft KL) and the generate / consistency commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import clone, random_tokens, tiny_model, write_corpus

from matformer.checkpoint import save_checkpoint
from matformer.cli import main
from matformer.metrics import evaluate_consistency, granularity_consistency
from matformer.tokenizer import Tokenizer

SPREAD = dict(tie_embeddings=False, init_std=0.1)


def _batches(n: int = 3, vocab: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(random_tokens(2, 12, vocab, seed=i), random_tokens(2, 12, vocab, seed=i))
            for i in range(n)]


def test_granularity_consistency_matches_a_direct_computation() -> None:
    model = tiny_model(**SPREAD)
    batches = _batches()
    rows = granularity_consistency(model, batches, extra={"mix": (8, 64)})
    assert list(rows) == ["S", "M", "L", "XL", "mix"]
    assert rows["XL"]["hard"] == 1.0 and rows["XL"]["soft_kl"] == pytest.approx(0, abs=1e-6)
    with torch.no_grad():
        x = torch.cat([b[0] for b in batches])
        ref = model(x).log_softmax(-1)
        for name, widths in (("S", "S"), ("mix", (8, 64))):
            sub = model(x, widths=widths).log_softmax(-1)
            hard = (sub.argmax(-1) == ref.argmax(-1)).float().mean().item()
            kl = (ref.exp() * (ref - sub)).sum(-1).mean().item()
            assert rows[name]["hard"] == pytest.approx(hard)
            assert rows[name]["soft_kl"] == pytest.approx(kl, rel=1e-4)
            assert rows[name]["tokens"] == x.numel()
    assert 0 <= rows["S"]["hard"] < 1 and rows["S"]["soft_kl"] > 0


def test_separate_models_against_a_reference() -> None:
    ref = tiny_model(**SPREAD)
    same = clone(ref)
    other = tiny_model(seed=5, **SPREAD)
    rows = evaluate_consistency({"same": (same, None), "other": (other, None)},
                                (ref, None), _batches(), precision="fp32")
    assert rows["same"]["hard"] == 1.0 and rows["same"]["soft_kl"] == pytest.approx(0, abs=1e-6)
    assert rows["other"]["hard"] < 0.5 and rows["other"]["soft_kl"] > rows["same"]["soft_kl"]
    assert ref.training  # train/eval mode restored
    with pytest.raises(ValueError, match="no validation batches"):
        evaluate_consistency({"x": (ref, None)}, (ref, None), [])


def test_nested_heads_granularities_use_their_heads() -> None:
    model = tiny_model(n_head=8, n_kv_head=4, nest_heads=True, **SPREAD)
    rows = granularity_consistency(model, _batches(1))
    direct = evaluate_consistency({"S": (model, model.submodel("S", "S"))}, (model, None),
                                  _batches(1))
    assert rows["S"]["hard"] == direct["S"]["hard"]
    assert rows["S"]["soft_kl"] == pytest.approx(direct["S"]["soft_kl"])


# ------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    corpus = write_corpus(root / "corpus.txt", n_words=2500)
    tok = Tokenizer.byte_level()
    meta = {"data": str(corpus), "val_fraction": 0.1, "seq_len": 32}
    out = {"mat": save_checkpoint(root / "mat", tiny_model(vocab_size=257, **SPREAD), tok,
                                  metadata=meta)}
    for i, g in enumerate(("S", "XL")):
        dense = tiny_model(tiny_model(vocab_size=257).config.dense(g), seed=10 + i)
        out[g] = save_checkpoint(root / f"base-{g}", dense, tok, metadata=meta)
    return out


def test_cli_consistency(checkpoints, capsys: pytest.CaptureFixture[str]) -> None:
    ck = checkpoints
    args = ["consistency", str(ck["mat"]), "--batches", "2", "--batch-size", "4",
            "--widths", "8,64", "--baselines", str(ck["S"]), str(ck["XL"])]
    assert main([*args, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["matformer"]) == {"S", "M", "L", "XL", "8,64"}
    assert res["matformer"]["XL"]["hard"] == 1.0 and res["prefixes"] == 2 * 4 * 32
    assert set(res["baselines"]) == {"S", "XL"} and res["baselines"]["XL"]["hard"] == 1.0
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "baseline" in table and "100.00%" in table
    assert main(["consistency", str(ck["mat"]), "--baselines", str(ck["S"])]) == 2


def test_cli_consistency_counts_nested_heads(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A head-nested granularity is measured, and counted, with its own heads."""
    corpus = write_corpus(tmp_path / "corpus.txt", n_words=800)
    model = tiny_model(vocab_size=257, n_head=4, nest_heads=True)
    run = save_checkpoint(tmp_path / "run", model, Tokenizer.byte_level(),
                          metadata={"data": str(corpus), "val_fraction": 0.1, "seq_len": 32})
    assert main(["consistency", str(run), "--batches", "1", "--batch-size", "2",
                 "--widths", "8,64", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["matformer"]
    cfg = model.config
    for name in cfg.names:
        want = cfg.num_params(cfg.submodel(name), embedding=False)  # its nested heads too
        assert rows[name]["non_embedding_params"] == want
    assert rows["8,64"]["non_embedding_params"] == cfg.num_params((8, 64), embedding=False)
    assert rows["S"]["non_embedding_params"] < cfg.num_params(cfg.ffn_widths("S"),
                                                              embedding=False)


def test_cli_generate_plain_speculative_and_stream(checkpoints,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    ck = str(checkpoints["mat"])
    base = [ck, "--prompt", "the king", "--max-new-tokens", "12", "--temperature", "0"]

    def run(*extra: str) -> dict:
        assert main(["generate", *base, *extra, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    plain = run()
    assert plain["stats"]["new_tokens"] == 12 and plain["text"].startswith("the king")
    assert run("--no-cache")["text"] == plain["text"]
    for extra in (("--draft", "S"), ("--draft", "M", "--shared-cache"),
                  ("--draft", "8,16", "--adaptive"),
                  ("--draft-model", str(checkpoints["S"]), "--draft-len", "2")):
        spec = run(*extra)
        assert spec["text"] == plain["text"], extra
        assert 0 <= spec["stats"]["acceptance_rate"] <= 1 and spec["stats"]["rounds"] >= 1
    assert main(["generate", *base, "--stream", "--stats", "--draft", "S"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == plain["text"].strip()
    assert "acceptance" in captured.err and "tokens/s" in captured.err
    batch = run("--prompt", "a cat")
    assert batch["texts"][0] == plain["text"] and len(batch["texts"]) == 2
    assert main(["generate", *base, "--draft", "XL"]) == 2  # not smaller than the target
    assert main(["generate", *base, "--draft", "S", "--prompt", "x"]) == 2  # one prompt only
