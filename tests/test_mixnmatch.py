"""Mix'n'Match: candidate rule, costs, sweep, Pareto front, budget selection, extraction."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from helpers import pattern_dataset, random_tokens, tiny_config, tiny_model, write_corpus

from matformer import checkpoint as ckpt
from matformer import families
from matformer.cli import main
from matformer.submodels import candidates as mm
from matformer.submodels.extract import extract, save_extracted
from matformer.submodels.report import interpolate, line_analysis, load_sweep
from matformer.submodels.sweep import choose, lm_sweep, pareto_front, select
from matformer.tokenizer import Tokenizer


def _levels(cfg, widths):
    table = mm.nested_widths(cfg)
    return [table[i].index(w) for i, w in enumerate(widths)]


# ----------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("n_layer", [3, 6])
def test_rule_candidates_properties(n_layer):
    cfg = tiny_config(n_layer=n_layer)
    cands = mm.rule_candidates(cfg)
    params = [cfg.num_params(c.widths) for c in cands]
    assert params == sorted(set(params)), "one candidate per parameter count, sorted"
    for c in cands:
        lv = _levels(cfg, c.widths)
        assert lv == sorted(lv), f"{c.name} is not non-decreasing with depth"
    # Every parameter count any non-decreasing choice reaches is covered ...
    reachable = {}
    for lv in itertools.product(range(cfg.num_granularities), repeat=n_layer):
        if list(lv) == sorted(lv):
            w = tuple(cfg.ffn_widths(g)[i] for i, g in enumerate(lv))
            reachable.setdefault(cfg.num_params(w), []).append(lv)
    assert set(params) == set(reachable)
    # ... by a least-slope choice: no config of the same size spans fewer granularities.
    for c, p in zip(cands, params, strict=True):
        lv = _levels(cfg, c.widths)
        assert lv[-1] - lv[0] == min(x[-1] - x[0] for x in reachable[p])
    # The uniform granularities are in, and adjacent-pair mixes (span 1) all appear.
    names = [c.name for c in cands]
    assert set(cfg.names) <= set(names)
    for g in range(cfg.num_granularities - 1):
        for k in range(1, n_layer):
            w = tuple(cfg.ffn_widths(g)[:k] + cfg.ffn_widths(g + 1)[k:])
            assert w in {c.widths for c in cands}


def test_rule_prefers_least_slope_over_extremes():
    # 4 layers, widths 8/16/32/64: [M,M,L,L] and [S,S,M,XL] both sum to 96; least slope wins.
    cfg = tiny_config(n_layer=4)
    by_params = {cfg.num_params(c.widths): c for c in mm.rule_candidates(cfg)}
    mml = cfg.num_params((16, 16, 32, 32))
    assert by_params[mml].widths == (16, 16, 32, 32)
    assert by_params[mml].name == "2xM+2xL"


def test_costs_are_monotone_in_size():
    cfg = tiny_config(n_layer=4)
    costs = [mm.static_cost(cfg, c, 32) for c in mm.rule_candidates(cfg)]
    for key in ("params", "non_embedding_params", "flops_per_token"):
        vals = [c[key] for c in costs]
        assert vals == sorted(vals) and len(set(vals)) == len(vals), key
    assert costs[0]["params"] == cfg.num_params(cfg.ffn_widths("S"))
    assert costs[-1]["params"] == cfg.num_params()


def test_patterns_are_permutations_and_deduplicated():
    cfg = tiny_config(n_layer=4)
    cands = mm.candidates(cfg, mm.PATTERNS, widths=[(8, 64, 8, 64)])
    widths = [c.widths for c in cands]
    assert len(widths) == len(set(widths))
    rule = {tuple(sorted(c.widths)) for c in cands if c.pattern in ("rule", "uniform")}
    for c in cands:
        if c.pattern in ("decreasing", "inc-dec", "dec-inc", "random"):
            assert tuple(sorted(c.widths)) in rule  # same widths, same size as a rule point
        if c.pattern == "decreasing":
            assert list(c.widths) == sorted(c.widths, reverse=True)
    assert any(c.pattern == "explicit" and c.widths == (8, 64, 8, 64) for c in cands)
    with pytest.raises(ValueError, match="unknown pattern"):
        mm.candidates(cfg, ["zigzag"])


def test_patterns_with_layers_of_different_ffn_sizes():
    """Ablation patterns re-order granularity levels, not absolute widths: with per-layer FFN
    sizes every candidate stays valid and nested, and keeps its rule point's levels."""
    cfg = tiny_config(n_layer=3, d_ff=(32, 64, 128))
    cands = mm.candidates(cfg, mm.PATTERNS)
    table = mm.nested_widths(cfg)
    rule = {tuple(sorted(mm._levels(cfg, c.widths))) for c in cands if c.pattern == "rule"}
    for c in cands:
        mm.check_widths(cfg, c.widths)  # raises for a width the layer cannot take
        levels = tuple(table[i].index(w) for i, w in enumerate(c.widths))
        if c.pattern in ("decreasing", "inc-dec", "dec-inc", "random"):
            assert len(set(levels)) > 1 and tuple(sorted(levels)) in rule
        if c.pattern == "decreasing":
            assert list(levels) == sorted(levels, reverse=True)
    assert any(c.pattern == "decreasing" for c in cands)


@pytest.mark.parametrize(("widths", "match"), [
    ((8, 16, 32), "has 3 entries"),
    ((8, 16, 32, 128), "out of range"),
    ((8, 16, 32, -1), "out of range"),
    ((8, 16, 33, 64), "not in the nested set"),
])
def test_bad_widths_are_refused(widths, match):
    with pytest.raises(ValueError, match=match):
        mm.check_widths(tiny_config(n_layer=4), widths)


def test_untrained_width_allowed_on_request():
    assert mm.check_widths(tiny_config(n_layer=2), (12, 64), nested=False) == (12, 64)


# ----------------------------------------------------------------------------- selection
ROWS = [
    {"name": "a", "params": 10, "flops_per_token": 20, "prefill_ms": 1.0, "val_loss": 3.0},
    {"name": "b", "params": 12, "flops_per_token": 24, "prefill_ms": 1.5, "val_loss": 2.7},
    {"name": "c", "params": 13, "flops_per_token": 26, "prefill_ms": 1.2, "val_loss": 2.9},
    {"name": "d", "params": 15, "flops_per_token": 30, "prefill_ms": 2.0, "val_loss": 2.6},
    {"name": "e", "params": 16, "flops_per_token": 32, "prefill_ms": 2.1, "val_loss": 2.65},
]


def test_pareto_front():
    assert [ROWS[i]["name"] for i in pareto_front(ROWS, "params")] == ["a", "b", "d"]
    assert [ROWS[i]["name"] for i in pareto_front(ROWS, "prefill_ms")] == ["a", "c", "b", "d"]


def test_select_picks_best_loss_under_budget():
    assert select(ROWS, max_params=14)["name"] == "b"
    assert select(ROWS, max_params=16)["name"] == "d"
    assert select(ROWS, max_latency_ms=1.3)["name"] == "c"
    assert select(ROWS, max_params=14, max_latency_ms=1.3)["name"] == "c"
    assert select(ROWS, max_flops=21)["name"] == "a"
    with pytest.raises(ValueError, match=r"max_params=5 but the smallest achievable is 10 \(a\)"):
        select(ROWS, max_params=5)
    with pytest.raises(ValueError, match="unknown budget"):
        select(ROWS, max_memory=5)
    with pytest.raises(ValueError, match="latency not measured"):
        select([{k: v for k, v in r.items() if k != "prefill_ms"} for r in ROWS],
                  max_latency_ms=2)


def _batches():
    return list(pattern_dataset().val_batches(4, 16, 3))


def test_sweep_and_on_the_fly_choice_agree():
    torch.manual_seed(0)
    model = tiny_model(n_layer=3)
    cands = mm.candidates(model.config)
    rows = lm_sweep(model, _batches(), cands, latency=True, repeats=1, prefill_len=8,
                    progress=False)
    assert len(rows) == len(cands)
    for r in rows:
        assert r["prefill_ms"] > 0 and r["decode_ms"] > 0 and r["val_loss"] > 0
        assert "pareto_params" in r and "pareto_prefill_ms" in r
    budget = (rows[0]["params"] + rows[-1]["params"]) / 2
    expected = select(rows, max_params=budget)
    under = [r for r in rows if r["params"] <= budget]
    assert expected["val_loss"] == min(r["val_loss"] for r in under)
    got = choose(model, _batches(), cands, {"max_params": budget}, progress=False)
    assert got["widths"] == expected["widths"]
    with pytest.raises(ValueError, match="smallest achievable"):
        choose(model, _batches(), cands, {"max_params": 10}, progress=False)


# ----------------------------------------------------------------------------- extract
@pytest.mark.parametrize("overrides", [{}, {"n_kv_head": 1, "activation": "relu2"},
                                       {"tie_embeddings": False, "activation": "gelu"}])
@pytest.mark.parametrize("widths", ["S", "XL", (8, 64, 16), (64, 8, 32)])
def test_extract_equals_in_place_submodel(widths, overrides):
    model = tiny_model(n_layer=3, **overrides).eval()
    sub = extract(model, widths).eval()
    x = random_tokens(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(sub(x), model(x, widths=widths), rtol=0, atol=1e-6)
    ws = model.submodel(widths).widths
    assert sub.config.ffn_dims == ws and sub.config.ratios == (1.0,)
    assert sub.config.d_ff == (ws[0] if len(set(ws)) == 1 else ws)
    assert sub.num_params() == model.num_params(widths)
    assert type(sub) is type(model)


def test_extract_copies_weights_and_closes():
    model = tiny_model(n_layer=2)
    sub = extract(model, (8, 32))
    full_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not any(p.untyped_storage().data_ptr() in full_ptrs for p in sub.parameters())
    assert all(p.is_contiguous() for p in sub.parameters())
    assert sub.lm_head.weight is sub.embed.weight  # tying survives
    x = random_tokens(1, 12)
    with torch.no_grad():
        before = sub(x).clone()
        model.blocks[0].ffn.up_proj.weight.add_(1.0)  # the source changes, the copy does not
        torch.testing.assert_close(sub(x), before, rtol=0, atol=0)
        again = extract(sub, (8, 16), name="smaller")  # closure: extract an extracted model
        torch.testing.assert_close(again(x), sub(x, widths=(8, 16)), rtol=0, atol=1e-6)
    assert again.config.names == ("smaller",)


def test_save_extracted_checkpoint(tmp_path):
    model, tok = tiny_model(n_layer=3, vocab_size=257), Tokenizer.byte_level()
    src = ckpt.save_checkpoint(tmp_path / "src", model, tok,
                               metadata={"data": "corpus.txt", "val_fraction": 0.2,
                                         "seq_len": 16, "step": 5})
    path = save_extracted(tmp_path / "S", model, tok, "S", source=src)
    loaded, tok2 = families.load_checkpoint(path)
    x = random_tokens(2, 10, vocab=257)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x, widths="S"), rtol=0, atol=1e-6)
    meta = ckpt.read_metadata(path)
    assert meta["data"] == "corpus.txt" and meta["val_fraction"] == 0.2 and meta["seq_len"] == 16
    assert meta["origin"]["widths"] == [8, 8, 8] and meta["origin"]["name"] == "S"
    assert "step" not in meta and tok2 == tok
    # File size follows the submodel: S keeps 1/8 of the FFN weights.
    size = (path / ckpt.WEIGHTS).stat().st_size
    full = (src / ckpt.WEIGHTS).stat().st_size
    assert abs(size / full - model.num_params("S") / model.num_params()) < 0.02


# ----------------------------------------------------------------------------- report
def test_line_analysis_and_interpolate():
    assert interpolate([(0, 1.0), (2, 3.0)], 1) == 2.0
    assert interpolate([(0, 1.0), (2, 3.0)], 3) is None
    rows = [{"pattern": "uniform", "name": n, "params": p, "non_embedding_params": p,
             "val_loss": loss, "widths": [w]} for n, p, loss, w in
            (("S", 10, 3.0, 1), ("XL", 20, 2.0, 4))]
    rows += [{"pattern": "rule", "name": "m", "params": 15, "non_embedding_params": 15,
              "val_loss": 2.4, "widths": [1, 4], "span": 1},
             {"pattern": "decreasing", "name": "d", "params": 15, "non_embedding_params": 15,
              "val_loss": 2.6, "widths": [4, 1], "span": 1}]
    a = line_analysis(rows)
    assert a["vs_line"]["rule"]["mean"] == pytest.approx(-0.1)
    assert a["vs_line"]["decreasing"]["fraction_below"] == 0.0
    assert a["vs_rule_same_widths"]["decreasing"]["mean"] == pytest.approx(0.2)


def test_cli_sweep_select_extract_eval(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt", 1500)
    model, tok = tiny_model(n_layer=3, vocab_size=257), Tokenizer.byte_level()
    src = ckpt.save_checkpoint(tmp_path / "run", model, tok,
                               metadata={"data": str(corpus), "val_fraction": 0.1,
                                         "seq_len": 32})
    out = tmp_path / "sweep"
    assert main(["mixnmatch", str(src), "--out", str(out), "--patterns", "rule,decreasing",
                 "--batches", "2", "--repeats", "1", "--prefill-len", "8", "--no-progress",
                 "--baselines", str(src), "--max-params", "30000"]) == 0
    text = capsys.readouterr().out
    assert "best under the budget" in text and "| uniform |" in text
    result = load_sweep(out)
    assert {p.name for p in out.iterdir()} >= {"mixnmatch.json", "mixnmatch.png", "mixnmatch.md"}
    assert (out / "mixnmatch.png").stat().st_size > 10_000
    assert len(result["baselines"]) == 1 and "analysis" in result
    best = select(result["candidates"], max_params=30000)
    ex = tmp_path / "ex"
    assert main(["extract", str(src), "--max-params", "30000", "--sweep", str(out),
                 "--out", str(ex), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["widths"] == best["widths"]
    assert main(["eval", str(ex), "--batches", "2", "--json"]) == 0  # no --data needed
    rows = json.loads(capsys.readouterr().out)["results"]
    assert rows[0]["widths"] == best["widths"]
    assert main(["extract", str(src), "--widths", "8,16,33", "--out", str(tmp_path / "x")]) == 2
    assert "not in the nested set" in capsys.readouterr().err
    assert main(["extract", str(src), "--max-params", "100", "--out", str(tmp_path / "x"),
                 "--batches", "1"]) == 2
    assert "smallest achievable" in capsys.readouterr().err
    # A sweep of another model would pick by that model's costs: refused.
    other = ckpt.save_checkpoint(tmp_path / "other", tiny_model(n_layer=3, vocab_size=257,
                                                                d_model=64), tok)
    assert main(["extract", str(other), "--max-params", "30000", "--sweep", str(out),
                 "--out", str(tmp_path / "x")]) == 2
    assert "made on another model" in capsys.readouterr().err
    assert main(["extract", str(src), "--max-params", "30000", "--sweep", str(out),
                 "--skip-attention", "1", "--out", str(tmp_path / "x")]) == 2
    assert "--skip-attention or a budget" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
