"""Speculative decoding: greedy output equals the target's, rejection sampling keeps the target's
distribution, and a shared cache holds exactly what the target alone would have written."""

from __future__ import annotations

import pytest
import torch
from helpers import random_tokens, tiny_model

from matformer.cache import KVCache
from matformer.generate import generate, logits_to_probs
from matformer.speculative import (
    SpecStats,
    accept_reject,
    greedy_accept,
    speculative_generate,
    speculative_stream,
)

# Untied embeddings and a larger init make the tiny random models disagree often enough that
# both the accept and the reject paths run (tied, the argmax is mostly the input token).
SPREAD = dict(tie_embeddings=False, init_std=0.1)


@pytest.fixture(scope="module")
def model():
    return tiny_model(**SPREAD).eval()


MODES = {
    "two-cache": dict(draft="S"),
    "shared-cache": dict(draft="S", shared_cache=True),
    "mixnmatch-draft": dict(draft=(8, 32), draft_len=3),
    "M->L": dict(draft="M", target="L", shared_cache=True),
    "adaptive": dict(draft="S", adaptive=True, draft_len=1, max_draft_len=6),
    "long-draft": dict(draft="L", draft_len=9),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_speculative_equals_target_greedy(model, mode, seed) -> None:
    kw = MODES[mode]
    x = random_tokens(1, 5, seed=seed)
    target = generate(model, x, 24, widths=kw.get("target"), temperature=0, use_cache=False)
    out, stats = speculative_generate(model, x, 24, temperature=0, **kw)
    assert out.tolist() == target.tolist()
    assert stats.new_tokens == 24 and stats.target_forwards == stats.rounds + 1
    assert stats.accepted <= stats.drafted
    assert stats.tokens_per_target_forward == pytest.approx(24 / stats.target_forwards)


def test_greedy_external_drafter_and_acceptance_range(model) -> None:
    x = random_tokens(1, 5, seed=3)
    target = generate(model, x, 24, temperature=0)
    other = tiny_model(seed=7, **SPREAD)
    out, ext = speculative_generate(model, x, 24, draft_model=other, temperature=0)
    assert out.tolist() == target.tolist() and ext.mode == "external"
    _, nested = speculative_generate(model, x, 24, draft="L", temperature=0)
    assert 0 < nested.acceptance_rate < 1  # both paths of the verifier were exercised
    assert nested.target_forwards < 24  # fewer target forwards than tokens


def test_greedy_nested_heads_shared_cache() -> None:
    model = tiny_model(n_head=8, n_kv_head=4, nest_heads=True, **SPREAD).eval()
    x = random_tokens(1, 5, seed=2)
    target = generate(model, x, 20, temperature=0)
    for shared in (False, True):
        out, _ = speculative_generate(model, x, 20, draft="M", shared_cache=shared, temperature=0)
        assert out.tolist() == target.tolist()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_cache_holds_the_targets_kv_after_every_round(model, temperature) -> None:
    x = random_tokens(1, 6, seed=4)
    cache = KVCache.for_model(model, 1, 6 + 20)
    seq = x[0].tolist()
    g = torch.Generator().manual_seed(0)
    for tokens in speculative_stream(model, x, 20, draft="S", shared_cache=True, draft_len=4,
                                     temperature=temperature, generator=g, cache=cache):
        seq += tokens.tolist()
        n = len(seq) - 1  # the newest token is not in the cache yet
        alone = KVCache.for_model(model, 1, n)
        with torch.no_grad():
            model(torch.tensor([seq[:n]]), cache=alone)
        torch.testing.assert_close(torch.stack(cache.keys)[:, :, :, :n], torch.stack(alone.keys), atol=2e-5, rtol=0)
        torch.testing.assert_close(torch.stack(cache.values)[:, :, :, :n], torch.stack(alone.values), atol=2e-5, rtol=0)


# ------------------------------------------------------------------ rejection sampling
def _tv(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - probs).abs().sum())


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = counts.sum() * probs
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token with target probability 0 was emitted"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_accept_reject_reproduces_the_target_distribution() -> None:
    """Fixed fake distributions, 3 draft tokens: every emitted position follows the target."""
    p = torch.tensor([[0.50, 0.30, 0.10, 0.10, 0.00],
                      [0.05, 0.05, 0.10, 0.40, 0.40],
                      [0.20, 0.20, 0.20, 0.20, 0.20]])
    q = torch.tensor([[0.10, 0.20, 0.30, 0.40, 0.00],
                      [0.25, 0.25, 0.25, 0.00, 0.25],
                      [0.70, 0.10, 0.10, 0.05, 0.05],
                      [0.00, 0.00, 0.50, 0.50, 0.00]])
    g = torch.Generator().manual_seed(0)
    n = 10000
    counts = torch.zeros(4, 5)
    for _ in range(n):
        drafts = torch.multinomial(p, 1, generator=g)[:, 0]
        out = accept_reject(drafts, p, q, g)
        assert 1 <= out.numel() <= 4
        counts[torch.arange(out.numel()), out] += 1
    for i in range(4):
        # position i is emitted whenever drafts 0..i-1 were accepted; the target does not
        # depend on the prefix here, so given that, it must still be distributed as q[i].
        assert counts[i].sum() > 800
        assert _tv(counts[i], q[i]) < 0.05, (i, counts[i] / counts[i].sum(), q[i])
        # chi-square with <= 3 degrees of freedom: 16.3 is the 99.9% quantile
        assert _chi2(counts[i], q[i]) < 16.3, i
    # power check: the drafter's own distribution is far from the target's
    assert _tv(p[0] * n, q[0]) > 0.3


def test_accept_reject_with_one_hot_distributions_is_greedy() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 11, generator=g)
    target = logits_to_probs(logits, temperature=0)
    for drafts in (logits[:4].argmax(-1), torch.tensor([logits[0].argmax(), 3, 3, 3])):
        draft_probs = torch.nn.functional.one_hot(drafts, 11).float()
        assert accept_reject(drafts, draft_probs, target, g).tolist() == \
            greedy_accept(drafts, logits).tolist()


def test_stochastic_speculative_samples_from_the_target(model) -> None:
    """End to end: the joint law of the first two speculative tokens equals the target's."""
    x = random_tokens(1, 5, seed=5)
    kw = dict(temperature=1.0, top_k=2)
    with torch.no_grad():
        q1 = logits_to_probs(model(x)[0, -1], **kw)
        q2 = torch.stack([logits_to_probs(model(torch.cat([x, torch.tensor([[t]])], 1))[0, -1],
                                          **kw) for t in range(64)])
    joint = (q1[:, None] * q2).flatten()  # P(t1, t2)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(64 * 64)
    n = 500
    for _ in range(n):
        out, _ = speculative_generate(model, x, 3, draft="S", shared_cache=True, draft_len=2,
                                      generator=g, **kw)
        t1, t2 = out[0, 5:7].tolist()
        counts[t1 * 64 + t2] += 1
    assert _tv(counts, joint) < 0.1
    assert _chi2(counts, joint) < 16.3  # <= 3 degrees of freedom (2 x 2 cells), 99.9%


def test_eos_stops_speculative_decoding(model) -> None:
    x = random_tokens(1, 5, seed=0)
    free = generate(model, x, 20, temperature=0)
    eos = int(free[0, 12])
    first = free[0, 5:].tolist().index(eos)
    out, stats = speculative_generate(model, x, 20, draft="S", eos_id=eos, temperature=0)
    assert out[0, 5:].tolist() == free[0, 5:5 + first + 1].tolist()
    assert stats.new_tokens == first + 1


def test_streaming_yields_rounds(model) -> None:
    x = random_tokens(1, 5, seed=0)
    stats = SpecStats()
    pieces = list(speculative_stream(model, x, 16, draft="S", temperature=0, stats=stats))
    assert len(pieces) == stats.rounds + 1  # the prefill's token, then one piece per round
    assert sum(p.numel() for p in pieces) == 16
    assert stats.as_dict()["acceptance_rate"] == stats.accepted / stats.drafted


@pytest.mark.parametrize("kw,match", [
    (dict(draft="L", target="M"), "nested"),
    (dict(draft=(64, 8), target=(32, 64)), "nested"),
    (dict(draft="XL"), "same submodel"),
    (dict(draft_len=0), "draft_len"),
    (dict(draft_len=5, max_draft_len=4), "draft_len"),
    (dict(draft_model="self", shared_cache=True), "share"),
    (dict(temperature=-1.0), "temperature"),
])
def test_invalid_arguments(model, kw, match) -> None:
    if kw.get("draft_model") == "self":
        kw = {**kw, "draft_model": tiny_model(seed=3)}
    with pytest.raises(ValueError, match=match):
        speculative_generate(model, random_tokens(1, 4), 4, **kw)


def test_invalid_prompts(model) -> None:
    with pytest.raises(ValueError, match="one non-empty prompt"):
        speculative_generate(model, random_tokens(2, 4), 4)
    with pytest.raises(ValueError, match="exceeds"):
        speculative_generate(model, random_tokens(1, 30), 4)
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(model, random_tokens(1, 4), 4, draft_model=tiny_model(vocab_size=32))


# ------------------------------------------------------------------ adaptive draft length
def test_draft_length_rule_on_a_fake_cost_model() -> None:
    from matformer.draft import DraftCosts, choose_draft_len, expected_tokens

    assert expected_tokens(0, 0.7) == 1.0 and expected_tokens(3, 1.0) == 4.0
    assert expected_tokens(2, 0.5) == pytest.approx(1 + 0.5 + 0.25)
    verify = {1: 1.0, 2: 1.1, 9: 1.8}  # a target forward over n tokens: ~1 + 0.1 (n - 1)
    cheap = DraftCosts(draft_token=0.05, verify=verify, frozen=True)
    dear = DraftCosts(draft_token=0.9, verify=verify, frozen=True)
    assert choose_draft_len(0.8, dear, 8) == 0  # drafts cost almost a target step: do not draft
    assert choose_draft_len(0.0, cheap, 8) == 0  # nothing is ever accepted
    k = choose_draft_len(0.8, cheap, 8)
    assert 2 <= k <= 8
    speed = [expected_tokens(j, 0.8) / cheap.round_cost(j) for j in range(9)]
    assert speed[k] == max(speed)
    assert cheap.verify_cost(5) == pytest.approx(1.4)  # interpolated between n = 2 and n = 9
    cheap.record_verify(5, 9.0)  # frozen: measurements are ignored
    assert cheap.verify_cost(5) == pytest.approx(1.4)
    # a 7% expected gain (1.5 tokens for 1.4 token-costs) is within timing noise: no drafting
    slight = DraftCosts(draft_token=0.3, verify=verify, frozen=True)
    assert choose_draft_len(0.5, slight, 1) == 0
    assert choose_draft_len(0.5, slight, 1, margin=0.0) == 1


@pytest.mark.parametrize("shared", [False, True])
def test_adaptive_falls_back_to_plain_decoding_when_drafts_are_dear(model, shared) -> None:
    from matformer.draft import Acceptance, DraftCosts

    x = random_tokens(1, 5, seed=6)
    target = generate(model, x, 20, temperature=0, use_cache=False)
    verify = {1: 1.0, 2: 1.1, 17: 2.6}
    dear = DraftCosts(draft_token=2.0, verify=verify, frozen=True)
    out, stats = speculative_generate(model, x, 20, draft="L", adaptive=True, shared_cache=shared,
                                      costs=dear, acceptance=Acceptance.with_prior(0.9),
                                      temperature=0)
    assert out.tolist() == target.tolist()
    assert stats.draft_lens == [0] * 19 and stats.draft_forwards == 0  # plain decoding
    cheap = DraftCosts(draft_token=0.01, verify=verify, frozen=True)
    out, stats = speculative_generate(model, x, 20, draft="L", adaptive=True, shared_cache=shared,
                                      costs=cheap, acceptance=Acceptance.with_prior(0.9),
                                      temperature=0)
    assert out.tolist() == target.tolist()
    assert stats.drafted > 0 and max(stats.draft_lens) > 1


def test_acceptance_estimate() -> None:
    from matformer.draft import Acceptance

    acc = Acceptance(accepted=0, rejected=0, decay=1.0)
    acc.update(4, 4)  # all kept: 4 acceptances, no rejection
    acc.update(1, 4)  # one kept, then a rejection
    acc.update(0, 0)  # a plain step says nothing
    assert acc.rate == pytest.approx(5 / 6)


def test_drafter_search_picks_the_best_of_a_fake_table() -> None:
    from matformer.draft import DraftCosts, rank_drafters

    verify = {1: 1.0, 2: 1.1, 9: 1.8}
    table = {"S": (0.55, 0.3), "M": (0.8, 0.4), "L": (0.95, 0.9), "2xS+M": (0.6, 0.32)}
    rows = rank_drafters({n: a for n, (a, _) in table.items()},
                         {n: ((i,), None) for i, n in enumerate(table)},
                         {n: DraftCosts(c, verify, frozen=True) for n, (_, c) in table.items()}, 8)
    assert rows[0].name == "M"
    assert rows[0].best_k > 0 and rows[0].speedup > 1
    assert rows[0].tokens_per_s == max(max(r.per_k.values()) for r in rows)
    assert {r.name: r.best_k for r in rows}["L"] == 0  # as dear as the target: never drafts
    assert rows[-1].speedup == pytest.approx(1.0)


def test_drafter_search_end_to_end(model) -> None:
    from matformer.draft import search_drafter

    prompts = [random_tokens(1, 6, seed=s)[0] for s in range(2)]
    rows = search_drafter(model, prompts, new_tokens=8, max_draft_len=3, reps=1)
    names = {r.name for r in rows}
    assert {"S", "M", "L"} <= names and "XL" not in names
    assert all(0 <= r.acceptance <= 1 and r.best_k <= 3 for r in rows)
    assert rows == sorted(rows, key=lambda r: -r.tokens_per_s)


def test_drafter_acceptance_weighs_each_prompt_by_its_own_length(model) -> None:
    """Prompts of different lengths: each sequence's drafts start after its own prompt, so the
    acceptance does not depend on the prompts' order and is the mean of the single-prompt
    acceptances (every prompt gets the same number of new tokens)."""
    from matformer.draft import drafter_acceptance

    short, long = random_tokens(1, 3, seed=1)[0], random_tokens(1, 9, seed=2)[0]
    xl, drafters = model.submodel(), {"S": model.submodel("S")}
    def acc(prompts):
        return drafter_acceptance(model, prompts, xl, drafters, new_tokens=8)["S"]
    one = [acc([short]), acc([long])]
    assert acc([short, long]) == pytest.approx(acc([long, short]))
    assert acc([short, long]) == pytest.approx(sum(one) / 2)


def test_drafter_search_respects_nested_and_skipped_heads() -> None:
    """On a head-nested model, for a target with fewer heads (M) and a skipped attention layer,
    every searched drafter is nested in the target, heads included, and decodes with it."""
    from matformer.draft import search_drafter

    model = tiny_model(n_head=4, nest_heads=True, **SPREAD).eval()
    th = (0, model.submodel("M").heads[1])
    target = model.submodel("M", th)
    prompts = [random_tokens(1, 5, seed=s)[0] for s in range(2)]
    rows = search_drafter(model, prompts, target=target, new_tokens=6, max_draft_len=2, reps=1)
    assert rows and {"S"} <= {r.name for r in rows}
    want = generate(model, random_tokens(1, 5, seed=9), 8, widths=target, temperature=0)
    for r in rows:
        assert r.submodel.nested_in(target), (r.name, r.submodel)
        out, _ = speculative_generate(model, random_tokens(1, 5, seed=9), 8, draft=r.submodel,
                                      target=target, draft_len=2, temperature=0)
        assert torch.equal(out, want), r.name
    # a granularity named as drafter takes its heads capped at the target's
    out, _ = speculative_generate(model, random_tokens(1, 5, seed=9), 8, draft="S",
                                  target=target, draft_len=2, temperature=0)
    assert torch.equal(out, want)


@pytest.mark.parametrize("shared_cache", [False, True])
def test_adaptive_single_new_token(model, shared_cache: bool) -> None:
    """One new token: no round runs, so nothing is measured, and the token is the target's."""
    ctx = model.config.max_seq_len
    for T in (6, ctx):  # a prompt that fills the whole context too
        prompt = random_tokens(1, T, seed=T)
        out, _ = speculative_generate(model, prompt, 1, draft="S", adaptive=True,
                                      shared_cache=shared_cache, temperature=0)
        assert torch.equal(out, generate(model, prompt, 1, temperature=0))


def test_runners_of_another_model_are_refused(model) -> None:
    from matformer.runner import RunnerPool

    other = tiny_model(seed=5, **SPREAD).eval()
    with pytest.raises(ValueError, match="another model"):
        generate(model, random_tokens(1, 4), 3, temperature=0, runners=RunnerPool(other))
    with pytest.raises(ValueError, match="another model"):
        speculative_generate(model, random_tokens(1, 4), 3, draft="S", temperature=0,
                             runners=RunnerPool(other))


# ------------------------------------------------------------------ modes and timing
@pytest.mark.parametrize("training", [True, False])
def test_speculative_restores_the_callers_mode(training) -> None:
    target, drafter = tiny_model(**SPREAD), tiny_model(seed=4, **SPREAD)
    target.train(training)
    drafter.train(not training)
    speculative_generate(target, random_tokens(1, 4), 6, draft="S", temperature=0)
    assert target.training is training
    speculative_generate(target, random_tokens(1, 4), 6, draft_model=drafter, temperature=0)
    assert target.training is training and drafter.training is not training


def test_stats_seconds_count_only_our_time(model, monkeypatch) -> None:
    """A fake clock that only the caller advances: our own time stays 0."""
    import matformer.speculative as spec

    clock = [0.0]
    monkeypatch.setattr(spec, "perf_counter", lambda: clock[0])
    stats = SpecStats()
    for _ in speculative_stream(model, random_tokens(1, 4), 10, draft="S", temperature=0,
                                stats=stats):
        clock[0] += 100.0  # the caller's time between yields
    assert stats.new_tokens == 10 and stats.seconds == 0.0


def test_adaptive_costs_are_measured_once_per_machine_and_kept(model, monkeypatch, tmp_path):
    """Adaptive decoding measures its drafting costs once for a model shape and drafter/target
    pair on this machine and keeps them: a later generation with a fresh pool reads them back
    instead of measuring again; another pair, or another shape, is measured."""
    import matformer.speculative as spec
    from matformer.draft import DraftCosts, load_costs, save_costs

    monkeypatch.setenv("MATFORMER_CACHE", str(tmp_path))
    calls = []
    real = spec.measure_costs
    monkeypatch.setattr(spec, "measure_costs", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = random_tokens(1, 5, seed=3)
    want = generate(model, x, 12, temperature=0)
    for _ in range(2):  # a fresh pool each time: nothing kept in memory
        out, _ = speculative_generate(model, x, 12, draft="S", adaptive=True, temperature=0)
        assert torch.equal(out, want)
    assert len(calls) == 1 and (tmp_path / "draft_costs.json").is_file()
    speculative_generate(model, x, 12, draft="M", adaptive=True, temperature=0)
    assert len(calls) == 2  # another drafter: its own costs
    save_costs("k", DraftCosts(0.5, {1: 1.0, 2: 1.5}), tmp_path)
    kept = load_costs("k", tmp_path)
    assert kept.draft_token == 0.5 and kept.verify == {1: 1.0, 2: 1.5}
    assert load_costs("other", tmp_path) is None
    (tmp_path / "draft_costs.json").write_text("{broken")
    assert load_costs("k", tmp_path) is None  # an unreadable file: measured again, no error


def test_drafter_search_tries_early_exits_too(model) -> None:
    """Depth as well as width: every uniform granularity and the target itself cut after half
    and three quarters of the layers (whole layers skipped at the end), all nested in the
    target; such a drafter decodes the target's own greedy output."""
    from matformer.draft import drafter_candidates

    cfg = model.config  # 2 layers: the half is layer 0 alone; 3/4 rounds to all (left out)
    target = model.submodel()
    cands = drafter_candidates(model, target)
    cuts = {n: c for n, c in cands.items() if "layers" in n}
    assert set(cuts) == {f"{g}:1/2 layers" for g in ("S", "M", "L", "target")}
    for c in cuts.values():
        assert c.widths[1] == 0 and c.heads[1] == 0 and c.nested_in(target)
    assert cuts["target:1/2 layers"].widths[0] == cfg.ffn_dims[0]
    x = random_tokens(1, 5, seed=4)
    want = generate(model, x, 10, temperature=0)
    out, stats = speculative_generate(model, x, 10, draft=cuts["S:1/2 layers"],
                                      shared_cache=True, draft_len=2, temperature=0)
    assert torch.equal(out, want) and stats.drafted > 0
