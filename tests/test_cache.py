"""KV cache: cached (prefill + decode) logits equal a full forward, batched left padding too."""

from __future__ import annotations

import pytest
import torch
from helpers import random_tokens, tiny_model

from matformer.cache import KVCache
from matformer.generate import generate, generate_stream, left_pad, logits_to_probs, sample_next

ATOL = 2e-5  # fp32; observed differences are ~1e-7


def _decode_logits(model, x, widths=None, chunks=(5,)):
    """Logits of x computed through a cache: prefill chunks, then one token at a time."""
    cache = KVCache.for_model(model, x.shape[0], x.shape[1])
    outs, pos = [], 0
    for n in chunks:
        outs.append(model(x[:, pos:pos + n], widths=widths, cache=cache, start_pos=pos))
        pos += n
    while pos < x.shape[1]:
        outs.append(model(x[:, pos:pos + 1], widths=widths, cache=cache, start_pos=pos))
        pos += 1
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("widths", [None, "S", (8, 64)])
@pytest.mark.parametrize("chunks", [(1,), (7,), (3, 4, 2)])
@torch.no_grad()
def test_cached_decoding_equals_full_forward(widths, chunks) -> None:
    model = tiny_model(tie_embeddings=False, init_std=0.1).eval()
    x = random_tokens(2, 20)
    full = model(x, widths=widths)
    got, _ = _decode_logits(model, x, widths, chunks=chunks)
    torch.testing.assert_close(got, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("heads", [None, "S", "M"])
@torch.no_grad()
def test_cached_decoding_gqa_and_nested_heads(heads) -> None:
    # 8 query heads, 4 kv heads; S/M/L/XL use 2/4/6/8 query heads = 1/2/3/4 kv heads
    model = tiny_model(n_head=8, n_kv_head=4, nest_heads=True, init_std=0.1).eval()
    x = random_tokens(2, 16)
    full = model(x, widths=heads)  # a granularity name brings its nested heads
    got, cache = _decode_logits(model, x, heads, chunks=(4,))
    torch.testing.assert_close(got, full, atol=ATOL, rtol=0)
    kvh = {None: 4, "S": 1, "M": 2}[heads]  # a drafter writes only its own kv heads
    k, v = torch.stack(cache.keys), torch.stack(cache.values)  # (n_layer, B, kvh, len, hd)
    assert k[:, :, kvh:].abs().sum() == 0 and v[:, :, kvh:].abs().sum() == 0
    assert (k[:, :, :kvh].abs().sum((0, 1, 3, 4)) > 0).all()


@torch.no_grad()
def test_left_padded_batch_equals_each_prompt_alone() -> None:
    model = tiny_model(tie_embeddings=False, init_std=0.1).eval()
    rows = [random_tokens(1, n, seed=n)[0].tolist() for n in (9, 4, 7)]
    ids, lengths = left_pad(rows, pad_id=3)
    assert ids.shape == (3, 9) and lengths.tolist() == [9, 4, 7]
    cache = KVCache.for_model(model, 3, 14)
    cache.set_prompt_lengths(lengths, 9)
    prefill = model(ids, widths="M", cache=cache)
    steps = random_tokens(3, 5, seed=99)
    decode = [model(steps[:, i:i + 1], widths="M", cache=cache, start_pos=9 + i)
              for i in range(5)]
    for b, row in enumerate(rows):
        alone = model(torch.tensor([row + steps[b].tolist()]), widths="M")[0]
        n = len(row)
        torch.testing.assert_close(prefill[b, 9 - n:], alone[:n], atol=ATOL, rtol=0)
        torch.testing.assert_close(torch.cat(decode, 1)[b], alone[n:], atol=ATOL, rtol=0)
    assert torch.isfinite(prefill).all()  # padding queries attend to themselves: no NaN


@torch.no_grad()
def test_batched_generation_equals_one_at_a_time() -> None:
    model = tiny_model(tie_embeddings=False, init_std=0.1).eval()
    rows = [random_tokens(1, n, seed=n)[0].tolist() for n in (6, 2, 4)]
    batch = generate(model, rows, 8, temperature=0, widths="L")
    for b, row in enumerate(rows):
        alone = generate(model, torch.tensor([row]), 8, temperature=0, widths="L")
        assert batch[b, 6 - len(row):].tolist() == alone[0].tolist()
    ids, lengths = left_pad(rows)
    again = generate(model, ids, 8, temperature=0, widths="L", prompt_lengths=lengths)
    assert torch.equal(again, batch)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, None, None), (1.0, None, None),
                                                     (0.8, 5, None), (1.0, None, 0.9)])
def test_cached_generate_matches_reference_decoder(temperature, top_k, top_p) -> None:
    model = tiny_model(tie_embeddings=False, init_std=0.1)
    x = random_tokens(2, 6)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, widths="M")
    ref = generate(model, x, 12, use_cache=False, generator=torch.Generator().manual_seed(1), **kw)
    fast = generate(model, x, 12, use_cache=True, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(ref, fast)
    streamed = list(generate_stream(model, x, 12, generator=torch.Generator().manual_seed(1),
                                    **kw))
    assert torch.equal(torch.stack(streamed, 1), fast[:, 6:])


def test_eos_stops_rows_and_stream() -> None:
    model = tiny_model(tie_embeddings=False, init_std=0.1)
    x = random_tokens(2, 4)
    free = generate(model, x, 10, temperature=0)
    eos = int(free[0, 6])  # row 0 emits it at its 3rd step
    out = generate(model, x, 10, temperature=0, eos_id=eos)
    ref = generate(model, x, 10, temperature=0, eos_id=eos, use_cache=False)
    assert torch.equal(out, ref)
    assert (out[0, 6:] == eos).all()  # a finished row keeps emitting EOS


def test_logits_to_probs_matches_sample_next() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    probs = logits_to_probs(logits, temperature=0.7, top_k=10, top_p=0.8)
    assert torch.allclose(probs.sum(-1), torch.ones(3))
    assert ((probs > 0).sum(-1) <= 10).all()
    g = torch.Generator().manual_seed(5)
    draws = torch.stack([sample_next(logits, temperature=0.7, top_k=10, top_p=0.8, generator=g)
                         for _ in range(200)])
    assert (probs.gather(1, draws.T) > 0).all()  # never outside the filtered support
    greedy = logits_to_probs(logits, temperature=0)
    assert torch.equal(greedy.argmax(-1), logits.argmax(-1)) and (greedy.sum(-1) == 1).all()


def test_cache_errors() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="max_len"):
        KVCache.for_model(model, 1, model.config.max_seq_len + 1)
    cache = KVCache.for_model(model, 1, 8)
    with pytest.raises(ValueError, match="do not fit"):
        model(random_tokens(1, 4), cache=cache, start_pos=6)
    with pytest.raises(ValueError, match="compute dtype"):
        model(random_tokens(1, 4), cache=KVCache.for_model(model, 1, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="rows"):
        model(random_tokens(2, 4), cache=cache)
    with pytest.raises(ValueError, match="prompt lengths"):
        KVCache.for_model(model, 2, 8).set_prompt_lengths([0, 3], 3)
    with pytest.raises(ValueError, match="exceeds the context"):
        list(generate_stream(model, random_tokens(1, 30), 10))
    with pytest.raises(ValueError, match="exceeds the context"):
        generate(model, random_tokens(1, 30), 10, use_cache=True)
    # too long for the cache: the default falls back to the cropping reference decoder
    assert generate(model, random_tokens(1, 30), 10, temperature=0).shape == (1, 40)


def test_cache_is_not_stored_on_the_model() -> None:
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generate(model, random_tokens(1, 4), 5)
    assert not any(isinstance(v, KVCache) for m in model.modules() for v in vars(m).values())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- lean runner
@pytest.mark.parametrize("widths,heads", [(None, None), ("S", None), ((8, 64), None),
                                          ("M", "M")])
@torch.no_grad()
def test_runner_equals_model_forward(widths, heads) -> None:
    """The lean decode path computes what model.forward computes: prefill, verify, decode."""
    from matformer.runner import SubmodelRunner

    nest = heads is not None
    model = tiny_model(n_head=8 if nest else 2, n_kv_head=4 if nest else None, nest_heads=nest,
                       tie_embeddings=False, init_std=0.1).eval()
    sub = model.submodel(widths, heads)
    runner = SubmodelRunner(model, sub)
    x = random_tokens(2, 16)
    ref, _ = _decode_logits(model, x, sub, chunks=(6, 3))
    cache = KVCache.for_model(model, 2, 16)
    got = [runner(x[:, :6], cache, 0), runner(x[:, 6:9], cache, 6)]
    got += [runner(x[:, i:i + 1], cache, i) for i in range(9, 16)]
    torch.testing.assert_close(torch.cat(got, 1), ref, atol=ATOL, rtol=0)
    last = runner(x[:, :6], KVCache.for_model(model, 2, 16), 0, last_only=True)
    torch.testing.assert_close(last, ref[:, 5:6], atol=ATOL, rtol=0)


def test_runner_refuses_padded_caches_and_bad_positions() -> None:
    from matformer.runner import SubmodelRunner

    model = tiny_model()
    runner = SubmodelRunner(model, "S")
    cache = KVCache.for_model(model, 2, 8)
    with pytest.raises(ValueError, match="do not fit"):
        runner(random_tokens(2, 4), cache, 6)
    cache.set_prompt_lengths([2, 3], 3)
    with pytest.raises(ValueError, match="padded"):
        runner(random_tokens(2, 1), cache, 3)
    with pytest.raises(ValueError, match="out of range"):
        SubmodelRunner(model, 1000)


def test_reused_cache_forgets_the_padding_of_an_earlier_batch() -> None:
    model = tiny_model(tie_embeddings=False, init_std=0.1)
    rows = [random_tokens(1, n, seed=n)[0].tolist() for n in (6, 2)]
    cache = KVCache.for_model(model, 2, 16)
    list(generate_stream(model, rows, 6, temperature=0, cache=cache))  # left-padded batch
    assert cache.padded
    x = random_tokens(2, 5, seed=11)
    reused = torch.stack(list(generate_stream(model, x, 8, temperature=0, cache=cache)), 1)
    assert not cache.padded
    fresh = torch.stack(list(generate_stream(model, x, 8, temperature=0)), 1)
    assert torch.equal(reused, fresh)
    assert torch.equal(fresh, generate(model, x, 8, temperature=0, use_cache=False)[:, 5:])


def test_cache_layers_are_separate_tensors_and_compiled_lengths_round_up() -> None:
    """One tensor per layer (a compiled in-place write into a view of a shared tensor becomes
    a copy of all of it); a compiled pool rounds cache lengths up to a few sizes."""
    from matformer.runner import RunnerPool

    model = tiny_model(max_seq_len=64)
    cache = KVCache.for_model(model, 2, 10)
    ptrs = {t.untyped_storage().data_ptr() for t in cache.keys + cache.values}
    assert len(ptrs) == 2 * model.config.n_layer
    assert cache.keys[0].shape == (2, model.config.kv_heads, 10, model.config.head_dim)
    eager, compiled = RunnerPool(model, compile=False), RunnerPool(model, compile=True)
    assert [eager.cache_len(n) for n in (1, 37, 64)] == [1, 37, 64]
    assert [compiled.cache_len(n) for n in (1, 37, 64)] == [64, 64, 64]  # at most the context
    big = tiny_model(max_seq_len=256)
    assert [RunnerPool(big, compile=True).cache_len(n) for n in (65, 129, 256)] == [128, 256, 256]
