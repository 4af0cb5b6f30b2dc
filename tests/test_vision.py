"""MatViT: nesting invariants, extraction, checkpoints, data, retrieval, and the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import state_equal

from matformer import checkpoint as ckpt
from matformer import families
from matformer.cli import main
from matformer.submodels.extract import extract
from matformer.train import TrainConfig, Trainer
from matformer.vision import (
    MatViT,
    VisionTask,
    ViTConfig,
    evaluate_classifier,
    vit_preset,
)
from matformer.vision.data import ImageDataset, load_image_folder, random_shift
from matformer.vision.evaluate import knn_retrieval

TINY: dict[str, Any] = dict(image_size=8, patch_size=2, d_model=16, n_layer=3, n_head=2,
                            d_ff=64, num_classes=3)  # FFN widths S/M/L/XL = 8/16/32/64


def tiny_vit(seed: int = 0, **kw: Any) -> MatViT:
    torch.manual_seed(seed)
    return MatViT(ViTConfig(**{**TINY, **kw}))


def images(n: int = 4, seed: int = 0, shape: tuple[int, ...] = (1, 8, 8)) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


def bars(n_per_class: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three learnable classes of 8x8 images: a horizontal bar, a vertical bar, a diagonal."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for label in range(3):
        for _ in range(n_per_class):
            img = 0.15 * torch.rand(8, 8, generator=g)
            k = int(torch.randint(1, 7, (1,), generator=g))
            if label == 0:
                img[k] = 1.0
            elif label == 1:
                img[:, k] = 1.0
            else:
                img += torch.eye(8).roll(k - 3, dims=1)
            xs.append(img.clamp(0, 1)[None])
            ys.append(label)
    return torch.stack(xs), torch.tensor(ys)


def bars_dataset(seed: int = 0) -> ImageDataset:
    x, y = bars(seed=seed)
    vx, vy = bars(8, seed=seed + 100)
    return ImageDataset(x, y, vx, vy, ("h", "v", "d"), "bars")


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize(("kw", "match"), [
    (dict(patch_size=3), "patch_size=3 must divide image_size=8"),
    (dict(pos_embed="rope"), "pos_embed='rope'"),
    (dict(channels=2), "channels=2"),
    (dict(num_classes=0), "num_classes=0"),
    (dict(pos_embed="sincos", d_model=18, n_head=3), "divisible by 4"),
    (dict(ratios=(0.5, 0.25, 1.0)), "strictly increasing"),
])
def test_config_validation(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ViTConfig(**{**TINY, **kw})


def test_config_round_trip_and_dense() -> None:
    cfg = ViTConfig(**TINY, pos_embed="sincos")
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["kind"] == "vit" and "vocab_size" not in d
    assert ViTConfig.from_dict(d) == cfg
    assert cfg.max_seq_len == 17 and cfg.vocab_size == 3 and not cfg.tie_embeddings
    base = cfg.dense("M")
    assert isinstance(base, ViTConfig) and base.ffn_dims == (16,) * 3 and base.names == ("M",)
    with pytest.raises(ValueError, match="not a vision config"):
        ViTConfig.from_dict({**d, "kind": "lm"})
    with pytest.raises(ValueError, match="unknown vision preset"):
        vit_preset("vit-huge")


@pytest.mark.parametrize("pos", ["learned", "sincos"])
def test_param_count_matches_modules(pos: str) -> None:
    model = tiny_vit(pos_embed=pos)
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    for g in model.config.names:
        sub = extract(model, g)
        assert sub.num_params() == model.num_params(g) == sum(p.numel()
                                                               for p in sub.parameters())


@pytest.mark.parametrize(("kw", "heads"), [({}, None),
                                           ({"nest_heads": True}, "S"),
                                           ({}, (0, 4, 2))])
def test_cost_counts_the_heads_that_run(kw: dict[str, Any], heads: Any) -> None:
    """FLOPs per image equal what a FLOP counter sees in the forward pass (attention on the
    math kernel so that its products are counted), and parameters what an extracted copy
    holds, for nested heads and for layers without attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_vit(**{"n_head": 4, "d_model": 32, **kw}).eval()
    sub_s = model.submodel("S", heads)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(images(1), widths=sub_s)
    assert model.config.flops_per_image(sub_s) == counter.get_total_flops()
    # An extracted copy holds every head of a layer that has attention, the dropped ones
    # zeroed (a dense config's head size is d_model / n_head): the count of heads that run is
    # what it holds less those zeros.
    sub = extract(model, sub_s)
    held = sum(p.numel() for p in sub.parameters())
    kept = tuple(model.config.n_head if h else 0 for h in sub_s.heads)
    assert sub.num_params() == model.num_params(model.submodel("S", kept)) == held
    zeroed = sum(int((p == 0).sum()) for n, p in sub.named_parameters() if ".attn." in n)
    assert model.num_params(sub_s) == held - zeroed
    if heads is not None:  # fewer heads than the full attention: fewer FLOPs
        all_heads = model.submodel(sub_s.widths)
        assert model.config.flops_per_image(sub_s) < model.config.flops_per_image(all_heads)


# ----------------------------------------------------------------------------- nesting
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("widths", ["S", "L", (8, 64, 16)])
def test_slicing_equals_masking(activation: str, widths: Any) -> None:
    """A submodel run on weight slices equals the full model with the other units zeroed."""
    model = tiny_vit(activation=activation).eval()
    ws = model.submodel(widths).widths
    masked = tiny_vit(activation=activation).eval()
    with torch.no_grad():
        for block, w in zip(masked.blocks, ws, strict=True):
            block.ffn.up_proj.weight[w:] = 0
            block.ffn.down_proj.weight[:, w:] = 0
            if block.ffn.gate_proj is not None:
                block.ffn.gate_proj.weight[w:] = 0
        x = images(5)
        torch.testing.assert_close(model(x, widths=widths), masked(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(model.embed(x, widths=widths), masked.embed(x), rtol=0,
                                   atol=1e-6)


def test_gradient_of_smallest_granularity_is_local() -> None:
    model = tiny_vit()
    x, y = images(6), torch.tensor([0, 1, 2, 0, 1, 2])
    torch.nn.functional.cross_entropy(model(x, widths="S"), y).backward()
    w = model.config.ffn_widths("S")[0]
    for block in model.blocks:
        assert block.ffn.up_proj.weight.grad[w:].abs().max() == 0
        assert block.ffn.down_proj.weight.grad[:, w:].abs().max() == 0
        assert block.ffn.up_proj.weight.grad[:w].abs().max() > 0
    assert model.patch_embed.weight.grad.abs().max() > 0  # shared parts are trained by all


def test_attention_is_bidirectional() -> None:
    """The [CLS] token sits first: with causal attention it could never see a patch."""
    model = tiny_vit().eval()
    x = images(2)
    x2 = x.clone()
    x2[:, :, -2:, -2:] += 0.5  # change only the last patch
    with torch.no_grad():
        assert (model.embed(x) - model.embed(x2)).abs().max() > 1e-4


def test_bad_image_shape_and_widths() -> None:
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"expected \(batch, 1, 8, 8\)"):
        model(images(2, shape=(1, 16, 16)))
    with pytest.raises(ValueError, match="out of range"):
        model(images(2), widths=(8, 8, 65))


def test_nested_heads_run() -> None:
    model = tiny_vit(nest_heads=True, n_head=4)  # heads S/M/L/XL: 1/2/3/4
    assert model(images(2), widths="S").shape == (2, 3)  # S's nested heads too


# ----------------------------------------------------------------------------- extract / ckpt
@pytest.mark.parametrize("pos", ["learned", "sincos"])
@pytest.mark.parametrize("widths", ["S", "XL", (8, 32, 64), (64, 16, 8)])
def test_extract_equals_in_place_submodel(pos: str, widths: Any) -> None:
    model = tiny_vit(pos_embed=pos).eval()
    sub = extract(model, widths).eval()
    x = images(3)
    with torch.no_grad():
        torch.testing.assert_close(sub(x), model(x, widths=widths), rtol=0, atol=1e-6)
        again = extract(sub, (8, 8, 8))  # closure: extract from an extracted ViT
        torch.testing.assert_close(again(x), model(x, widths="S"), rtol=0, atol=1e-6)
    assert type(sub) is MatViT and isinstance(sub.config, ViTConfig)
    assert sub.config.ratios == (1.0,) and sub.config.ffn_dims == model.submodel(widths).widths


@pytest.mark.parametrize("pos", ["learned", "sincos"])
def test_checkpoint_round_trip_bit_exact(tmp_path: Path, pos: str) -> None:
    model = tiny_vit(pos_embed=pos)
    path = ckpt.save_checkpoint(tmp_path / "c", model, None, metadata={"data": "digits"})
    assert not (path / ckpt.TOKENIZER).exists()
    assert json.loads((path / ckpt.CONFIG).read_text())["kind"] == "vit"
    assert families.model_kind(path) == "vit"
    loaded, tok = families.load_checkpoint(path)
    assert tok is None and type(loaded) is MatViT and loaded.config == model.config
    assert state_equal(model, loaded) == []
    x = images(2)
    with torch.no_grad():
        assert torch.equal(loaded(x, widths="M"), model(x, widths="M"))


def test_lm_checkpoint_without_tokenizer_is_refused(tmp_path: Path) -> None:
    from helpers import tiny_model

    path = ckpt.save_checkpoint(tmp_path / "lm", tiny_model(), None)
    with pytest.raises(ckpt.CheckpointError, match="needs its tokenizer"):
        families.load_checkpoint(path)


# ----------------------------------------------------------------------------- training
def _trainer(run: Path, steps: int, **kw: Any) -> Trainer:
    cfg = ViTConfig(**TINY)
    torch.manual_seed(0)
    tc = TrainConfig(**{**dict(mode="sample", data="bars", steps=steps, batch_size=12,
                               lr=3e-3, warmup_steps=2, eval_interval=1000, ckpt_interval=3,
                               precision="fp32", parallel="none"), **kw})
    return Trainer(MatViT(cfg), VisionTask(bars_dataset(), cfg, max_shift=1), tc, run,
                   progress=False)


def test_batches_are_pure_epochwise_and_sharded() -> None:
    data, cfg = bars_dataset(), ViTConfig(**TINY)
    a, b = VisionTask(data, cfg), VisionTask(data, cfg)
    xa, ya = a.batch(5, 12, seed=3, rank=0, world_size=1)
    b.batch(0, 12, seed=3)  # another state of the permutation cache
    xb, yb = b.batch(5, 12, seed=3)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    parts = [a.batch(5, 12, 3, rank=r, world_size=3) for r in range(3)]
    assert torch.equal(torch.cat([p[1] for p in parts]).sort().values, ya.sort().values)
    # Without augmentation, one epoch (72 images, 6 steps of 12) shows every image once.
    c = VisionTask(data, cfg, max_shift=0)
    seen = torch.cat([c.batch(s, 12, seed=1)[0] for s in range(6)])
    assert torch.equal(seen.flatten(1).unique(dim=0), data.train_x.flatten(1).unique(dim=0))
    assert len(seen) == len(data.train_x)
    with pytest.raises(ValueError, match="world_size"):
        a.batch(0, 10, 0, rank=0, world_size=3)


def test_random_shift_moves_pixels() -> None:
    img = torch.zeros(64, 1, 8, 8)
    img[:, :, 4, 4] = 1.0
    out = random_shift(img, 1, torch.Generator().manual_seed(0))
    pos = out.flatten(1).argmax(1)
    rows, cols = pos // 8, pos % 8
    assert out.sum() == 64 and set(rows.tolist()) == {3, 4, 5} and set(cols.tolist()) == {3, 4, 5}
    assert torch.equal(random_shift(img, 0, torch.Generator()), img)


def test_resume_is_bit_identical(tmp_path: Path) -> None:
    full = _trainer(tmp_path / "full", 6)
    full.fit()
    half = _trainer(tmp_path / "half", 6)
    half.cfg = TrainConfig(**{**half.cfg.to_dict(), "steps": 3})
    half.fit()
    resumed = _trainer(tmp_path / "half", 6)
    resumed.resume()
    assert resumed.step == 3
    resumed.fit()
    assert state_equal(full.raw, resumed.raw) == []


def test_task_checks_the_model() -> None:
    data = bars_dataset()
    with pytest.raises(ValueError, match="do not fit the model"):
        VisionTask(data, ViTConfig(**TINY)).check(ViTConfig(**{**TINY, "image_size": 16}))
    with pytest.raises(ValueError, match="only 2"):
        VisionTask(data, ViTConfig(**TINY)).check(ViTConfig(**{**TINY, "num_classes": 2}))


def test_sample_mode_learns_every_granularity(tmp_path: Path) -> None:
    t = _trainer(tmp_path / "r", 200, warmup_steps=10, ckpt_interval=1000)
    t.task.max_shift = 0
    t.fit()
    data = t.task.data
    for g in t.raw.config.names:
        acc = evaluate_classifier(t.raw, data.val_x, data.val_y, widths=g)["accuracy"]
        assert acc > 0.8, (g, acc)


# ----------------------------------------------------------------------------- retrieval
def test_knn_retrieval_on_a_constructed_example() -> None:
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7]])
    g_y = torch.tensor([0, 1, 2, 1])
    query = torch.tensor([[2.0, 0.1],   # nearest [1,0] (class 0): hit
                          [0.1, 3.0],   # nearest [0,1] (class 1): hit
                          [0.6, 0.5],   # nearest [.7,.7] (class 1) but is class 0: miss @1,
                                        # 2nd nearest [1,0] (class 0): hit @2
                          [-1.0, -0.2]])  # order [-1,0], [0,1], [.7,.7], [1,0]: class 0
    q_y = torch.tensor([0, 1, 0, 0])      # comes 4th: a hit only @4
    r = knn_retrieval(query, q_y, gallery, g_y, ks=(1, 2, 4))
    assert r["top1_accuracy"] == pytest.approx(0.5)
    assert r["recall@1"] == pytest.approx(0.5)
    assert r["recall@2"] == pytest.approx(0.75)
    assert r["recall@4"] == pytest.approx(1.0)
    assert r["chance"] == pytest.approx(0.75 * 0.25 + 0.25 * 0.5)  # sum_c p_query p_gallery
    with pytest.raises(ValueError, match="same width"):
        knn_retrieval(query, q_y, torch.zeros(4, 3), g_y)


# ----------------------------------------------------------------------------- data
def _png(path: Path, size: tuple[int, int], mode: str = "L", value: int = 128) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    arr = np.clip(rng.normal(value, 20, shape), 0, 255).astype(np.uint8)
    Image.fromarray(arr, mode=mode).save(path)


def image_folder(root: Path, n: int = 10) -> Path:
    """Two classes (dark / bright), mixed sizes and modes, and a stray text file."""
    for i in range(n):
        _png(root / "dark" / f"{i}.png", (8, 8) if i % 2 else (13, 20), "L", 40)
        _png(root / "bright" / f"{i}.png", (16, 16), "RGB" if i % 3 else "L", 210)
    (root / "bright" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_loading_and_bad_input(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "imgs")
    data = load_image_folder(root, image_size=8, channels=3, val_fraction=0.2)
    assert data.classes == ("bright", "dark") and data.image_shape == (3, 8, 8)
    assert len(data.train_y) == 16 and len(data.val_y) == 4
    assert sorted(data.val_y.tolist()) == [0, 0, 1, 1]  # stratified
    assert data.train_x.min() >= 0 and data.train_x.max() <= 1
    assert data.train_x[data.train_y == 0].mean() > data.train_x[data.train_y == 1].mean()
    again = load_image_folder(root, image_size=8, channels=3, val_fraction=0.2)
    assert torch.equal(again.val_x, data.val_x)  # the split is deterministic

    (root / "dark" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        load_image_folder(root, image_size=8)
    skipped = load_image_folder(root, image_size=8, skip_unreadable=True)
    assert len(skipped.train_y) + len(skipped.val_y) == 20
    (root / "empty").mkdir()
    with pytest.raises(ValueError, match=r"\['empty'\] .* hold no images"):
        load_image_folder(root, image_size=8, skip_unreadable=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "nope", image_size=8)
    one = tmp_path / "one"
    _png(one / "a" / "x.png", (4, 4))
    with pytest.raises(ValueError, match="at least 2 class"):
        load_image_folder(one, image_size=8)


# ----------------------------------------------------------------------------- CLI end to end
def _run(capsys: pytest.CaptureFixture, *argv: str) -> Any:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_train_eval_retrieve_mixnmatch_extract(tmp_path: Path, capsys) -> None:
    root = str(image_folder(tmp_path / "imgs", n=8))
    common = ["--data", root, "--preset", "vit-tiny", "--steps", "12", "--batch-size", "8",
              "--no-progress", "--eval-interval", "6", "--ckpt-interval", "6", "--json"]
    run, base_s, base_xl = tmp_path / "run", tmp_path / "S", tmp_path / "XL"
    res = _run(capsys, "vision", "train", *common, "--out", str(run))
    assert [r["name"] for r in res["results"]] == ["S", "M", "L", "XL"]
    assert res["config"]["image_size"] == 8 and res["config"]["channels"] == 1
    _run(capsys, "vision", "train", *common, "--mode", "baseline", "--granularity", "S",
         "--out", str(base_s))
    _run(capsys, "vision", "train", *common, "--mode", "baseline", "--out", str(base_xl))
    assert main(["vision", "train", *common, "--out", str(run)]) == 2  # exists: needs --resume
    assert "--resume" in capsys.readouterr().err

    assert main(["vision", "eval", str(run), "--widths", "1,8"]) == 2  # untrained: refused
    assert "--any-width" in capsys.readouterr().err
    ev = _run(capsys, "vision", "eval", str(run), "--baselines", str(base_s), str(base_xl),
              "--widths", "1,8", "--any-width", "--json", "--plot", str(tmp_path / "acc.png"))
    fam = ev["families"]
    assert list(fam) == ["MatViT run", "baselines"] and ev["images"] == 4
    assert fam["MatViT run"][0]["widths"] == [1, 8]
    assert all(0 <= r["accuracy"] <= 1 for rows in fam.values() for r in rows)
    assert (tmp_path / "acc.png").stat().st_size > 5000

    out = tmp_path / "retrieval"
    rt = _run(capsys, "vision", "retrieve", str(run), "--baselines", str(base_s), str(base_xl),
              "--mixnmatch", "--k", "1,3", "--repeats", "1", "--out", str(out), "--json")
    groups = [r["group"] for r in rt["rows"]]
    assert groups.count("matvit") == 4 and groups.count("baseline") == 2
    assert "matvit-mixnmatch" in groups and rt["gallery"] == 12 and rt["queries"] == 4
    for r in rt["rows"]:
        assert r["top1_accuracy"] <= r["recall@3"] and "latency_ms" in r
    xl = next(r for r in rt["rows"] if r["name"] == "MatViT XL")
    assert xl["top1_accuracy"] == xl["same_encoder_top1"]  # XL queries its own gallery
    assert {p.name for p in out.iterdir()} == {"retrieval.json", "retrieval.png",
                                               "retrieval.md"}

    mx = _run(capsys, "vision", "mixnmatch", str(run), "--baselines", str(base_s),
              "--repeats", "1", "--max-params", "4000", "--out", str(tmp_path / "mm"), "--json")
    assert len(mx["candidates"]) >= 4 and len(mx["baselines"]) == 1
    assert any(r["pareto_params"] for r in mx["candidates"])
    assert mx["selected"]["params"] <= 4000
    assert (tmp_path / "mm" / "mixnmatch.png").exists()
    # extract picks from the ViT sweep by accuracy, as vision mixnmatch does
    picked = _run(capsys, "extract", str(run), "--max-params", "4000", "--sweep",
                  str(tmp_path / "mm"), "--out", str(tmp_path / "picked"), "--json")
    assert picked["selected"] == mx["selected"] and picked["widths"] == mx["selected"]["widths"]
    assert main(["extract", str(run), "--max-params", "4000", "--out",
                 str(tmp_path / "nope")]) == 2
    assert "vision mixnmatch" in capsys.readouterr().err

    ex = tmp_path / "M"
    assert main(["extract", str(run), "--granularity", "M", "--out", str(ex)]) == 0
    capsys.readouterr()
    sub = _run(capsys, "vision", "eval", str(ex), "--json")  # the data spec travelled along
    assert sub["families"]["M"][0]["widths"] == [16, 16]
    whole = _run(capsys, "vision", "eval", str(run), "--granularity", "M", "--json")
    assert sub["families"]["M"][0]["accuracy"] == whole["families"]["MatViT run"][0]["accuracy"]

    assert main(["vision", "train", *common[:-1], "--out", str(run), "--resume",
                 "--steps", "18"]) == 0  # resume keeps its saved settings (12 steps): no-op
    capsys.readouterr()
    lm = tmp_path / "lm"
    from helpers import tiny_model

    from matformer.tokenizer import Tokenizer

    ckpt.save_checkpoint(lm, tiny_model(), Tokenizer.byte_level())
    assert main(["vision", "eval", str(lm)]) == 2
    assert "language-model checkpoint" in capsys.readouterr().err
    assert main(["eval", str(run)]) == 2  # and the LM commands point to the vision ones
    assert "matformer vision eval" in capsys.readouterr().err


def test_select_most_accurate_under_budget() -> None:
    from matformer.vision.evaluate import select

    rows = [{"name": n, "params": p, "flops_per_image": 10 * p, "accuracy": a, "error": 1 - a}
            for n, p, a in (("S", 100, 0.90), ("mix", 150, 0.95), ("M", 150, 0.95),
                            ("XL", 400, 0.97))]
    assert select(rows, max_params=200)["name"] == "mix"  # ties: first of the fewest params
    assert select(rows, max_flops=4000)["name"] == "XL"
    with pytest.raises(ValueError, match="max_params=50 but the smallest achievable is 100"):
        select(rows, max_params=50)
    with pytest.raises(ValueError, match="no latency_ms column"):
        select(rows, max_latency_ms=1.0)


def test_forward_latency_runs_each_setups_heads() -> None:
    """A (model, submodel) setup is timed with its heads (a depth candidate's)."""
    from matformer.submodels.latency import forward_latency

    model = tiny_vit(n_head=4, d_model=32)
    seen: list[Any] = []
    model.register_forward_pre_hook(
        lambda m, args, kw: seen.append(model.submodel(kw.get("widths")).heads),
        with_kwargs=True)
    rows = forward_latency([(model, "S"), (model, model.submodel("S", (0, 4, 2)))],
                           [images(1)] * 2, repeats=1, warmup=0)
    assert len(rows) == 2 and all(r["latency_ms"] > 0 for r in rows)
    assert set(seen) == {(4, 4, 4), (0, 4, 2)}
