"""Tests for matformer.generate: greedy, seeded sampling, top-k / top-p, EOS, argument checks."""

from __future__ import annotations

import collections

import pytest
import torch
from helpers import random_tokens, tiny_model

from matformer.generate import generate, sample_next
from matformer.model import MatFormerLM


@pytest.fixture(scope="module")
def model() -> MatFormerLM:
    # init_std 0.5: peaked, clearly different next-token distributions (no near-ties in argmax)
    return tiny_model(seed=7, init_std=0.5).eval()


def _greedy_reference(model: MatFormerLM, prompt: torch.Tensor, n: int, widths: object = None
                      ) -> torch.Tensor:
    """Argmax of a full forward over the (cropped) context, one token at a time."""
    out, ctx = prompt, model.config.max_seq_len
    with torch.no_grad():
        for _ in range(n):
            nxt = model(out[:, -ctx:], widths=widths)[:, -1].argmax(-1)
            out = torch.cat([out, nxt[:, None]], dim=1)
    return out


# ----------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("widths", [None, "S", (8, 40)])
@pytest.mark.parametrize("use_cache", [True, False])
def test_temperature_zero_is_argmax(model: MatFormerLM, widths: object, use_cache: bool) -> None:
    prompt = random_tokens(2, 5, seed=1)
    out = generate(model, prompt, 12, widths=widths, temperature=0, use_cache=use_cache)
    assert out.shape == (2, 17)
    assert torch.equal(out[:, :5], prompt)
    assert torch.equal(out, _greedy_reference(model, prompt, 12, widths))
    again = generate(model, prompt, 12, widths=widths, temperature=0, use_cache=use_cache)
    assert torch.equal(out, again)


def test_submodels_generate_differently(model: MatFormerLM) -> None:
    prompt = random_tokens(4, 5, seed=2)
    small = generate(model, prompt, 10, widths="S", temperature=0)
    full = generate(model, prompt, 10, temperature=0)
    assert not torch.equal(small, full)


def test_generation_past_the_context_slides_the_window(model: MatFormerLM) -> None:
    ctx = model.config.max_seq_len
    prompt = random_tokens(1, ctx - 2, seed=3)
    out = generate(model, prompt, 10, temperature=0)
    assert out.shape == (1, ctx + 8)
    assert torch.equal(out, _greedy_reference(model, prompt, 10))


def test_longer_than_the_context_and_no_new_tokens(model: MatFormerLM) -> None:
    """A prompt past the context with nothing to generate comes back as it is, on either
    decoder (the cached one cannot hold it, so the uncached one is chosen)."""
    prompt = random_tokens(1, model.config.max_seq_len + 1, seed=5)
    assert torch.equal(generate(model, prompt, 0, temperature=0), prompt)
    assert torch.equal(generate(model, prompt, 0, temperature=0, use_cache=False), prompt)


# ----------------------------------------------------------------------------- sampling


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_seeded_sampling_is_reproducible(model: MatFormerLM) -> None:
    prompt = random_tokens(2, 4, seed=4)
    a = generate(model, prompt, 16, temperature=1.0, generator=_gen(0))
    b = generate(model, prompt, 16, temperature=1.0, generator=_gen(0))
    c = generate(model, prompt, 16, temperature=1.0, generator=_gen(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, generate(model, prompt, 16, temperature=0))


def test_top_k_one_and_tiny_top_p_are_greedy(model: MatFormerLM) -> None:
    prompt = random_tokens(3, 4, seed=5)
    greedy = generate(model, prompt, 12, temperature=0)
    for seed in range(3):
        top1 = generate(model, prompt, 12, temperature=1.5, top_k=1, generator=_gen(seed))
        assert torch.equal(top1, greedy)
        nucleus = generate(model, prompt, 12, temperature=1.5, top_p=1e-6, generator=_gen(seed))
        assert torch.equal(nucleus, greedy)


def test_sample_next_top_k_support() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9, -1.0]]).repeat(500, 1)
    draws = sample_next(logits, temperature=2.0, top_k=2, generator=_gen(0))
    assert set(draws.tolist()) == {1, 3}
    assert torch.equal(sample_next(logits, top_k=5, generator=_gen(1)),
                       sample_next(logits, generator=_gen(1)))  # k = vocab: no filtering


def test_sample_next_top_p_support_and_frequencies() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(4000, 1)
    # mass before token 1 is 0.5 < 0.6 (kept), before token 2 it is 0.8 >= 0.6 (dropped)
    draws = sample_next(logits, top_p=0.6, generator=_gen(0))
    counts = collections.Counter(draws.tolist())
    assert set(counts) == {0, 1}
    assert counts[0] / 4000 == pytest.approx(0.5 / 0.8, abs=0.03)  # renormalised
    full = collections.Counter(sample_next(logits, generator=_gen(1)).tolist())
    for token, p in enumerate(probs.tolist()):
        assert full[token] / 4000 == pytest.approx(p, abs=0.03)


def test_sample_next_temperature_sharpens() -> None:
    logits = torch.tensor([[1.0, 0.0, -1.0]]).repeat(3000, 1)
    cold = (sample_next(logits, temperature=0.25, generator=_gen(0)) == 0).float().mean()
    hot = (sample_next(logits, temperature=4.0, generator=_gen(0)) == 0).float().mean()
    assert cold > 0.95 and 0.33 < hot < 0.5
    assert torch.equal(sample_next(logits[:2], temperature=0), torch.tensor([0, 0]))


# ----------------------------------------------------------------------------- EOS


def test_eos_stops_generation(model: MatFormerLM) -> None:
    prompt = random_tokens(1, 4, seed=6)
    greedy = generate(model, prompt, 12, temperature=0)[0, 4:].tolist()
    k = 3
    eos = greedy[k]
    first = greedy.index(eos)  # the EOS token may already occur earlier
    out = generate(model, prompt, 12, temperature=0, eos_id=eos)
    assert out[0, 4:].tolist() == greedy[: first + 1]
    assert out[0, -1].item() == eos
    uncached = generate(model, prompt, 12, temperature=0, eos_id=eos, use_cache=False)
    assert torch.equal(out, uncached)


def test_eos_rows_finish_independently(model: MatFormerLM) -> None:
    prompt = random_tokens(2, 4, seed=8)
    greedy = generate(model, prompt, 10, temperature=0)[:, 4:]
    row0 = greedy[0].tolist()
    eos = row0[1]
    if eos in greedy[1].tolist()[:2]:
        pytest.skip("both rows hit the chosen EOS at once; choose another seed")
    out = generate(model, prompt, 10, temperature=0, eos_id=eos)[:, 4:]
    stop0 = row0.index(eos)
    row1 = greedy[1].tolist()
    stop1 = row1.index(eos) if eos in row1 else len(row1) - 1
    assert out.shape[1] == max(stop0, stop1) + 1  # ends when the last row is done
    assert out[0, : stop0 + 1].tolist() == row0[: stop0 + 1]
    assert (out[0, stop0:] == eos).all()  # a finished row keeps emitting EOS
    assert out[1, : stop1 + 1].tolist() == row1[: stop1 + 1]


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [(dict(temperature=-0.1), r"temperature=-0\.1 must be >= 0"),
     (dict(top_p=0.0), r"top_p=0\.0 must be in \(0, 1\]"),
     (dict(top_p=1.5), r"top_p=1\.5 must be in \(0, 1\]"),
     (dict(top_k=0), "top_k=0 must be >= 1")],
)
def test_bad_sampling_arguments(model: MatFormerLM, kw: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        sample_next(torch.zeros(1, 4), **kw)
    for use_cache in (True, False):
        with pytest.raises(ValueError, match=pattern):
            generate(model, random_tokens(1, 3), 2, use_cache=use_cache, **kw)


def test_bad_widths_in_generate(model: MatFormerLM) -> None:
    with pytest.raises(ValueError, match="out of range"):
        generate(model, random_tokens(1, 3), 2, widths=1000)


# ----------------------------------------------------------------------------- modes, compile


@pytest.mark.parametrize("training", [True, False])
def test_generation_restores_the_callers_mode(model: MatFormerLM, training: bool) -> None:
    from matformer.generate import generate_stream

    model.train(training)
    try:
        prompt = random_tokens(1, 4, seed=9)
        for use_cache in (True, False):
            generate(model, prompt, 3, temperature=0, use_cache=use_cache)
            assert model.training is training
        stream = generate_stream(model, prompt, 5, temperature=0)
        next(stream)
        stream.close()  # a stream abandoned half way restores it too
        assert model.training is training
    finally:
        model.eval()


@pytest.mark.slow
def test_compiled_decoding_equals_eager() -> None:
    """torch.compile of the lean forward: same greedy tokens, logits to tolerance (~1 min)."""
    from matformer.cache import KVCache
    from matformer.runner import RunnerPool

    small = tiny_model(seed=3, n_layer=1, init_std=0.1, tie_embeddings=False).eval()
    x = random_tokens(1, 6, seed=2)
    pool = RunnerPool(small, compile=True)
    compiled = generate(small, x, 6, widths="S", temperature=0, runners=pool)
    assert torch.equal(compiled, generate(small, x, 6, widths="S", temperature=0, compile=False))
    assert pool.compile_seconds > 0 and pool.get("S").compiled
    eager, runner = KVCache.for_model(small, 1, 12), pool.get("S")
    cache = KVCache.for_model(small, 1, 12)
    with torch.no_grad():
        ref = small(compiled[:, :11], widths="S", cache=eager)
        got = torch.cat([runner(compiled[:, :6], cache, 0),  # graphs for T = 6 and T = 1
                         *(runner(compiled[:, i:i + 1], cache, i) for i in range(6, 11))], 1)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # T = 6 ran padded to a graph of 8 (its padding wrote slots 6, 7 before they were written
    # for real); T = 1 near the end of the cache has no room to pad and ran as it is.
    assert {k[:2] for k in runner._graphs if k[3] == cache.max_len} == {(8, False), (1, False)}
    # Speculative decoding through the compiled graphs (verification windows of 4, padded)
    # keeps the target's greedy output.
    from matformer.speculative import speculative_generate

    spec, _ = speculative_generate(small, x, 6, draft="S", target="XL", shared_cache=True,
                                   draft_len=3, runners=pool)
    assert torch.equal(spec, generate(small, x, 6, temperature=0, compile=False))


def test_a_tiny_temperature_samples_the_argmax() -> None:
    """Scaling by a temperature near 0 must not overflow into NaN probabilities."""
    from matformer.generate import logits_to_probs, sample_next

    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9]])
    for t in (1e-38, 1e-30, 1e-6):
        probs = logits_to_probs(logits, temperature=t)
        assert torch.isfinite(probs).all() and probs[0, 1] == 1
        assert int(sample_next(logits, temperature=t, top_p=0.9)[0]) == 1
    assert torch.allclose(logits_to_probs(logits, temperature=0.7), (logits / 0.7).softmax(-1))


# ----------------------------------------------------------------------------- weight layouts
def test_streaming_layout_keeps_the_model_and_its_files(tmp_path) -> None:
    """A decoding pool's streaming layout moves storage only: same parameters, values and
    logits, the tied head still tied, training still runs, and a checkpoint saved afterwards
    is bit-exact and contiguous on disk."""
    from matformer.checkpoint import save_checkpoint
    from matformer.families import load_checkpoint
    from matformer.runner import RunnerPool, streaming_layout
    from matformer.tokenizer import Tokenizer

    model = tiny_model(vocab_size=257, init_std=0.1).eval()
    x = random_tokens(2, 12, vocab=257)
    with torch.no_grad():
        ref = model(x, widths="S")
    params = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    pool = RunnerPool(model)  # fp32 on a CPU: the streaming layout by default
    assert pool.layout == "stream" and not model.blocks[0].ffn.up_proj.weight.is_contiguous()
    assert streaming_layout(model) == 0  # already there: nothing moves twice
    assert model.lm_head.weight is model.embed.weight
    for n, p in model.named_parameters():
        assert p is params[n][0] and torch.equal(p, params[n][1]), n
    with torch.no_grad():
        torch.testing.assert_close(model(x, widths="S"), ref, rtol=0, atol=1e-6)
        greedy = generate(model, x[:1, :5], 8, widths="S", temperature=0, runners=pool)
        assert torch.equal(greedy, generate(model, x[:1, :5], 8, widths="S", temperature=0,
                                            use_cache=False))
    save_checkpoint(tmp_path / "ck", model, Tokenizer.byte_level())
    assert not model.blocks[0].ffn.up_proj.weight.is_contiguous()  # the model kept its layout
    back = load_checkpoint(tmp_path / "ck")[0]
    for (n, p), q in zip(model.named_parameters(), back.parameters(), strict=True):
        assert torch.equal(p, q) and q.is_contiguous(), n
    model.train()
    loss = model(x).float().logsumexp(-1).mean()
    loss.backward()  # gradients flow through the moved storage
    assert model.blocks[0].ffn.up_proj.weight.grad.shape == (64, 32)


def test_int8_weights_decode_close_to_fp32() -> None:
    """Weight-only int8 (per-row scales): each weight within half a quantization step, the
    pool's runners close to fp32 for every submodel (logits within 2% of their spread on
    average,
    the same greedy tokens on a model whose choices are not near-ties), bf16 caches."""
    from matformer.block import Int8Weight
    from matformer.runner import RunnerPool

    w = torch.randn(16, 8)
    q = Int8Weight.of(w)
    err = (q.q[:, :q.n_in].float() * q.scale.float()[:, None] - w).abs()
    assert q.q.shape[1] % 32 == 0 and not q.q[:, q.n_in:].any()  # rows padded with zeros
    assert bool((err <= q.scale.float()[:, None] * 0.51 + 1e-3).all())
    model = tiny_model(vocab_size=257, init_std=0.2).eval()
    pool = RunnerPool(model, weights="int8")
    x = random_tokens(1, 10, vocab=257)
    for widths in (None, "S", (8, 64)):
        cache = pool.new_cache(1, 10)
        assert cache.dtype == torch.bfloat16
        with torch.no_grad():
            got = pool.get(widths)(x, cache, 0).float()
            ref = model(x, widths=widths)
        err = (got - ref).abs()  # int8 weights, and bf16 activations and logits
        assert err.mean() < 0.02 * ref.std() and err.max() < 0.15 * ref.std(), widths
    with torch.no_grad():
        fp32 = generate(model, x[:, :4], 12, temperature=0)
        assert torch.equal(generate(model, x[:, :4], 12, temperature=0, runners=pool), fp32)
    with pytest.raises(ValueError, match="give prompts of one length"):
        generate(model, [[1, 2, 3], [4]], 4, temperature=0, runners=pool)
    with pytest.raises(ValueError, match="weights='int4'"):
        RunnerPool(model, weights="int4")


@pytest.mark.slow
def test_regional_compilation_decodes_as_eager() -> None:
    """compile="regional": one compiled layer graph serves every layer of the same shapes
    (seconds to compile, not minutes at 135M); greedy tokens and logits as eager, prefill,
    padded windows and speculative verification included."""
    from matformer.runner import RunnerPool
    from matformer.speculative import speculative_generate

    model = tiny_model(seed=3, n_layer=3, init_std=0.1).eval()
    x = random_tokens(1, 6, seed=2)
    pool = RunnerPool(model, compile="regional")
    want = generate(model, x, 8, widths="S", temperature=0, compile=False)
    assert torch.equal(generate(model, x, 8, widths="S", temperature=0, runners=pool), want)
    runner = pool.get("S")
    assert runner._layer_graph is not None and pool.compile_seconds > 0
    cache, eager = pool.new_cache(1, 14), pool.new_cache(1, 14)
    with torch.no_grad():
        got = torch.cat([runner(want[:, :6], cache, 0),
                         *(runner(want[:, i:i + 1], cache, i) for i in range(6, 13))], 1)
        ref = model(want[:, :13], widths="S", cache=eager)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    spec, _ = speculative_generate(model, x, 8, draft="S", shared_cache=True, draft_len=3,
                                   runners=pool)
    assert torch.equal(spec, generate(model, x, 8, temperature=0, compile=False))
    with pytest.raises(ValueError, match="compile='fast'"):
        RunnerPool(model, compile="fast").get("S")


def test_int8_weights_run_a_model_with_a_layer_without_ffn() -> None:
    """A depth-extracted model (a layer whose FFN width is 0) decodes with int8 weights: the
    empty FFN is passed by, as in fp32."""
    from matformer.runner import RunnerPool

    model = tiny_model(vocab_size=257, d_ff=(64, 0), init_std=0.2).eval()
    x = random_tokens(1, 6, vocab=257)
    with torch.no_grad():
        got = RunnerPool(model, weights="int8").get(None)
        logits = got(x, RunnerPool(model, weights="int8").new_cache(1, 6), 0).float()
        ref = model(x)
    assert (logits - ref).abs().mean() < 0.02 * ref.std()
