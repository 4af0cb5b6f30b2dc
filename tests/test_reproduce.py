"""``matformer reproduce`` and ``matformer sizes``: the plan (what is trained, on how many
tokens), the statistics rule, the size table, and (slow) the structure of a quick report, its
resumption and its refusal of other settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import random_tokens, tiny_model, write_corpus

from matformer.reproduce import RECIPES, ReproConfig, quick_config
from matformer.reproduce.report import stat, verdict
from matformer.reproduce.run import reproduce
from matformer.reproduce.scaling import fit, scaled_config
from matformer.reproduce.sizes import size_table
from matformer.submodels.extract import extract


def test_plan_follows_the_matching_rule() -> None:
    rc = ReproConfig(base_steps=10)
    runs = {r.name: r for r in rc.runs()}
    assert runs["sample"].steps == 40 and runs["sample"].mode == "sample"
    assert runs["xl-up"].probs == (0.17, 0.20, 0.22, 0.41)
    assert runs["distill"].distill == rc.distill and runs["distill"].steps == 40
    assert runs["joint"].steps == 10 and runs["joint"].mode == "joint"  # 4 sizes x X tokens
    for g in ("S", "M", "L", "XL"):
        assert runs[f"base-{g}"].steps == 10 and runs[f"base-{g}"].granularity == g
    assert runs["base-S-4x"].steps == runs["base-XL-4x"].steps == 40  # equal tokens
    assert set(RECIPES) == {"sample", "xl-up", "distill", "joint"}


def test_config_validation_and_sample_first() -> None:
    assert ReproConfig(recipes=("joint",)).recipes == ("sample", "joint")
    assert ReproConfig(recipes=("xl-up", "sample")).recipes == ("sample", "xl-up")
    with pytest.raises(ValueError, match="unknown recipe"):
        ReproConfig(recipes=("nope",))
    with pytest.raises(ValueError, match="shape"):
        ReproConfig(shape="huge")
    with pytest.raises(ValueError, match="base_steps"):
        ReproConfig(base_steps=0)
    assert ReproConfig.from_dict(ReproConfig().to_dict()) == ReproConfig()


def test_refuses_a_folder_that_is_not_a_reproduction(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no reproduction"):
        reproduce(quick_config(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_stat_and_verdict() -> None:
    one = stat([0.5])
    assert one["sd"] == 0 and verdict(one) == "1 seed"
    assert verdict(stat([-0.05, -0.06, -0.04])) == "lower"
    assert verdict(stat([0.05, 0.06, 0.04])) == "higher"
    assert verdict(stat([-0.05, 0.04, 0.0])) == "within spread"


def test_scaling_fit_recovers_a_known_law() -> None:
    a, b, c = 20.0, -0.12, 1.5
    pts = [(n, d, a * (n * d) ** b + c) for n in (1e5, 3e5, 1e6) for d in (1e5, 4e5)]
    f = fit(pts)
    assert f["b"] == pytest.approx(b, abs=1e-3)
    assert f["a"] == pytest.approx(a, rel=0.02) and f["c"] == pytest.approx(c, abs=0.01)
    assert f["rmse"] < 1e-3 and f["points"] == 6
    with pytest.raises(ValueError, match=">= 3 points"):
        fit(pts[:2])
    half = scaled_config(ReproConfig(base_steps=100), "repro-64")
    assert half.base_steps == 50 and half.recipes == ("sample",) and half.seeds == 1


def test_size_table_rows() -> None:
    model = tiny_model()
    x = random_tokens(2, 16)
    rows = size_table(model, [(x[:, :-1], x[:, 1:])], repeats=1, context=8)
    assert [r["name"] for r in rows] == ["S", "M", "L", "XL"]
    assert [r["params"] for r in rows] == sorted(r["params"] for r in rows)
    assert rows[-1]["speed_vs_full"] == 1.0 and rows[-1]["loss_vs_full"] == 0.0
    assert all(r["tokens_per_s"] > 0 and torch.isfinite(torch.tensor(r["val_loss"]))
               for r in rows)


def test_size_table_counts_a_head_nested_granularitys_own_heads() -> None:
    """Loss, parameters and speed of one row are all the same submodel's: S with S's heads."""
    model = tiny_model(n_head=4, nest_heads=True)
    x = random_tokens(2, 16)
    rows = size_table(model, [(x[:, :-1], x[:, 1:])], repeats=1, context=8)
    for r in rows:
        held = extract(model, r["name"])  # its dropped heads zeroed
        zeroed = sum(int((p == 0).sum()) for n, p in held.named_parameters() if ".attn." in n)
        assert r["params"] == held.num_params() - zeroed
    all_heads = model.submodel("S").widths  # widths alone: every head
    assert rows[0]["params"] < model.num_params(all_heads)  # fewer heads than all of them


@pytest.mark.slow
def test_quick_reproduction_report_structure(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus.txt", n_words=4000)
    rc = quick_config(data=str(corpus), base_steps=4, recipes=("sample", "distill", "joint"))
    out = tmp_path / "report"
    seen: list[tuple[str, str]] = []
    res = reproduce(rc, out, progress=lambda k, what, s: seen.append((k, what)),
                    command="matformer reproduce --quick", scaling=True)
    for name in ("report.md", "results.json", "loss_vs_params.png", "consistency.png",
                 "scaling.png",
                 "mixnmatch/mixnmatch.png", "mixnmatch/mixnmatch.json"):
        assert (out / name).is_file(), name
    text = (out / "report.md").read_text()
    for heading in ("## Setup", "## Validation loss", "### MatLM minus its dense baseline",
                    "### Equal-tokens gap", "## Mix'n'Match", "## Consistency with XL",
                    "## Speculative decoding", "## Scaling", "Matching rule",
                    "matformer reproduce --quick", "torch"):
        assert heading in text, heading
    data = json.loads((out / "results.json").read_text())
    assert set(data["losses"]) == {r.name for r in rc.runs()}
    assert set(data["vs_baseline"]) == {"sample", "distill", "joint"}
    assert set(data["equal_tokens"]["sample"]) == {"S", "XL"}
    assert set(data["consistency"]) == {"sample", "distill", "joint", "baseline"}
    spec = data["speculative"]
    assert {"sample:XL", "sample:shared-cache", "baseline:external"} <= set(spec)
    assert spec["sample:shared-cache"]["matches_target_greedy"] is True
    assert res["seeds"] == [0]
    fits = data["scaling"]["fits"]
    assert set(fits) == {"matlm", "baseline"} and fits["matlm"]["points"] == 12
    assert "| dense baselines |" in text.split("## Scaling")[1]
    assert all(what == "done" for _, what in seen if what != "start")
    # a rerun skips every stage and rewrites the same report
    again: list[tuple[str, str]] = []
    reproduce(rc, out, progress=lambda k, what, s: again.append((k, what)), scaling=True)
    assert again and all(what == "skip" for _, what in again)
    with pytest.raises(ValueError, match="other settings"):
        reproduce(quick_config(data=str(corpus), base_steps=5), out)


def test_cli_train_distill_then_sizes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from matformer.cli import main

    monkeypatch.setenv("MATFORMER_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus.txt")
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--tokenizer", "byte", "--steps", "4",
                 "--batch-size", "4", "--seq-len", "32", "--eval-interval", "4",
                 "--eval-batches", "1", "--ckpt-interval", "4", "--warmup-steps", "1",
                 "--precision", "fp32", "--no-progress", "--distill", "0.5",
                 "--data", str(corpus), "--out", str(run)]) == 0
    assert json.loads((run / "train_config.json").read_text())["distill"] == 0.5
    capsys.readouterr()
    assert main(["sizes", str(run), "--batches", "1", "--batch-size", "2", "--repeats", "1",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in res["sizes"]] == ["S", "M", "L", "XL"]
    assert Path(res["plot"]).is_file() and res["threads"] == 1
    assert main(["train", "--preset", "tiny", "--mode", "baseline", "--distill", "0.5",
                 "--data", str(corpus), "--out", str(tmp_path / "bad")]) == 2
    assert "needs a nested model" in capsys.readouterr().err
