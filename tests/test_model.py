"""Tests for matformer.model: slicing == masking, gradient locality, baselines, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import clone, random_tokens, tiny_config, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from matformer.model import MatFormerLM, NestedFFN, lm_loss

ACTS = ("swiglu", "gelu", "relu2")
ATOL = 1e-5


def _mask_ffn(model: MatFormerLM, widths: tuple[int, ...]) -> MatFormerLM:
    """A copy of the full model whose FFN hidden units >= width are zeroed, layer by layer."""
    masked = clone(model)
    with torch.no_grad():
        for block, w in zip(masked.blocks, widths, strict=True):
            ffn = block.ffn
            ffn.up_proj.weight[w:] = 0
            if ffn.gate_proj is not None:
                ffn.gate_proj.weight[w:] = 0
            ffn.down_proj.weight[:, w:] = 0
    return masked


def _mask_heads(model: MatFormerLM, heads: tuple[int, ...]) -> MatFormerLM:
    """A copy whose query heads >= h are zeroed and whose o_proj ignores them.

    A zeroed query gives uniform attention (not zero output), but o_proj's zeroed columns drop
    that head's output entirely, so the result equals running only the first h heads.
    """
    masked = clone(model)
    hd = model.config.head_dim
    with torch.no_grad():
        for block, h in zip(masked.blocks, heads, strict=True):
            block.attn.q_proj.weight[h * hd:] = 0
            block.attn.o_proj.weight[:, h * hd:] = 0
    return masked


# ----------------------------------------------------------------------------- slicing == masking


@pytest.mark.parametrize("activation", ACTS)
def test_slicing_equals_masking(activation: str) -> None:
    model = tiny_model(activation=activation, seed=1).eval()
    idx = random_tokens(2, 16)
    with torch.no_grad():
        for spec in ("S", "M", "L", 3, 63, (8, 40), (1, 64), (64, 5)):
            widths = model.submodel(spec).widths
            sliced = model(idx, widths=spec)
            full_masked = _mask_ffn(model, widths)(idx)
            torch.testing.assert_close(sliced, full_masked, atol=ATOL, rtol=0)
            # and the submodel really is a different function than the full model
            assert not torch.allclose(sliced, model(idx), atol=1e-4)
        assert torch.equal(model(idx, widths="XL"), model(idx))
        assert torch.equal(model(idx, widths=64), model(idx, widths=None))


@pytest.mark.parametrize("activation", ACTS)
def test_ffn_module_slicing_equals_masking(activation: str) -> None:
    torch.manual_seed(0)
    ffn = NestedFFN(16, 24, activation)
    x = torch.randn(3, 5, 16)
    for w in (1, 7, 12, 24):
        ref = NestedFFN(16, 24, activation)
        ref.load_state_dict(ffn.state_dict())
        with torch.no_grad():
            ref.up_proj.weight[w:] = 0
            if ref.gate_proj is not None:
                ref.gate_proj.weight[w:] = 0
            ref.down_proj.weight[:, w:] = 0
        torch.testing.assert_close(ffn(x, w), ref(x), atol=ATOL, rtol=0)
    assert (ffn.gate_proj is not None) == (activation == "swiglu")


def test_head_nesting_equals_masking_mha() -> None:
    model = tiny_model(n_head=4, nest_heads=True, seed=2).eval()
    idx = random_tokens(2, 12)
    with torch.no_grad():
        for name in model.config.names:
            heads = model.config.head_counts(name)
            got = model(idx, widths=model.submodel(None, name))
            ref = _mask_heads(model, heads)(idx)
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
        got = model(idx, widths=model.submodel("M", (1, 3)))
        ref = _mask_heads(_mask_ffn(model, model.submodel("M").widths), (1, 3))(idx)
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
        assert not torch.allclose(model(idx, widths=model.submodel(None, 1)), model(idx),
                                  atol=1e-4)


def test_head_nesting_equals_masking_gqa() -> None:
    """With GQA, the first h query heads read the first h / group kv heads (j -> j // group)."""
    cfg = tiny_config(n_head=4, n_kv_head=2, nest_heads=True, ratios=(0.5, 1.0),
                      names=("S", "XL"), head_ratios=(0.5, 1.0))
    model = tiny_model(cfg, seed=3).eval()
    idx = random_tokens(2, 12)
    with torch.no_grad():
        got = model(idx, widths="S")  # a granularity name brings its nested heads
        ref = _mask_heads(_mask_ffn(model, cfg.ffn_widths("S")), (2, 2))(idx)
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
        # zeroing the *second* kv head too changes nothing: the 2 remaining heads never read it
        kv_masked = _mask_heads(model, (2, 2))
        for block in kv_masked.blocks:
            block.attn.k_proj.weight[cfg.head_dim:] = 0
            block.attn.v_proj.weight[cfg.head_dim:] = 0
        torch.testing.assert_close(model(idx, widths=model.submodel(None, 2)), kv_masked(idx),
                                   atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- gradient locality


@pytest.mark.parametrize("activation", ACTS)
def test_gradient_locality(activation: str) -> None:
    model = tiny_model(activation=activation, seed=4)
    idx, tgt = random_tokens(4, 16, seed=1), random_tokens(4, 16, seed=2)
    w = model.config.ffn_widths("S")[0]
    lm_loss(model(idx, widths="S"), tgt).backward()
    for block in model.blocks:
        ffn = block.ffn
        mats = [("up", ffn.up_proj.weight.grad)]
        if ffn.gate_proj is not None:
            mats.append(("gate", ffn.gate_proj.weight.grad))
        for name, g in mats:
            assert torch.count_nonzero(g[w:]) == 0, name
            assert bool((g[:w].abs().sum(dim=1) > 0).all()), name  # every trained unit learns
        g = ffn.down_proj.weight.grad
        assert torch.count_nonzero(g[:, w:]) == 0
        assert bool((g[:, :w].abs().sum(dim=0) > 0).all())
        # shared parts are trained by every granularity
        assert block.attn.q_proj.weight.grad.abs().sum() > 0
    # the full model, in contrast, trains every unit
    model.zero_grad()
    lm_loss(model(idx), tgt).backward()
    assert bool((model.blocks[0].ffn.up_proj.weight.grad.abs().sum(dim=1) > 0).all())


def test_gradient_locality_heads() -> None:
    model = tiny_model(n_head=4, nest_heads=True, seed=5)
    idx, tgt = random_tokens(2, 8, seed=1), random_tokens(2, 8, seed=2)
    lm_loss(model(idx, widths=model.submodel(None, "S")), tgt).backward()  # 1 head of 4
    hd = model.config.head_dim
    for block in model.blocks:
        for proj in ("q_proj", "k_proj", "v_proj"):
            g = getattr(block.attn, proj).weight.grad
            assert torch.count_nonzero(g[hd:]) == 0 and torch.count_nonzero(g[:hd]) > 0
        g = block.attn.o_proj.weight.grad
        assert torch.count_nonzero(g[:, hd:]) == 0 and torch.count_nonzero(g[:, :hd]) > 0


# ----------------------------------------------------------------------------- baselines / extract


def _extract(model: MatFormerLM, granularity: str) -> MatFormerLM:
    """Dense model of one granularity with the MatFormer's weights (FFN prefixes sliced)."""
    dense = MatFormerLM(model.config.dense(granularity))
    widths = model.config.ffn_widths(granularity)
    src = model.state_dict()
    out = {}
    for key, target in dense.state_dict().items():
        value = src[key]
        if key.endswith(("up_proj.weight", "gate_proj.weight")):
            value = value[: widths[int(key.split(".")[1])]]
        elif key.endswith("down_proj.weight"):
            value = value[:, : widths[int(key.split(".")[1])]]
        assert value.shape == target.shape, key
        out[key] = value.clone()
    dense.load_state_dict(out)
    return dense


@pytest.mark.parametrize(("activation", "d_ff"), [("swiglu", 64), ("gelu", (64, 128)),
                                                  ("relu2", 64)])
@pytest.mark.parametrize("granularity", ["S", "L"])
def test_dense_baseline_equals_submodel(activation: str, d_ff: int | tuple, granularity: str
                                        ) -> None:
    model = tiny_model(activation=activation, d_ff=d_ff, seed=6).eval()
    dense = _extract(model, granularity).eval()
    assert dense.config.names == (granularity,)
    assert dense.num_params() == model.num_params(granularity)
    assert dense.lm_head.weight is dense.embed.weight
    idx = random_tokens(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(dense(idx), model(idx, widths=granularity), atol=1e-6, rtol=0)
        torch.testing.assert_close(dense(idx, widths=granularity),
                                   model(idx, widths=granularity), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("widths", "pattern"),
    [(-1, r"width -1 at layer 0 is out of range: allowed 0\.\.64"),
     (65, r"width 65 at layer 0 is out of range"),
     ((8, 65), r"width 65 at layer 1 is out of range"),
     ((8, -1), r"width -1 at layer 1"),
     ((8, 8, 8), r"widths \[8, 8, 8\] has 3 entries; the model has 2 layers"),
     ((8,), "has 1 entries"),
     ("XXL", r"unknown granularity 'XXL': this model has \['S', 'M', 'L', 'XL'\]")],
)
def test_bad_widths(widths: object, pattern: str) -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match=pattern):
        model(random_tokens(1, 4), widths=widths)


def test_bad_heads() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="does not nest attention heads"):
        model.submodel(None, "S")
    with pytest.raises(ValueError, match=r"need 2 counts in 0\.\.2 \(0 skips the layer.s attention\)"):
        model.submodel(None, 3)
    gqa = tiny_model(n_head=4, n_kv_head=2)
    with pytest.raises(ValueError, match="multiple of the GQA group size 2"):
        gqa.submodel(None, (1, 2))


def test_sequence_too_long() -> None:
    model = tiny_model()
    assert model(random_tokens(1, 32)).shape == (1, 32, 64)
    with pytest.raises(ValueError, match="sequence length 33 exceeds max_seq_len=32"):
        model(random_tokens(1, 33))


def test_width_specs_agree() -> None:
    model = tiny_model().eval()
    idx = random_tokens(1, 8)
    assert model.submodel("S").widths == (8, 8) == model.submodel(0 + 8).widths
    assert model.submodel([8, 16]).widths == (8, 16)
    assert model.submodel("S") == model.submodel(8)  # the name is a label, not identity
    assert model.submodel("S") in {model.submodel((8, 8))}
    with torch.no_grad():
        assert torch.equal(model(idx, widths="S"), model(idx, widths=(8, 8)))
        assert torch.equal(model(idx, widths="S"), model(idx, widths=8))


# ----------------------------------------------------------------------------- less compute


class _MatmulWeights(TorchDispatchMode):
    """Records the right-hand operand (the weight, as ``x @ w``) of every matrix product."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mm.default:
            self.weights.append(args[1])
        elif func is torch.ops.aten.addmm.default:
            self.weights.append(args[2])
        return func(*args, **(kwargs or {}))


def test_smaller_widths_use_sliced_weights() -> None:
    model = tiny_model(n_head=4, nest_heads=True).eval()
    with torch.no_grad(), _MatmulWeights() as rec:
        model(random_tokens(1, 8), widths="S")  # its nested heads too: 1 of 4
    shapes = [tuple(w.shape) for w in rec.weights]
    d, hd = 32, model.config.head_dim
    # per block: q, k, v, o, then up, gate, down (swiglu); then the lm_head
    block = [(d, hd), (d, hd), (d, hd), (hd, d), (d, 8), (d, 8), (8, d)]
    assert shapes == block * 2 + [(d, 64)]

    with torch.no_grad(), _MatmulWeights() as rec:
        model(random_tokens(1, 8), widths=(16, 40))
    shapes = [tuple(w.shape) for w in rec.weights]
    ffn_shapes = [s for s in shapes if s not in ((d, 4 * hd), (4 * hd, d), (d, 64))]
    assert ffn_shapes == [(d, 16), (d, 16), (16, d), (d, 40), (d, 40), (40, d)]


def test_sliced_weights_are_views_not_copies() -> None:
    model = tiny_model().eval()
    with torch.no_grad(), _MatmulWeights() as rec:
        model(random_tokens(1, 4), widths="S")
    owned = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ptrs = {w.untyped_storage().data_ptr() for w in rec.weights}
    assert ptrs and ptrs <= owned


# ----------------------------------------------------------------------------- tying / meta


def test_tied_embeddings() -> None:
    model = tiny_model()
    assert model.lm_head.weight is model.embed.weight
    untied = tiny_model(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embed.weight
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert untied.num_params() - model.num_params() == 64 * 32


def test_meta_construction_and_init() -> None:
    cfg = tiny_config()
    with torch.device("meta"):
        model = MatFormerLM(cfg)
    assert model.embed.weight.is_meta
    model = model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.embed.weight  # tying survives to_empty + init
    assert not any(p.is_meta for p in model.parameters())
    ref = tiny_model(cfg)
    torch.testing.assert_close(model.rope_cos, ref.rope_cos, atol=0, rtol=0)
    torch.testing.assert_close(model.rope_sin, ref.rope_sin, atol=0, rtol=0)
    # init statistics: norms are ones, weights small
    assert torch.equal(model.norm.weight, torch.ones(32))
    assert 0.01 < float(model.embed.weight.detach().std()) < 0.03
    down_std = float(model.blocks[0].ffn.down_proj.weight.detach().std())
    assert down_std < float(model.embed.weight.detach().std())  # residual outputs are scaled down
    logits = model(random_tokens(1, 8), widths="S")
    assert torch.isfinite(logits).all()


def test_init_is_seeded() -> None:
    a, b, c = tiny_model(seed=0), tiny_model(seed=0), tiny_model(seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                b.state_dict().values(), strict=True))
    assert not torch.equal(a.embed.weight, c.embed.weight)


def test_lm_loss_is_cross_entropy_in_fp32() -> None:
    logits = torch.randn(2, 3, 5, dtype=torch.bfloat16)
    tgt = torch.randint(0, 5, (2, 3))
    loss = lm_loss(logits, tgt)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(logits.float().reshape(6, 5), tgt.reshape(6))
    assert torch.equal(loss, ref)


def test_eval_mode_restores_every_models_mode_even_on_error() -> None:
    """The one context manager every evaluation, latency and generation path uses."""
    from matformer.model import eval_mode

    a, b = tiny_model(), tiny_model()
    a.train()
    b.eval()
    with pytest.raises(RuntimeError, match="boom"), eval_mode(a, b, a):  # a listed twice
        assert not a.training and not b.training
        raise RuntimeError("boom")
    assert a.training and not b.training
