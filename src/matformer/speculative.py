"""Self-speculative decoding: a nested submodel drafts, a larger one of the same weights verifies.

Each round the drafter proposes ``k`` tokens one at a time, the target scores all of them in a
single forward over ``k + 1`` positions, and the longest acceptable prefix is kept plus one
token from the target (a correction or a bonus), so every round costs one target forward and
emits between 1 and ``k + 1`` tokens (arXiv 2310.07707 sec. 4.1.1; Leviathan et al. 2023).

Three ways to hold the drafter's keys and values:

* ``two-cache``: drafter and target are submodels of one model, each with its own KVCache;
* ``shared-cache``: one KVCache for both. The drafter writes its K/V for the draft positions and
  the target, verifying those positions, overwrites them with its own, so after every round the
  cache holds exactly what the target alone would have written, and the drafter reads the
  target's K/V for the whole context (one cache of memory, no extra compute);
* ``external``: a separately trained model drafts with its own cache (the baseline).

Greedy (``temperature=0``) keeps the target's greedy output token for token. Stochastic decoding
uses rejection sampling (:func:`~matformer.speculative_sampling.accept_reject`), which provably
samples from the target's (temperature / top-k / top-p) distribution. Caches are indexed by
position, so rejected draft tokens are rolled back for free. One sequence at a time (B = 1),
like gpt-fast.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from time import perf_counter
from typing import Any

import torch
from torch import Tensor

from .cache import KVCache
from .config import Submodel, SubmodelSpec
from .draft import (
    Acceptance,
    DraftCosts,
    capped,
    choose_draft_len,
    costs_key,
    load_costs,
    measure_costs,
    save_costs,
    synced_clock,
)
from .generate import _check_sampling, logits_to_probs, prefill
from .model import MatFormerLM, eval_mode
from .runner import RunnerPool, SubmodelRunner
from .speculative_sampling import accept_reject, greedy_accept

log = logging.getLogger(__name__)

MODES = ("two-cache", "shared-cache", "external")
#: With the adaptive rule at plain decoding, draft one token after this many rounds, so a
#: drafter whose acceptance has risen is noticed again (costs about 1% of plain speed).
PROBE_EVERY = 64


@dataclass
class SpecStats:
    """What one speculative generation did; counts include the prefill."""

    mode: str = "two-cache"
    new_tokens: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    seconds: float = 0.0
    draft_lens: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """Fraction of drafted tokens the target accepted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        """New tokens per target forward; plain decoding gets exactly 1.0."""
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("draft_lens")
        out.update(acceptance_rate=self.acceptance_rate, tokens_per_second=self.tokens_per_second,
                   tokens_per_target_forward=self.tokens_per_target_forward,
                   mean_draft_len=(sum(self.draft_lens) / len(self.draft_lens)
                                   if self.draft_lens else 0.0))
        return out


def _check_draft(draft: Submodel, target: Submodel) -> None:
    if not draft.nested_in(target):
        raise ValueError(f"the draft submodel ({draft}) must be nested in the target "
                         f"({target}): no layer may be wider")
    if draft == target:
        raise ValueError(f"draft and target are the same submodel ({draft}); drafting with the "
                         "target itself cannot speed anything up")


@dataclass
class _Setup:
    """Everything a decoding round needs, resolved once."""

    model: MatFormerLM
    drafter: MatFormerLM
    target: SubmodelRunner
    draft: SubmodelRunner
    tcache: KVCache
    dcache: KVCache
    mode: str

    @property
    def key(self) -> tuple:
        """What the pool's measured costs and acceptance are kept under."""
        return (self.draft.submodel, self.target.submodel, self.mode)


def _setup(model: MatFormerLM, prompt: Tensor, max_new_tokens: int, draft: SubmodelSpec,
           target: SubmodelSpec, draft_model: MatFormerLM | None, shared_cache: bool,
           runners: RunnerPool, draft_runners: RunnerPool | None, cache: KVCache | None
           ) -> tuple[_Setup, Tensor]:
    """Check the arguments; pick runners and caches. Returns the setup and the 1-D prompt."""
    ids = prompt.reshape(-1) if prompt.dim() == 1 or prompt.shape[0] == 1 else None
    if ids is None or ids.numel() == 0:
        raise ValueError(f"speculative decoding takes one non-empty prompt, got shape "
                         f"{tuple(prompt.shape)}")
    T, ctx = ids.numel(), model.config.max_seq_len
    if T + max_new_tokens - 1 > ctx:
        raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) - 1 exceeds "
                         f"the context max_seq_len={ctx}")
    tsub = model.config.submodel(target)
    if draft_model is None:
        drafter, dpool = model, runners
        dsub = model.config.submodel(model.config.names[0] if draft is None else draft)
        if not isinstance(draft, Submodel):  # heads a name implies never exceed the target's
            dsub = capped(dsub, tsub)
        _check_draft(dsub, tsub)
        mode = "shared-cache" if shared_cache else "two-cache"
    else:
        if shared_cache:
            raise ValueError("a separately trained drafter cannot share the target's cache")
        if draft_model.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"drafter vocabulary ({draft_model.config.vocab_size}) differs from "
                             f"the target's ({model.config.vocab_size})")
        if T + max_new_tokens - 1 > draft_model.config.max_seq_len:
            raise ValueError("prompt + max_new_tokens exceed the drafter's context")
        drafter, mode = draft_model, "external"
        dpool = RunnerPool.of(draft_model, draft_runners, compile=runners.compile)
        dsub = drafter.config.submodel(draft)
    n_slots = max(T + max_new_tokens - 1, T)
    tcache = runners.new_cache(1, n_slots) if cache is None else cache
    dcache = tcache if shared_cache else dpool.new_cache(1, n_slots)
    setup = _Setup(model, drafter, runners.get(tsub), dpool.get(dsub), tcache, dcache, mode)
    return setup, ids


@dataclass
class _Sampler:
    """Greedy or rejection-sampled acceptance of drafts, with the target's distribution."""

    temperature: float
    top_k: int | None
    top_p: float | None
    generator: torch.Generator | None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: Tensor) -> Tensor:
        return logits_to_probs(logits, temperature=self.temperature, top_k=self.top_k,
                               top_p=self.top_p)

    def first(self, logits: Tensor) -> Tensor:
        if self.greedy:
            return logits.argmax(-1, keepdim=True)
        return torch.multinomial(self.probs(logits), 1, generator=self.generator)


def _draft(s: _Setup, out: Tensor, n: int, draft_valid: int, k: int, sampler: _Sampler
           ) -> tuple[int, Tensor | None]:
    """Draft ``k`` tokens into ``out[n : n + k]``, feeding everything the drafter's cache
    lacks. Returns the new count of drafter cache slots holding the sequence, and the draft
    distributions (k, vocab) when sampling."""
    draft_probs = []
    for i in range(k):
        dl = s.draft(out[None, draft_valid: n + i], s.dcache, draft_valid, last_only=True)[0, -1]
        draft_valid = n + i
        if sampler.greedy:
            out[n + i] = dl.argmax()
        else:
            p = sampler.probs(dl)
            out[n + i] = torch.multinomial(p, 1, generator=sampler.generator)[0]
            draft_probs.append(p)
    return draft_valid, torch.stack(draft_probs) if draft_probs else None


def _verify(s: _Setup, out: Tensor, n: int, k: int, draft_probs: Tensor | None,
            sampler: _Sampler) -> Tensor:
    """One target forward over slots n - 1 .. n - 1 + k, k >= 1 (in a shared cache this
    overwrites the drafter's K/V of those slots with the target's); the emitted 1..k+1 tokens."""
    tl = s.target(out[None, n - 1: n + k], s.tcache, n - 1)[0]  # (k + 1, vocab)
    drafts = out[n: n + k]
    if sampler.greedy:
        return greedy_accept(drafts, tl)
    assert draft_probs is not None  # k >= 1 drafts were sampled
    return accept_reject(drafts, draft_probs, sampler.probs(tl), sampler.generator)


def _costs(s: _Setup, pool: RunnerPool, pos: int, max_draft_len: int,
           costs: DraftCosts | None) -> DraftCosts:
    """The given cost model, else this pool's earlier one, else the one kept on this machine
    for this model shape and pair (:func:`~matformer.draft.load_costs`), else a fresh
    measurement, which is then kept: a generation pays for measuring once per machine, not
    once per call."""
    if costs is not None:
        return costs
    found = pool.measured.get(("draft-costs", *s.key))
    if isinstance(found, DraftCosts):
        return found
    key = costs_key(s.model, s.draft.submodel, s.target.submodel, s.mode, s.target,
                    max_draft_len + 1)
    measured = load_costs(key)
    if measured is None:
        measured = measure_costs({"draft": s.draft}, s.target, s.dcache, s.tcache, pos,
                                 max_draft_len + 1)["draft"]
        save_costs(key, measured)
        log.info("measured costs: drafter token %.2f ms, verification %s",
                 1e3 * measured.draft_token,
                 {n: round(1e3 * c, 2) for n, c in measured.verify.items()})
    pool.measured[("draft-costs", *s.key)] = measured
    return measured


def _check_lengths(draft_len: int, max_draft_len: int, max_new_tokens: int) -> None:
    """Raise ValueError unless ``1 <= draft_len <= max_draft_len`` and ``max_new_tokens >= 0``."""
    if draft_len < 1 or max_draft_len < draft_len:
        raise ValueError(f"need 1 <= draft_len ({draft_len}) <= max_draft_len ({max_draft_len})")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")


def _acceptance(s: _Setup, pool: RunnerPool, greedy: bool,
                acceptance: Acceptance | None) -> Acceptance:
    """The given running acceptance, else this pool's for the drafter/target pair (so it
    carries over calls with the pool), else a fresh one."""
    if acceptance is not None:
        return acceptance
    found = pool.measured.setdefault(("acceptance", *s.key, greedy), Acceptance())
    return found if isinstance(found, Acceptance) else Acceptance()


@torch.no_grad()
def speculative_stream(
    model: MatFormerLM, prompt: Tensor, max_new_tokens: int, *,
    draft: SubmodelSpec = None, target: SubmodelSpec = None,
    draft_model: MatFormerLM | None = None,
    shared_cache: bool = False, draft_len: int = 4, adaptive: bool = False,
    max_draft_len: int = 16, temperature: float = 0.0, top_k: int | None = None,
    top_p: float | None = None, eos_id: int | None = None,
    generator: torch.Generator | None = None, stats: SpecStats | None = None,
    cache: KVCache | None = None, runners: RunnerPool | None = None,
    draft_runners: RunnerPool | None = None, compile: bool | None = None,
    costs: DraftCosts | None = None, acceptance: Acceptance | None = None,
) -> Iterator[Tensor]:
    """Speculative decoding of one sequence; yields each round's emitted ids (1-D) as they come.

    Args:
        model: The target's weights (and the drafter's, unless ``draft_model`` is given).
        prompt: (1, T) or (T,) ids.
        max_new_tokens: Tokens to generate (fewer if ``eos_id`` appears).
        draft: The drafter submodel; default: ``model``'s smallest granularity, or the full
            ``draft_model``. Heads a granularity name implies are capped at the target's.
        target: The target submodel; default: the full model.
        draft_model: A separately trained drafter (same vocabulary) with its own cache.
        shared_cache: One cache for drafter and target (nested drafter only).
        draft_len: Tokens drafted per round (not used with ``adaptive``).
        adaptive: Choose each round's draft length in ``0..max_draft_len`` to maximise
            expected tokens/s (:func:`~matformer.draft.choose_draft_len`) from the measured
            costs and the running acceptance; 0 is a plain decoding step.
        temperature, top_k, top_p, generator: The target distribution to sample from;
            ``temperature=0`` is greedy.
        eos_id: Stop after emitting it.
        stats: Filled in as decoding goes (counts, acceptance, seconds spent in here).
        cache: The target's cache (made here when None); with ``shared_cache`` the drafter's too.
        runners, draft_runners, compile: Lean forwards of the model (and of ``draft_model``);
            made here when None (``compile`` as in :class:`~matformer.runner.RunnerPool`).
        costs: A cost model for ``adaptive`` (default: measured once per pool, then updated).
        acceptance: The running acceptance to start from and update (default: the pool's,
            kept per drafter/target pair across calls; at first a weak prior of 2/3).
    """
    _check_sampling(temperature, top_k, top_p)
    _check_lengths(draft_len, max_draft_len, max_new_tokens)
    pool = RunnerPool.of(model, runners, compile=compile)
    s, ids = _setup(model, prompt, max_new_tokens, draft, target, draft_model, shared_cache,
                    pool, draft_runners, cache)
    stats = SpecStats() if stats is None else stats
    stats.mode = s.mode
    if max_new_tokens == 0:
        return
    with eval_mode(s.model, s.drafter):
        acceptance = _acceptance(s, pool, temperature == 0, acceptance)
        yield from _decode(s, pool, ids, max_new_tokens, stats, _Sampler(
            temperature, top_k, top_p, generator), eos_id, draft_len,
            max_draft_len if adaptive else None, costs, acceptance)


def _decode(s: _Setup, pool: RunnerPool, ids: Tensor, max_new_tokens: int, stats: SpecStats,
            sampler: _Sampler, eos_id: int | None, draft_len: int, max_k: int | None,
            costs: DraftCosts | None, acceptance: Acceptance) -> Iterator[Tensor]:
    """The rounds of :func:`speculative_stream` (``max_k`` None: fixed draft length).

    ``stats.seconds`` counts only the time spent in here, not the caller's between yields.
    """
    t0 = perf_counter()
    T, device = ids.numel(), s.tcache.device
    out = torch.empty(T + max_new_tokens, dtype=torch.long, device=device)
    out[:T] = ids
    logits = prefill(s.model, out[None, :T], s.tcache, runner=s.target)[0]
    stats.target_forwards += 1
    out[T] = sampler.first(logits)[0]
    pos = _Position(n=T + 1, draft_valid=T if s.dcache is s.tcache else 0)
    if max_k is not None and max_new_tokens > 1:  # one token: no round, nothing to measure
        costs = _costs(s, pool, pos.n - 1, max_k, costs)
    generated, k, idle = 0, draft_len, 0
    tokens = out[T: T + 1].clone()
    while True:
        tokens = _emit(tokens, eos_id, stats)
        generated += tokens.numel()
        stats.seconds += perf_counter() - t0
        yield tokens
        t0 = perf_counter()
        if generated >= max_new_tokens or (eos_id is not None and int(tokens[-1]) == eos_id):
            return
        if max_k is not None:
            if idle == 0:  # at k = 0 nothing that decides k changes until the next probe
                k = choose_draft_len(acceptance.rate, costs, max_k)
            idle = idle + 1 if k == 0 else 0
            if idle >= PROBE_EVERY:  # look again at the acceptance once in a while
                k, idle = 1, 0
        k_now = min(k, max_new_tokens - generated - 1)
        tokens = _round(s, out, pos, k_now, sampler, stats,
                        (costs, acceptance) if max_k is not None else None)


@dataclass
class _Position:
    """Where decoding stands: ``n`` tokens in ``out`` (the last one in no cache yet), and how
    many drafter cache slots hold the sequence."""

    n: int
    draft_valid: int


def _round(s: _Setup, out: Tensor, pos: _Position, k: int, sampler: _Sampler,
           stats: SpecStats, adapt: tuple[DraftCosts, Acceptance] | None) -> Tensor:
    """One round: ``k`` drafts and their verification (k = 0: a plain decoding step, as cheap
    as generate()'s). Returns the emitted tokens; ``adapt`` records its costs and acceptance."""
    n, shared = pos.n, s.dcache is s.tcache
    stats.target_forwards += 1
    stats.rounds += 1
    stats.draft_lens.append(k)
    if k == 0:
        tokens = sampler.first(s.target(out[None, n - 1: n], s.tcache, n - 1)[0, -1])
        out[n] = tokens[0]
        pos.n = n + 1
        if shared:
            pos.draft_valid = n
        return tokens
    t_draft = perf_counter()
    draft_valid, draft_probs = _draft(s, out, n, pos.draft_valid, k, sampler)
    t_verify = synced_clock(out.device) if adapt is not None else 0.0  # no sync to time nothing
    accepted = _verify(s, out, n, k, draft_probs, sampler)
    a = accepted.numel() - 1  # drafts kept
    if adapt is not None:
        t_end = perf_counter()
        adapt[0].record_draft(t_verify - t_draft, k)
        adapt[0].record_verify(k + 1, t_end - t_verify)
        adapt[1].update(a, k)
    out[n: n + a + 1] = accepted
    pos.n = n + a + 1
    # Slots < n - 1 now hold the accepted sequence: the target's, and the drafter's too up
    # to where it drafted. Anything later is stale and will be overwritten before it is read.
    pos.draft_valid = pos.n - 1 if shared else min(draft_valid, pos.n - 1)
    stats.draft_forwards += k
    stats.drafted += k
    stats.accepted += a
    return accepted


def _emit(tokens: Tensor, eos_id: int | None, stats: SpecStats) -> Tensor:
    """Cut after the first ``eos_id``; count what is emitted."""
    if eos_id is not None and bool((tokens == eos_id).any()):
        tokens = tokens[: int((tokens == eos_id).nonzero()[0, 0]) + 1]
    stats.new_tokens += tokens.numel()
    return tokens


def speculative_generate(model: MatFormerLM, prompt: Tensor, max_new_tokens: int,
                         on_tokens: Callable[[Tensor], None] | None = None,
                         **kwargs: Any) -> tuple[Tensor, SpecStats]:
    """Run :func:`speculative_stream` to the end.

    Returns:
        ``(ids (1, T + n), stats)``: the prompt and the new tokens, and what decoding cost.
        ``on_tokens`` is called with each round's tokens (streaming).
    """
    stats = kwargs.pop("stats", None) or SpecStats()
    pieces = [prompt.reshape(1, -1)]
    for tokens in speculative_stream(model, prompt, max_new_tokens, stats=stats, **kwargs):
        if on_tokens is not None:
            on_tokens(tokens)
        pieces.append(tokens[None].to(pieces[0].device))
    log.info("speculative %s: %d tokens in %d rounds, acceptance %.2f, %.2f tokens per target "
             "forward, %.1f tokens/s", stats.mode, stats.new_tokens, stats.rounds,
             stats.acceptance_rate, stats.tokens_per_target_forward, stats.tokens_per_second)
    return torch.cat(pieces, 1), stats
