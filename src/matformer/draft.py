"""How to draft: the cost model, the draft-length rule, and the search for the best drafter.

Speculative decoding pays only when a round's expected tokens outweigh its cost. With per-token
acceptance ``a`` (a drafted token is kept with probability ``a`` given that the ones before it
were), a round of ``k`` drafts emits ``E(k) = (1 - a^(k+1)) / (1 - a)`` tokens on average
(Leviathan et al. 2023, eq. 1) and costs ``k c_d + c_v(k + 1)``: ``k`` drafter forwards of one
token and one target forward over ``k + 1`` tokens. Plain decoding is ``k = 0``: one token for
``c_v(1)``. :func:`choose_draft_len` picks the ``k`` of highest ``E(k) / cost(k)`` from *measured*
costs (:class:`DraftCosts`) and a running acceptance (:class:`Acceptance`), so drafting is used
only where it is expected to pay on this machine, for this drafter and this text.

:func:`search_drafter` does the same one level up: over candidate drafters (uniform and Mix'n'Match
submodels nested in the target, and early exits of them) it measures acceptance on held-out prefixes and the costs, and
ranks (drafter, k) by expected tokens per second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .cache import KVCache
from .config import Submodel, SubmodelSpec
from .data import default_cache_dir
from .model import MatFormerLM
from .outputs import write_text_atomic
from .runner import RunnerPool, SubmodelRunner

log = logging.getLogger(__name__)

def expected_tokens(k: int, alpha: float) -> float:
    """Mean tokens a round of ``k`` drafts emits at per-token acceptance ``alpha``."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


@dataclass
class DraftCosts:
    """Seconds of one drafter token and of one target forward over ``n`` tokens.

    ``verify`` maps ``n`` to measured seconds; :meth:`verify_cost` fits a line through them.
    With ``frozen`` the numbers are a fixed cost model (tests, what-if tables); otherwise each
    estimate becomes the median of its last ``window`` measurements (the starting value
    included), so a burst of load from other jobs does not swing the choice of draft length.
    """

    draft_token: float
    verify: dict[int, float]
    frozen: bool = False
    window: int = 15

    def __post_init__(self) -> None:
        self._line: tuple[float, float] | None = None  # (cost at n = 0, slope), refit on change
        self._draft_seen: deque[float] = deque([self.draft_token], maxlen=self.window)
        self._verify_seen = {n: deque([c], maxlen=self.window) for n, c in self.verify.items()}

    def verify_cost(self, n: int) -> float:
        """Estimated seconds of a target forward over ``n`` tokens: a least-squares line
        through the measured lengths (slope >= 0), which smooths out timing noise."""
        if self._line is None:
            self._line = self._fit()
        return max(self._line[0] + self._line[1] * n, 1e-12)

    def _fit(self) -> tuple[float, float]:
        ns = sorted(self.verify)
        if len(ns) == 1:  # one measurement: assume cost grows in proportion (pessimistic)
            return 0.0, self.verify[ns[0]] / ns[0]
        mean_n = sum(ns) / len(ns)
        mean_c = sum(self.verify.values()) / len(ns)
        slope = max(0.0, sum((m - mean_n) * (self.verify[m] - mean_c) for m in ns) / sum(
            (m - mean_n) ** 2 for m in ns))
        return mean_c - slope * mean_n, slope

    def round_cost(self, k: int) -> float:
        """Seconds of a round with ``k`` drafts (``k = 0``: a plain decoding step)."""
        return k * self.draft_token + self.verify_cost(k + 1)

    def record_draft(self, seconds: float, tokens: int) -> None:
        if not self.frozen and tokens > 0:
            self._draft_seen.append(seconds / tokens)
            self.draft_token = statistics.median(self._draft_seen)

    def record_verify(self, n: int, seconds: float) -> None:
        if self.frozen:
            return
        seen = self._verify_seen.setdefault(n, deque(maxlen=self.window))
        seen.append(seconds)
        self.verify[n] = statistics.median(seen)
        self._line = None


#: Measured drafting costs kept between runs, in the cache folder (``$MATFORMER_CACHE``).
COSTS_FILE = "draft_costs.json"


def costs_key(model: MatFormerLM, draft: Submodel, target: Submodel, mode: str,
              runner: SubmodelRunner, max_n: int) -> str:
    """What a cost measurement depends on: the model's shape, the two submodels, the cache
    mode, the compute dtype, compiled or eager, the longest verification, the thread count and
    the machine (its processor, host name and torch). Weight values do not matter."""
    import platform

    parts = [json.dumps(model.config.to_dict(), sort_keys=True), str(draft.widths),
             str(draft.heads), str(target.widths), str(target.heads), mode, str(runner.dtype),
             f"compiled={runner.compiled}", f"max_n={max_n}",
             f"threads={torch.get_num_threads()}", platform.node(), platform.processor(),
             platform.machine(), torch.__version__]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def load_costs(key: str, cache_dir: Path | None = None) -> DraftCosts | None:
    """Costs kept under ``key`` by :func:`save_costs`, or None (none kept, or unreadable)."""
    f = (cache_dir or default_cache_dir()) / COSTS_FILE
    try:
        entry = json.loads(f.read_text())[key]
        return DraftCosts(float(entry["draft_token"]),
                          {int(n): float(c) for n, c in entry["verify"].items()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def save_costs(key: str, costs: DraftCosts, cache_dir: Path | None = None) -> None:
    """Keep ``costs`` under ``key`` (atomically; other keys kept; a write that fails only
    logs: the costs are measured again next time)."""
    f = (cache_dir or default_cache_dir()) / COSTS_FILE
    try:
        kept = json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, ValueError):
        kept = {}
    kept[key] = {"draft_token": costs.draft_token, "verify": costs.verify}
    try:
        write_text_atomic(f, json.dumps(kept, indent=1) + "\n")
    except (OSError, ValueError) as e:  # OutputError is a ValueError
        log.warning("could not keep the measured drafting costs in %s: %s", f, e)


@dataclass
class Acceptance:
    """Running per-token acceptance: maximum likelihood with a prior and exponential forgetting.

    A round that kept ``a`` of ``k`` drafts saw ``a`` acceptances and, if ``a < k``, one
    rejection; the estimate is acceptances / (acceptances + rejections).
    """

    accepted: float = 2.0
    rejected: float = 1.0
    decay: float = 0.95

    @classmethod
    def with_prior(cls, rate: float, strength: float = 4.0) -> Acceptance:
        """A prior worth ``strength`` observations at acceptance ``rate``."""
        rate = min(max(rate, 0.0), 1.0)
        return cls(accepted=rate * strength, rejected=(1.0 - rate) * strength)

    @property
    def rate(self) -> float:
        total = self.accepted + self.rejected
        return self.accepted / total if total > 0 else 0.0

    def update(self, kept: int, drafted: int) -> None:
        if drafted == 0:
            return
        self.accepted = self.decay * self.accepted + kept
        self.rejected = self.decay * self.rejected + (1.0 if kept < drafted else 0.0)


#: Drafting must be expected to beat plain decoding by this fraction before it is chosen: timings
#: on a shared machine are noisy by about this much, and a wrong "drafting pays" costs speed.
MARGIN = 0.1


def choose_draft_len(alpha: float, costs: DraftCosts, max_draft_len: int,
                     margin: float = MARGIN) -> int:
    """The draft length in ``0..max_draft_len`` of highest expected tokens per second.

    ``k > 0`` is chosen only when it is expected to be faster than plain decoding (``k = 0``)
    by more than ``margin``; ties go to the shorter draft.
    """
    plain = 1.0 / costs.round_cost(0)
    best_k, best = 0, plain * (1 + margin)
    for k in range(1, max_draft_len + 1):
        speed = expected_tokens(k, alpha) / costs.round_cost(k)
        if speed > best * (1 + 1e-9):
            best_k, best = k, speed
    return best_k


def synced_clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the device has finished its queued work."""
    from .submodels.latency import sync

    sync(device)
    return time.perf_counter()


def time_call(fn: Callable[[], object], device: torch.device, reps: int = 3) -> float:
    """Median seconds of ``reps`` timed calls of ``fn()`` after one untimed call (the typical
    cost, as decoding will see it, rather than the best case), through the package's one
    timing routine (:func:`matformer.submodels.latency.measure`)."""
    from .submodels.latency import measure

    return statistics.median(measure([fn], repeats=reps, warmup=1, device=device)[0]) / 1e3


@torch.no_grad()
def measure_costs(drafters: dict[Any, SubmodelRunner], target: SubmodelRunner, dcache: KVCache,
                  tcache: KVCache, pos: int, max_n: int, *, rounds: int = 1, reps: int = 5,
                  frozen: bool = False) -> dict[Any, DraftCosts]:
    """Measure each drafter's token and the target's forwards over 1, 2 and ``max_n`` tokens
    at ``pos``: every call is timed (:func:`time_call`, ``reps`` calls) once per round, the
    rounds interleaved so that load on a shared machine hits every candidate alike; each cost
    is the median over the rounds. ``frozen``: return fixed cost models (see
    :class:`DraftCosts`).

    Writes scratch K/V into slots ``pos ..``; callers measure at the first slot not yet holding
    the sequence (every decoding call writes its slots before reading them, so nothing stale is
    ever read). ``max_n`` is reduced to what fits both caches.
    """
    device = tcache.device
    room = min(tcache.max_len, dcache.max_len) - pos
    if room < 1:
        raise ValueError(f"no free cache slot at position {pos} to measure costs")
    tok = torch.zeros(1, max(max_n, 1), dtype=torch.long, device=device)
    calls: dict[Any, Callable[[], object]] = {
        ("draft", name): (lambda r=r: r(tok[:, :1], dcache, pos, last_only=True))
        for name, r in drafters.items()}
    calls |= {("verify", n): (lambda n=n: target(tok[:, :n], tcache, pos))
              for n in sorted({1, min(2, room), min(max_n, room)})}
    times: dict[Any, list[float]] = {key: [] for key in calls}
    for _ in range(rounds):
        for key, fn in calls.items():
            times[key].append(time_call(fn, device, reps))
    verify = {n: statistics.median(times[kind, n]) for kind, n in calls if kind == "verify"}
    return {name: DraftCosts(statistics.median(times["draft", name]), dict(verify), frozen)
            for name in drafters}


@dataclass
class DrafterRow:
    """One searched drafter: the submodel, its measured acceptance and costs, and its best
    draft length."""

    name: str
    submodel: Submodel
    acceptance: float
    draft_ms: float
    best_k: int
    tokens_per_s: float
    speedup: float
    per_k: dict[int, float] = field(default_factory=dict)  # k -> expected tokens/s


def rank_drafters(acceptance: dict[str, float], drafters: dict[str, Submodel],
                  costs: dict[str, DraftCosts], max_draft_len: int) -> list[DrafterRow]:
    """Rank drafters by the expected tokens/s of their best draft length (pure arithmetic).

    Args:
        acceptance: Per-token acceptance of each drafter (name -> rate).
        drafters: Each drafter's submodel.
        costs: Each drafter's costs against the same target (``verify`` is the target's).
        max_draft_len: Longest draft considered.

    Returns:
        Rows sorted best first; ``speedup`` is relative to plain decoding (k = 0).
    """
    rows = []
    for name, alpha in acceptance.items():
        c = costs[name]
        per_k = {k: expected_tokens(k, alpha) / c.round_cost(k) for k in range(max_draft_len + 1)}
        k = choose_draft_len(alpha, c, max_draft_len)
        rows.append(DrafterRow(name, drafters[name], alpha, 1e3 * c.draft_token, k, per_k[k],
                               per_k[k] / per_k[0], per_k))
    return sorted(rows, key=lambda r: (-r.tokens_per_s, r.best_k))


def capped(draft: Submodel, target: Submodel) -> Submodel:
    """``draft`` with its heads capped layer by layer at the target's, so that a drafter never
    has more heads than its target, nor attention where the target skips it."""
    heads = tuple(min(h, t) for h, t in zip(draft.heads, target.heads, strict=True))
    return dataclasses.replace(draft, heads=heads)  # a Candidate stays one


#: Early exits the drafter search tries: the first half and three quarters of the layers.
EXITS = (0.5, 0.75)


def drafter_candidates(model: MatFormerLM, target: Submodel, max_rule: int = 6,
                       exits: Sequence[float] = EXITS) -> dict[str, Submodel]:
    """Submodels nested in, and smaller than, the target: the uniform granularities, up to
    ``max_rule`` Mix'n'Match rule candidates (spread evenly over their sizes), and, for
    depth, each uniform granularity and the target's own widths cut after a fraction of the
    layers in ``exits`` (early exit, LayerSkip-style self-speculation: the later layers are
    skipped, FFN and attention, and the shared norm and head read the last kept layer). A
    head-nested model's granularities keep their own heads; every candidate's heads are capped
    at the target's (:func:`capped`)."""
    from .submodels.candidates import candidates

    fits = [capped(c, target) for c in candidates(model.config)
            if all(w <= t for w, t in zip(c.widths, target.widths, strict=True))]
    fits = [c for c in fits if c != target]
    out = {c.name: c for c in fits if c.pattern == "uniform"}
    rule = [c for c in fits if c.pattern == "rule" and c not in out.values()]
    step = max(1, math.ceil(len(rule) / max_rule)) if rule else 1
    out |= {c.name: c for c in rule[::step][:max_rule]}
    n = model.config.n_layer
    uniform = [c for c in out.values() if c.pattern == "uniform"]
    for base in [*uniform, Submodel(target.widths, target.heads, "target")]:
        for frac in exits:
            keep = max(1, round(frac * n))
            if keep < n:
                cut = Submodel(base.widths[:keep] + (0,) * (n - keep),
                               base.heads[:keep] + (0,) * (n - keep),
                               f"{base.name}:{keep}/{n} layers")
                out.setdefault(cut.name, cut)
    return out


@torch.no_grad()
def greedy_acceptance(model: MatFormerLM, sequences: Sequence[Tensor],
                      prompt_lens: Sequence[int], drafter: Submodel) -> float:
    """Per-token greedy acceptance of ``drafter`` along the target's own continuations.

    ``sequences[i]`` holds ``prompt_lens[i]`` prompt ids, then the target's greedy output; a
    drafted token is accepted iff it equals the target's, so the acceptance is the drafter's
    argmax agreement at those positions (the two-cache setting: the drafter's own K/V).
    """
    hits = total = 0
    for seq, T in zip(sequences, prompt_lens, strict=True):
        pred = model(seq[None, :-1], widths=drafter)[0, T - 1:].argmax(-1)
        hits += int((pred == seq[T:]).sum())
        total += seq.numel() - T
    return hits / max(total, 1)


@torch.no_grad()
def drafter_acceptance(model: MatFormerLM, prompts: Sequence[Tensor], target: Submodel,
                       drafters: dict[str, Submodel], *, new_tokens: int = 32, runners: RunnerPool | None = None
                       ) -> dict[str, float]:
    """Greedy acceptance of each drafter: the target greedily continues each held-out prompt
    (1-D ids) by ``new_tokens``, and a drafter's acceptance is its agreement along those
    continuations (:func:`greedy_acceptance`)."""
    from .generate import generate

    seqs = [generate(model, p.reshape(1, -1), new_tokens, widths=target, temperature=0,
                     runners=runners)[0] for p in prompts]
    lens = [p.numel() for p in prompts]
    return {n: greedy_acceptance(model, seqs, lens, d) for n, d in drafters.items()}


@torch.no_grad()
def drafter_costs(model: MatFormerLM, target: Submodel, drafters: dict[str, Submodel], *,
                  context: int, max_draft_len: int = 8, runners: RunnerPool | None = None, reps: int = 7
                  ) -> dict[str, DraftCosts]:
    """Measured costs (frozen) of every drafter against ``target`` at position ``context`` of a
    filled cache: :func:`measure_costs` over ``reps`` interleaved rounds of 3 calls each. The
    weights' values do not matter."""
    pool = RunnerPool.of(model, runners)
    ctx = model.config.max_seq_len
    pos = min(context, ctx - 2)
    cache = pool.new_cache(1, min(pos + max_draft_len + 1, ctx))
    target_runner = pool.get(target)
    target_runner(torch.zeros(1, pos, dtype=torch.long, device=cache.device), cache, 0,
                  last_only=True)
    return measure_costs({name: pool.get(d) for name, d in drafters.items()},
                         target_runner, cache, cache, pos, max_draft_len + 1, rounds=reps,
                         reps=3, frozen=True)


@torch.no_grad()
def search_drafter(model: MatFormerLM, prompts: Sequence[Tensor], *,
                   target: SubmodelSpec = None, new_tokens: int = 32,
                   max_draft_len: int = 8, runners: RunnerPool | None = None,
                   drafters: dict[str, Submodel] | None = None, reps: int = 7
                   ) -> list[DrafterRow]:
    """Rank drafters (and draft lengths) for ``target`` by expected tokens/s on this machine.

    Acceptance: :func:`drafter_acceptance` on the held-out ``prompts``. Costs:
    :func:`drafter_costs` at the middle of the target's continuations. ``drafters`` (name ->
    submodel): default :func:`drafter_candidates`.

    Returns:
        :func:`rank_drafters` rows, best first (a best ``k`` of 0: do not draft).
    """
    if not prompts:
        raise ValueError("the drafter search needs at least one held-out prompt")
    pool = RunnerPool.of(model, runners)
    target = model.config.submodel(target)
    drafters = drafter_candidates(model, target) if drafters is None else drafters
    if not drafters:
        raise ValueError(f"no submodel is nested in, and smaller than, the target ({target}): "
                         "nothing can draft for it")
    acceptance = drafter_acceptance(model, prompts, target, drafters, new_tokens=new_tokens,
                                    runners=pool)
    context = max(p.numel() for p in prompts) + new_tokens // 2
    costs = drafter_costs(model, target, drafters, context=context, max_draft_len=max_draft_len, runners=pool, reps=reps)
    rows = rank_drafters(acceptance, drafters, costs, max_draft_len)
    log.info("drafter search: best %s (k=%d, %.2fx plain)", rows[0].name, rows[0].best_k,
             rows[0].speedup)
    return rows
