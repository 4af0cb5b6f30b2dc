"""Continuous batching of requests for different submodels over one set of weights.

Serving has three parts (as vLLM keeps them apart): this scheduler *decides* (which waiting
request gets a free slot, which submodel an ``auto`` request runs, when a request ends or is
dropped); the :class:`~matformer.serve.executor.Executor` *runs* (prefills, and one decode
forward for every active row together through the model's one forward, mixed widths in one
batch); a :class:`~matformer.serve.output.TextStream` per request turns tokens into text
(detokenising, stop strings, end of text). One thread runs the loop. Requests join and leave
between steps; a finished or cancelled request frees its slot at once (the last slot moves
into the hole so active rows stay packed). ``auto`` requests get the submodel the
:class:`~matformer.serve.policy.AutoPolicy` picks from the queue and the step time, and when the
policy steps down, running ``auto`` requests step down with it at the next token: the cached
K/V do not depend on FFN width, so the smaller submodel continues from them (as the nested
drafter does with a shared cache in speculative decoding). A batch is only as cheap as its
widest row, so this is what lets ``auto`` relieve an overloaded batch at once.

Requests talk back through a callback (``emit``) that must be thread-safe; the HTTP layer
turns it into an asyncio queue.
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..model import MatFormerLM
from ..tokenizer import Tokenizer
from .executor import Executor, sample
from .metrics import Metrics, server_metrics
from .output import TextStream
from .policy import AutoPolicy
from .registry import AUTO, Servable

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue is at its bound (HTTP 429)."""


class ShuttingDown(RuntimeError):
    """The server is draining and takes no new requests (HTTP 503)."""


@dataclass
class Event:
    """What the scheduler reports to a request: ``delta`` (new text), ``done`` or ``error``."""

    kind: str
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    submodel: Servable | None = None
    #: ``done`` only: ``(submodel name, tokens it generated)`` in order; more than one entry
    #: when an ``auto`` request stepped down while it ran.
    history: list[tuple[str, int]] | None = None


def token_room(n_prompt: int, context: int) -> int:
    """Most tokens a request may generate after ``n_prompt`` prompt tokens in a context of
    ``context`` positions: the last generated token is never fed back, so prompt + tokens - 1
    positions must fit."""
    return context - n_prompt + 1


@dataclass
class Request:
    """One generation request, validated by the caller.

    Attributes:
        prompt: Token ids (at least one); prompt + max_tokens must fit the context.
        max_tokens: Most tokens to generate (>= 1).
        submodel: What to run, or None for ``auto``.
        emit: Thread-safe sink for :class:`Event` s.
        temperature, top_p, seed: Sampling (temperature 0 is greedy).
        stop: Strings that end the completion (not included in it).
        ignore_eos: Keep generating past the end-of-text token (benchmarks).
        latency_budget_ms: ``auto`` only: per-token latency the chosen submodel must meet.
    """

    prompt: list[int]
    max_tokens: int
    submodel: Servable | None
    emit: Callable[[Event], None]
    temperature: float = 1.0
    top_p: float | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    latency_budget_ms: float | None = None
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Ask the scheduler to drop this request (a client that went away)."""
        self.cancelled.set()


@dataclass
class _Row:
    """A request occupying a slot: its submodel, generator and text."""

    req: Request
    sub: Servable
    gen: torch.Generator
    text: TextStream
    first_token_at: float | None = None
    history: list[list] = field(default_factory=list)  # [submodel name, tokens] per switch


class Scheduler:
    """The batching loop (see the module docstring). ``start()``, ``submit()``, ``shutdown()``.

    Args:
        model: The one model; put in eval mode, never copied.
        tokenizer: Its tokenizer (detokenising, stop strings, end-of-text).
        policy: The ``auto`` policy, or None to refuse ``auto``.
        max_batch: Slots decoded together.
        max_queue: Requests that may wait for a slot; more are refused (:class:`QueueFull`).
        metrics: Where to count; a fresh :func:`server_metrics` when None.
    """

    def __init__(self, model: MatFormerLM, tokenizer: Tokenizer, *,
                 policy: AutoPolicy | None = None, max_batch: int = 8, max_queue: int = 64,
                 metrics: Metrics | None = None, context: int | None = None) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch={max_batch} must be >= 1 and max_queue={max_queue} "
                             ">= 0")
        self.tokenizer, self.policy = tokenizer, policy
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = metrics or server_metrics()
        self.executor = Executor(model, max_batch, context)
        self._queue: collections.deque[Request] = collections.deque()
        self._rows: list[_Row] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._step_ms: float | None = None
        self._report_policy()

    # ----------------------------------------------------------------- control
    def start(self) -> None:
        """Start the scheduler thread."""
        self._thread = threading.Thread(target=self._loop, name="matformer-scheduler",
                                        daemon=True)
        self._thread.start()

    def submit(self, req: Request) -> None:
        """Queue a request; raises QueueFull or ShuttingDown instead of waiting, and ValueError
        for a request that could not run (no prompt, max_tokens < 1, or more tokens than the
        context holds: the last token is never fed back, so prompt + max_tokens - 1 must fit)."""
        ctx = self.executor.context
        if not req.prompt or not 1 <= req.max_tokens <= token_room(len(req.prompt), ctx):
            raise ValueError(f"a request of {len(req.prompt)} prompt tokens and max_tokens="
                             f"{req.max_tokens} does not fit: need >= 1 of each and prompt + "
                             f"max_tokens - 1 <= {ctx} (the context)")
        with self._cond:
            if self._stopping:
                self.metrics.inc("rejected_total", reason="shutting_down")
                raise ShuttingDown("the server is shutting down")
            self._drop_cancelled_waiting()  # a client that left holds no place in the queue
            free = self.max_batch - len(self._rows)
            if len(self._queue) >= self.max_queue + max(0, free):
                self.metrics.inc("rejected_total", reason="queue_full")
                raise QueueFull(f"{len(self._queue)} requests are waiting (the queue holds "
                                f"{self.max_queue} beyond the free slots); retry later")
            self._queue.append(req)
            self.metrics.set("queued_requests", len(self._queue))
            self._cond.notify()

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop taking requests, finish every running and waiting one, stop the thread.

        Returns True when the thread ended within ``timeout`` seconds.
        """
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    @property
    def load(self) -> dict[str, int]:
        """Active and queued request counts."""
        with self._cond:
            return {"active": len(self._rows), "queued": len(self._queue)}

    # ----------------------------------------------------------------- the loop
    def _loop(self) -> None:
        torch.set_flush_denormal(True)  # per thread: fp32 denormals make CPU matmuls crawl
        while True:
            with self._cond:
                while not self._queue and not self._rows and not self._stopping:
                    if self.policy is not None:
                        self.policy.idle()
                        self._report_policy()
                    self._cond.wait()
                self._drop_cancelled_waiting()
                if self._stopping and not self._queue and not self._rows:
                    return
                admit = []
                while self._queue and len(self._rows) + len(admit) < self.max_batch:
                    admit.append(self._queue.popleft())
                waiting = len(self._queue)
                self.metrics.set("queued_requests", waiting)
            t0 = time.perf_counter()
            with torch.no_grad():
                for req in admit:
                    if not req.cancelled.is_set():
                        self._admit(req)
                self._drop_cancelled()
                try:
                    if self._rows:
                        self._decode_step()
                except Exception as e:  # never let one bad step kill the server
                    log.exception("decode step failed")
                    for row in list(self._rows):
                        self._finish(row, "error", error=f"internal error: {e}")
            self._step_ms = (time.perf_counter() - t0) * 1e3
            self.metrics.observe("step_seconds", self._step_ms / 1e3)
            self.metrics.set("active_requests", len(self._rows))
            if self.policy is not None:
                before = self.policy.level
                if self.policy.observe(waiting, self._step_ms) < before:
                    self.step_down_auto()
                self._report_policy()

    def step_down_auto(self) -> int:
        """Move running ``auto`` requests to the policy's choice when it is smaller; returns
        how many moved (they take effect at the next decode step)."""
        moved = 0
        for row in self._rows:
            if row.req.submodel is not None:
                continue
            new = self.policy.choose(row.req.latency_budget_ms)
            if new.params < row.sub.params:
                row.sub = new
                row.history.append([new.name, 0])
                moved += 1
        if moved:
            self.metrics.inc("auto_step_downs_total", moved)
        return moved

    def _report_policy(self) -> None:
        if self.policy is None:
            return
        self.metrics.set("auto_level", self.policy.level)
        for i, sub in enumerate(self.policy.levels):
            self.metrics.set("auto_submodel", float(i == self.policy.level), submodel=sub.name)

    def _admit(self, req: Request) -> None:
        """Prefill a request into a free slot; a failure answers that request alone."""
        n = len(self._rows)
        try:
            self._prefill(req)
        except Exception as e:
            log.exception("prefill failed")
            if len(self._rows) > n:  # it got its slot before failing: free it
                self._finish(self._rows[-1], "error", error=f"internal error: {e}")
            else:
                self.metrics.inc("rejected_total", reason="error")
                req.emit(Event("error", text=f"internal error: {e}"))

    def _prefill(self, req: Request) -> None:
        sub = req.submodel or self.policy.choose(req.latency_budget_ms)
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        text = TextStream(self.tokenizer, req.max_tokens, req.stop, req.ignore_eos)
        row = _Row(req, sub, torch.Generator().manual_seed(seed), text, history=[[sub.name, 0]])
        logits = self.executor.prefill(len(self._rows), req.prompt, sub.submodel)
        self._rows.append(row)
        self.metrics.inc("prompt_tokens_total", len(req.prompt), submodel=sub.name)
        req.emit(Event("start", submodel=sub))
        self._take(row, self._sample(row, logits, int(logits.argmax(-1)[0])))

    def _decode_step(self) -> None:
        logits = self.executor.decode([r.text.tokens[-1] for r in self._rows],
                                      [r.sub.submodel for r in self._rows])
        self.metrics.observe("batch_size", len(self._rows))
        greedy = logits.argmax(-1).tolist()
        for b, row in enumerate(list(self._rows)):  # a row's failure ends that row alone
            try:
                self._take(row, self._sample(row, logits[b:b + 1], greedy[b]))
            except Exception as e:
                log.exception("sampling failed")
                self._finish(row, "error", error=f"internal error: {e}")

    @staticmethod
    def _sample(row: _Row, logits: torch.Tensor, greedy: int) -> int:
        return sample(logits, greedy, row.req.temperature, row.req.top_p, row.gen)

    def _take(self, row: _Row, tok: int) -> None:
        """Record a sampled token; send the text it frees; finish the row when it ends it."""
        if row.first_token_at is None:
            row.first_token_at = time.perf_counter()
            self.metrics.observe("time_to_first_token_seconds",
                                 row.first_token_at - row.req.arrived, submodel=row.sub.name)
        row.history[-1][1] += 1
        out = row.text.take(tok)
        if out.text:
            row.req.emit(Event("delta", text=out.text))
        if out.finish is not None:
            self._finish(row, out.finish)

    def _finish(self, row: _Row, reason: str, *, error: str | None = None) -> None:
        """Emit the final event; free the row's slot."""
        req, sub = row.req, row.sub
        n = len(row.text.tokens)
        usage = {"prompt_tokens": len(req.prompt), "completion_tokens": n,
                 "total_tokens": len(req.prompt) + n}
        history = [(name, n) for name, n in row.history]
        req.emit(Event("error", text=error, submodel=sub) if error is not None else
                 Event("done", finish_reason=reason, usage=usage, submodel=sub,
                       history=history))
        self.metrics.inc("requests_total", outcome=reason, submodel=sub.name)
        for name, n in history:
            self.metrics.inc("completion_tokens_total", n, submodel=name)
        self.metrics.observe("request_latency_seconds", time.perf_counter() - req.arrived,
                             submodel=sub.name)
        self._remove(row)

    def _drop_cancelled_waiting(self) -> None:
        """Remove queued requests whose clients left (call with the lock held): they no longer
        count against the queue's bound nor wait for a slot."""
        gone = [r for r in self._queue if r.cancelled.is_set()]
        if gone:
            self._queue = collections.deque(r for r in self._queue if not r.cancelled.is_set())
            for r in gone:
                name = r.submodel.name if r.submodel is not None else AUTO
                self.metrics.inc("requests_total", outcome="cancelled", submodel=name)
            self.metrics.set("queued_requests", len(self._queue))

    def _drop_cancelled(self) -> None:
        for row in [r for r in self._rows if r.req.cancelled.is_set()]:
            self.metrics.inc("requests_total", outcome="cancelled", submodel=row.sub.name)
            for name, n in row.history:
                self.metrics.inc("completion_tokens_total", n, submodel=name)
            self._remove(row)

    def _remove(self, row: _Row) -> None:
        i, last = self._rows.index(row), len(self._rows) - 1
        if i != last:  # keep the active slots packed: the last one moves into the hole
            self.executor.move(last, i)
            self._rows[i] = self._rows[last]
        self._rows.pop()
        self.executor.free(last)

    def stats(self) -> dict[str, Any]:
        """A snapshot for ``/health``."""
        load = self.load
        return {**load, "max_batch": self.max_batch, "max_queue": self.max_queue,
                "step_ms": self._step_ms,
                "auto": None if self.policy is None else self.policy.current.name}
