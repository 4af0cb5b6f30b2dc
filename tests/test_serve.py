"""The server: mixed-width batching computes what each row computes alone, the auto policy, and
the real HTTP server (uvicorn on a free loopback port) spoken to by the ``openai`` client and by
plain HTTP: completions, chat, streaming, bad input, concurrency, disconnects, shutdown."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import random_tokens, tiny_model

from matformer.cache import KVCache
from matformer.checkpoint import save_checkpoint
from matformer.config import Submodel
from matformer.generate import generate
from matformer.model import MatFormerLM, RowWidths
from matformer.serve import build_registry, load_server, uvicorn_server
from matformer.serve.cache import SlotCache
from matformer.serve.executor import Executor
from matformer.serve.metrics import Metrics
from matformer.serve.output import TextStream
from matformer.serve.policy import AutoPolicy
from matformer.serve.registry import Servable
from matformer.serve.scheduler import Event, QueueFull, Request, Scheduler
from matformer.tokenizer import Tokenizer

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

CONTEXT = 512  # long enough that a 400-token stream is still running when its client leaves


# ----------------------------------------------------------------------------- model level
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu2"])
def test_row_widths_compute_each_row_alone(activation: str) -> None:
    model = tiny_model(activation=activation).eval()
    x = random_tokens(4, 10)
    rows = ["S", "XL", (8, 64), "M"]
    with torch.no_grad():
        mixed = model(x, widths=RowWidths(rows))
        for b, w in enumerate(rows):
            torch.testing.assert_close(mixed[b], model(x[b:b + 1], widths=w)[0],
                                       rtol=1e-5, atol=1e-5)
        # every row the same width: the plain path, bit for bit
        assert torch.equal(model(x, widths=RowWidths(["M"] * 4)), model(x, widths="M"))


def test_row_widths_validate() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="RowWidths has 2 rows"):
        model(random_tokens(3, 4), widths=RowWidths(["S", "M"]))
    with pytest.raises(ValueError, match="out of range"):
        model(random_tokens(1, 4), widths=RowWidths([(8, 999)]))
    with pytest.raises(ValueError, match="at least one row"):
        RowWidths([])


def test_slot_cache_rows_at_their_own_positions_match_solo_decoding() -> None:
    """Prompts of different lengths join one by one; a mixed S/XL/M batch then decodes in one
    forward per step: every row's greedy tokens equal its own KVCache decoding."""
    model = tiny_model().eval()
    cache = SlotCache.for_model(model, 4)
    prompts = [random_tokens(1, n, seed=n)[0] for n in (3, 7, 5)]
    widths = ["S", "XL", "M"]
    out: list[list[int]] = []
    with torch.no_grad():
        for slot, (p, w) in enumerate(zip(prompts, widths, strict=True)):
            cache.select(slot, 1, len(p))
            out.append([int(model(p[None], widths=w, cache=cache)[0, -1].argmax())])
            cache.advance()
        rw = RowWidths(widths)
        for _ in range(8):
            cache.select(0, 3, 1)
            logits = model(torch.tensor([[o[-1]] for o in out]), widths=rw, cache=cache)
            cache.advance()
            for b, o in enumerate(out):
                o.append(int(logits[b, -1].argmax()))
    for p, w, o in zip(prompts, widths, out, strict=True):
        ref = generate(model, [p.tolist()], 9, widths=w, temperature=0)[0, len(p):]
        assert o == ref.tolist()


# ----------------------------------------------------------------------------- auto policy
def _subs(n: int = 4) -> list[Servable]:
    return [Servable(f"m{i}", Submodel((8 * 2 ** i,) * 2, (2, 2)), 1000 * (i + 1), "granularity",
                     f"g{i}",
                     {"decode_ms": 1.0 + i}) for i in range(n)]


def test_auto_policy_steps_down_under_load_and_back_up_when_it_drains() -> None:
    policy = AutoPolicy(_subs(), target_ms=10.0, queue_high=2, patience=2)
    assert policy.current.name == "m3"  # starts at the largest
    levels = [policy.observe(queue_len=5, step_ms=4.0) for _ in range(6)]  # a growing queue
    assert levels == [3, 2, 2, 1, 1, 0]
    assert policy.observe(5, 4.0) == 0  # never below the cheapest
    levels = [policy.observe(queue_len=0, step_ms=2.0) for _ in range(6)]  # drained, fast
    assert levels == [0, 1, 1, 2, 2, 3]
    assert policy.observe(0, 2.0) == 3  # never above the largest


def test_auto_policy_follows_the_latency_target_with_hysteresis() -> None:
    policy = AutoPolicy(_subs(), target_ms=10.0, queue_high=100, patience=1, headroom=0.5)
    assert policy.observe(0, 12.0) == 2  # slower than the target: down
    assert policy.observe(0, 7.0) == 2  # within target but no headroom: stay
    assert policy.observe(0, 4.0) == 3  # plenty of headroom: up
    assert policy.observe(1, 1.0) == 3  # someone waiting: do not step up (already top)
    policy.level = 0
    assert policy.observe(1, 1.0) == 0  # waiting requests block stepping up
    policy.idle()
    assert policy.level == 3


def test_auto_policy_budget_and_queue_only_mode() -> None:
    policy = AutoPolicy(_subs(), target_ms=None, queue_high=0, patience=1)
    assert policy.choose(2.5).name == "m1"  # the largest whose decode_ms fits
    assert policy.choose(0.1).name == "m0"  # nothing fits: the cheapest
    assert policy.observe(1, 1e9) == 2  # no target: step time is ignored, the queue counts
    assert policy.observe(0, 1e9) == 3
    with pytest.raises(ValueError, match="target_ms"):
        AutoPolicy(_subs(), target_ms=0)


# ----------------------------------------------------------------------------- pieces
def test_metrics_render_prometheus_text() -> None:
    m = Metrics("t")
    m.describe("reqs", "counter", "requests")
    m.describe("lat", "histogram", "latency", (0.1, 1.0))
    m.inc("reqs", submodel="S")
    m.inc("reqs", 2, submodel="S")
    for v in (0.05, 0.5, 5.0):
        m.observe("lat", v, submodel="S")
    text = m.render()
    assert '# TYPE t_reqs counter\nt_reqs{submodel="S"} 3' in text
    assert 't_lat_bucket{submodel="S",le="0.1"} 1' in text
    assert 't_lat_bucket{submodel="S",le="+Inf"} 3' in text
    assert 't_lat_count{submodel="S"} 3' in text


def _sweep(model: MatFormerLM) -> dict[str, Any]:
    cfg = model.config
    rows = [{"name": g, "widths": list(cfg.ffn_widths(g)), "params": 0, "val_loss": 4 - i,
             "pareto_params": True, "decode_ms": 0.5 + i, "prefill_ms": 1.0 + i}
            for i, g in enumerate(cfg.names)]
    rows += [{"name": "1xS+1xXL", "widths": [8, 64], "params": cfg.num_params((8, 64)),
              "val_loss": 2.5, "pareto_params": True, "decode_ms": 1.7},
             {"name": "1xXL+1xS", "widths": [64, 8], "params": cfg.num_params((64, 8)),
              "val_loss": 3.5, "pareto_params": False}]
    return {"candidates": rows}


def test_registry_names_granularities_and_pareto_mixes() -> None:
    model = tiny_model(vocab_size=257)
    subs = build_registry(model, "demo", _sweep(model))
    names = [s.name for s in subs]
    assert names[:4] == ["demo-S", "demo-M", "demo-L", "demo-XL"]
    assert len(names) == 5 and names[4].startswith("demo-mix-") and names[4].endswith("K")
    assert subs[4].submodel.widths == (8, 64) and subs[4].decode_ms == 1.7
    assert subs[0].latency == {"prefill_ms": 1.0, "decode_ms": 0.5}
    bad = {"candidates": [{"name": "x", "widths": [8, 8, 8], "params": 1}]}
    with pytest.raises(ValueError, match="do not fit"):
        build_registry(model, "demo", bad)
    # A --depth sweep's rows (a layer's FFN or attention skipped) are left out: a depth-attention
    # row has XL's widths but must not lend XL its numbers.
    depth = _sweep(model)
    depth["candidates"] += [
        {"name": "XL-ffn0", "pattern": "depth-ffn", "widths": [0, 64], "params": 1,
         "val_loss": 9.0, "pareto_params": True, "decode_ms": 0.1},
        {"name": "XL-attn1", "pattern": "depth-attn", "widths": [64, 64], "heads": [2, 0],
         "params": 1, "val_loss": 9.0, "pareto_params": True, "decode_ms": 0.1}]
    assert build_registry(model, "demo", depth) == subs


# ----------------------------------------------------------------------------- the three parts
def test_text_stream_alone_holds_back_stop_prefixes_and_partial_characters() -> None:
    """The output processor on its own: text that may still become a stop string, or the
    first bytes of a multi-byte character, waits; a stop string ends the text before it."""
    tok = Tokenizer.byte_level()
    stream = TextStream(tok, max_tokens=50, stop=["END"])
    sent = []
    for t in tok.encode("ab EN"):
        out = stream.take(t)
        assert out.finish is None
        sent.append(out.text)
    assert "".join(sent) == "ab "  # "EN" may still grow into "END"
    out = stream.take(tok.encode("D")[0])
    assert (out.text, out.finish) == ("", "stop")  # nothing after "ab " is sent
    euro = TextStream(tok, max_tokens=3)
    first, second = (euro.take(b) for b in tok.encode("\u20ac")[:2])  # 3 bytes, 2 given
    assert first.text == second.text == "" and first.finish is None
    last = euro.take(tok.encode("\u20ac")[2])
    assert (last.text, last.finish) == ("\u20ac", "length")
    eos = TextStream(tok, max_tokens=9)
    assert eos.take(tok.encode("a")[0]).text == "a"
    assert (eos.take(tok.eos_id).finish, eos.tokens[-1]) == ("stop", tok.eos_id)


def test_executor_alone_runs_a_mixed_batch_as_each_row_alone() -> None:
    """The executor on its own: rows prefilled at their own submodels, then decoded together
    in one mixed-width forward, give each row's own cached logits; a moved slot goes on."""
    model = tiny_model(vocab_size=257).eval()
    ex = Executor(model, slots=3)
    subs = [model.submodel(w) for w in ("S", "XL", (8, 64))]
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    firsts = [int(ex.prefill(i, p, s).argmax())
              for i, (p, s) in enumerate(zip(prompts, subs, strict=True))]
    mixed = ex.decode(firsts, subs)
    with torch.no_grad():
        for b, (p, s) in enumerate(zip(prompts, subs, strict=True)):
            alone = model(torch.tensor([[*p, firsts[b]]]), widths=s)[0, -1]
            torch.testing.assert_close(mixed[b], alone, rtol=1e-5, atol=1e-5)
    ex.move(2, 0)  # slot 2 takes slot 0's place: it decodes on from its own history
    nxt = int(mixed[2].argmax())
    again = ex.decode([nxt], subs[2:])
    with torch.no_grad():
        alone = model(torch.tensor([[*prompts[2], firsts[2], nxt]]), widths=subs[2])[0, -1]
    torch.testing.assert_close(again[0], alone, rtol=1e-5, atol=1e-5)


def test_a_server_context_shorter_than_the_models_sizes_the_cache_and_bounds_requests(
) -> None:
    """``context`` (serve --context) sizes the slot cache below the model's context, and a
    request that would not fit it is refused before it takes a slot."""
    model = tiny_model(vocab_size=257, max_seq_len=64).eval()
    sched = _scheduler(model, max_batch=2, context=16)
    assert sched.executor.context == 16 and sched.executor.cache.keys[0].shape[2] == 16
    sub = build_registry(model, "t")[0]
    with pytest.raises(ValueError, match=r"prompt \+ max_tokens - 1 <= 16"):
        sched.submit(Request([1] * 10, 8, sub, lambda ev: None))
    sched.submit(Request([1] * 10, 7, sub, lambda ev: None))  # 10 + 7 - 1 = 16 fits


def _scheduler(model: MatFormerLM, **kw: Any) -> Scheduler:
    subs = build_registry(model, "t")
    return Scheduler(model, Tokenizer.byte_level(), policy=AutoPolicy(subs), **kw)


def test_scheduler_bounded_queue_and_cancel() -> None:
    model = tiny_model(vocab_size=257, max_seq_len=CONTEXT).eval()
    sched = _scheduler(model, max_batch=1, max_queue=1)
    sub = build_registry(model, "t")[0]
    events: list[Event] = []
    # ignore_eos: a sampled end-of-text before the third token would end the request early
    # and leave `done` unset (the seed is random per request)
    reqs = [Request([1, 2, 3], 300, sub, events.append, ignore_eos=True) for _ in range(2)]
    for r in reqs:  # one for the free slot, one waiting: the queue is full
        sched.submit(r)
    with pytest.raises(QueueFull, match="waiting"):
        sched.submit(Request([1], 5, sub, events.append))
    reqs[0].cancel()  # cancelled before it ran: never prefilled
    done = threading.Event()

    def emit(ev: Event) -> None:  # cancels itself after its third token
        events.append(ev)
        if ev.kind == "delta" and sum(e.kind == "delta" for e in events) >= 3:
            reqs[1].cancel()
            done.set()

    reqs[1].emit = emit
    sched.start()
    assert done.wait(60)
    assert sched.shutdown(60)
    assert sched.load == {"active": 0, "queued": 0}
    # both: the one dropped from the queue and the one cancelled while it ran
    assert sched.metrics.get("requests_total", outcome="cancelled", submodel=sub.name) == 2
    assert sched.metrics.get("completion_tokens_total", submodel=sub.name) < 300


def test_a_cancelled_waiting_request_leaves_the_queue_at_once() -> None:
    """A client that leaves while its request waits frees its place in the queue: it is not
    kept until a slot frees (nor counted against --queue)."""
    model = tiny_model(vocab_size=257, max_seq_len=CONTEXT).eval()
    sched = _scheduler(model, max_batch=1, max_queue=1)
    sub = build_registry(model, "t")[0]
    first, waiting, later = (Request([1, 2], 5, sub, lambda ev: None) for _ in range(3))
    sched.submit(first)
    sched.submit(waiting)
    assert sched.load["queued"] == 2  # the scheduler has not started: nothing admitted yet
    waiting.cancel()
    sched.submit(later)  # the queue had room again
    assert sched.load["queued"] == 2
    assert sched.metrics.get("requests_total", outcome="cancelled", submodel=sub.name) == 1


def _recorded(prompt: list[int], n: int, sub: Servable | None, **kw: Any
              ) -> tuple[Request, list[Event]]:
    """A request (greedy and past end-of-text unless ``kw`` says otherwise) and the list its
    events go to."""
    events: list[Event] = []
    return Request(prompt, n, sub, events.append, **{"temperature": 0, "ignore_eos": True,
                                                     **kw}), events


def _streamed_text(events: list[Event]) -> str:
    return "".join(e.text for e in events if e.kind == "delta")


def test_running_auto_requests_step_down_with_the_policy() -> None:
    """An auto request steps down mid-stream and continues from the K/V the larger submodel
    cached; a request for a named submodel never moves. Driven step by step, no thread."""
    model = tiny_model(vocab_size=257, max_seq_len=CONTEXT).eval()
    sched = _scheduler(model, max_batch=4)
    auto, got_auto = _recorded([1, 2, 3], 10, None)
    fixed, got_xl = _recorded([4, 5], 10, sched.policy.levels[-1])
    with torch.no_grad():
        sched._prefill(auto)
        sched._prefill(fixed)
        sched._decode_step()
        sched._decode_step()  # 3 tokens each, all at XL
        sched.policy.level = 0  # overloaded: the policy stepped down to S
        assert sched.step_down_auto() == 1
        while sched._rows:
            sched._decode_step()
    assert got_auto[-1].history == [("t-XL", 3), ("t-S", 7)]
    assert got_auto[-1].submodel.name == "t-S"
    assert got_xl[-1].history == [("t-XL", 10)]
    cache = KVCache.for_model(model, 1, 16)  # the reference: XL for 3 tokens, then S
    with torch.no_grad():
        toks = [int(model(torch.tensor([[1, 2, 3]]), cache=cache)[0, -1].argmax())]
        for pos in range(3, 12):
            if len(toks) == 10:
                break
            w = "XL" if len(toks) < 3 else "S"
            logits = model(torch.tensor([[toks[-1]]]), widths=w, cache=cache, start_pos=pos)
            toks.append(int(logits[0, -1].argmax()))
    assert _streamed_text(got_auto) == Tokenizer.byte_level().decode(toks)
    assert sched.metrics.get("completion_tokens_total", submodel="t-S") == 7


def test_a_row_that_fails_to_sample_ends_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sampling failure in one row of a batch answers that request with an error; the
    greedy row beside it decodes to its end, token for token as generate() alone."""
    import matformer.serve.executor as executor_module

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("sampling broke")

    model = tiny_model(vocab_size=257, max_seq_len=CONTEXT).eval()
    sched = _scheduler(model, max_batch=2)
    s = sched.policy.levels[0]
    greedy, got_greedy = _recorded([1, 2, 3], 6, s)
    sampled, got_sampled = _recorded([4, 5], 6, s, temperature=0.7)
    with torch.no_grad():
        sched._prefill(greedy)
        sched._prefill(sampled)
        monkeypatch.setattr(executor_module, "sample_next", broken)
        while sched._rows:
            sched._decode_step()
    assert got_sampled[-1].kind == "error" and "sampling broke" in got_sampled[-1].text
    assert got_greedy[-1].kind == "done" and got_greedy[-1].finish_reason == "length"
    want = generate(model, torch.tensor([[1, 2, 3]]), 6, widths=s.submodel, temperature=0)
    text = _streamed_text(got_greedy) + (got_greedy[-1].text or "")
    assert text == Tokenizer.byte_level().decode(want[0, 3:].tolist())


def test_submit_refuses_what_cannot_run() -> None:
    model = tiny_model(vocab_size=257, max_seq_len=16).eval()
    sched = _scheduler(model)
    sub = sched.policy.levels[0]
    for prompt, n in (([], 4), ([1], 0), ([1] * 10, 8)):
        with pytest.raises(ValueError, match="does not fit"):
            sched.submit(Request(prompt, n, sub, lambda ev: None))
    sched.submit(Request([1] * 10, 7, sub, lambda ev: None))  # 10 + 7 - 1 = 16 fits
    assert sched.load == {"active": 0, "queued": 1}


def test_a_failing_request_gets_an_error_and_the_scheduler_goes_on() -> None:
    model = tiny_model(vocab_size=257).eval()
    sched = _scheduler(model, max_batch=2)
    broken = Servable("broken", Submodel((999, 999), (2, 2)), 0, "granularity",
                      "?")  # widths out of range
    got: list[Event] = []
    done = threading.Event()

    def emit(ev: Event) -> None:
        got.append(ev)
        if ev.kind == "done":
            done.set()

    sched.submit(Request([1, 2], 4, broken, got.append))
    sched.submit(Request([1, 2], 4, sched.policy.levels[0], emit, temperature=0))
    sched.start()
    assert done.wait(60)
    assert sched.shutdown(60)
    assert got[0].kind == "error" and "out of range" in got[0].text
    assert got[-1].kind == "done" and got[-1].usage["completion_tokens"] == 4


# ----------------------------------------------------------------------------- HTTP server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A real uvicorn server in a thread, always shut down by ``stop()``."""

    def __init__(self, ckpt: Path, **kw: Any) -> None:
        self.server = load_server(ckpt, name="tiny", **kw)
        self.port = _free_port()
        self.uv = uvicorn_server(self.server, port=self.port)
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        for _ in range(500):  # bounded wait for the socket
            if self.uv.started or not self.thread.is_alive():
                break
            time.sleep(0.01)
        assert self.uv.started, "server did not start"
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.uv.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MatFormerLM]:
    model = tiny_model(vocab_size=257, max_seq_len=CONTEXT, seed=3).eval()
    path = tmp_path_factory.mktemp("serve") / "tiny"
    save_checkpoint(path, model, Tokenizer.byte_level())
    (path.parent / "mixnmatch.json").write_text(json.dumps(_sweep(model)))
    return path, model


@pytest.fixture(scope="module")
def server(ckpt: tuple[Path, MatFormerLM]) -> Iterator[Running]:
    running = Running(ckpt[0], sweep=ckpt[0].parent / "mixnmatch.json", max_batch=4,
                      max_queue=16)
    yield running
    running.stop()


@pytest.fixture
def client(server: Running) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


def _expected(model: MatFormerLM, prompt: str, widths: tuple[int, ...], n: int) -> str:
    tok = Tokenizer.byte_level()
    ids = tok.encode(prompt)
    out = generate(model, [ids], n, widths=widths, temperature=0)[0, len(ids):]
    return tok.decode(out.tolist())


def test_models_lists_submodels_with_params_and_latency(client: openai.OpenAI) -> None:
    models = {m.id: m.model_dump() for m in client.models.list()}
    assert list(models)[:4] == ["tiny-S", "tiny-M", "tiny-L", "tiny-XL"]
    assert "auto" in models and any(k.startswith("tiny-mix-") for k in models)
    s = models["tiny-S"]
    assert s["params"] > 0 and s["widths"] == [8, 8] and s["latency_ms"]["decode_ms"] == 0.5
    assert models["auto"]["levels"][0] == "tiny-S"


def test_completion_chat_and_stream_with_the_openai_client(
        client: openai.OpenAI, ckpt: tuple[Path, MatFormerLM]) -> None:
    model = ckpt[1]
    expected = _expected(model, "hello", (16, 16), 12)
    r = client.completions.create(model="tiny-M", prompt="hello", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.model == "tiny-M" and r.choices[0].text == expected
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (5, 12)
    assert r.model_extra["submodel"]["widths"] == [16, 16]

    chunks = list(client.completions.create(model="tiny-M", prompt="hello", max_tokens=12,
                                            temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 12

    chat = client.chat.completions.create(
        model="tiny-XL", messages=[{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Hi"}],
        max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    prompt = "System: Be brief.\nUser: Hi\nAssistant:"
    full = _expected(model, prompt, (64, 64), 6)
    assert chat.model == "tiny-XL" and chat.usage.prompt_tokens == len(prompt)
    assert chat.choices[0].message.content == full.split("\nUser:")[0].split("\nSystem:")[0]
    stream = client.chat.completions.create(
        model="tiny-XL", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
        temperature=0.7, seed=5, stream=True)
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    assert parts[-1].choices[0].finish_reason in ("stop", "length") and parts[-1].usage


def test_seeded_sampling_and_stop_strings(client: openai.OpenAI,
                                          ckpt: tuple[Path, MatFormerLM]) -> None:
    kw = dict(model="tiny-L", prompt="abc", max_tokens=20, temperature=1.0, top_p=0.9,
              extra_body={"ignore_eos": True})
    a = client.completions.create(seed=7, **kw).choices[0].text
    assert client.completions.create(seed=7, **kw).choices[0].text == a
    full = _expected(ckpt[1], "abc", (32, 32), 20)
    stop = full[5:7]
    r = client.completions.create(model="tiny-L", prompt="abc", max_tokens=20, temperature=0,
                                  stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[: full.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_auto_says_which_submodel_answered(client: openai.OpenAI) -> None:
    r = client.completions.create(model="auto", prompt="x", max_tokens=3)
    assert r.model in {"tiny-S", "tiny-M", "tiny-L", "tiny-XL"} or r.model.startswith("tiny-mix")
    assert r.model_extra["submodel"]["requested"] == "auto"
    r = client.completions.create(model="auto", prompt="x", max_tokens=3,
                                  extra_body={"latency_budget_ms": 0.6})
    assert r.model == "tiny-S"  # the only one measured at <= 0.6 ms per token


BAD = [  # (body, status, words the error message must contain, param)
    (b"{not json", 400, "malformed JSON", None),
    (b"[1, 2]", 400, "JSON object", None),
    ({"prompt": "a"}, 400, "model", "model"),
    ({"model": "tiny-S", "prompt": "a", "max_tokens": "5"}, 400, "integer", "max_tokens"),
    ({"model": "tiny-S", "prompt": 5}, 400, "prompt", "prompt"),
    ({"model": "tiny-S", "prompt": "a", "temperature": "hot"}, 400, "number", "temperature"),
    ({"model": "tiny-S", "prompt": "a", "stream": "yes"}, 400, "boolean", "stream"),
    ({"model": "nope", "prompt": "a"}, 404, "does not exist", "model"),
    ({"model": "tiny-S", "prompt": "a" * (CONTEXT + 5)}, 400, "context", "prompt"),
    ({"model": "tiny-S", "prompt": "a", "max_tokens": 0}, 400, ">= 1", "max_tokens"),
    ({"model": "tiny-S", "prompt": "a", "max_tokens": CONTEXT + 1}, 400, "too large",
     "max_tokens"),
    ({"model": "tiny-S", "prompt": "a", "seed": 2 ** 64}, 400, "seed", "seed"),
    ({"model": "tiny-S", "prompt": "a", "temperature": -0.5}, 400, "temperature",
     "temperature"),
    ({"model": "tiny-S", "prompt": "a", "top_p": 0}, 400, "top_p", "top_p"),
    ({"model": "tiny-S", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "stop"),
    ({"model": "tiny-S", "prompt": [1, 999]}, 400, "token ids", "prompt"),
    ({"model": "tiny-S", "prompt": "a", "n": 2}, 400, "n=2", "n"),
]


@pytest.mark.parametrize("body,status,words,param", BAD)
def test_bad_input_gets_an_openai_style_error(server: Running, body: Any, status: int,
                                              words: str, param: str | None) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/completions", content=content,
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words.lower() in err["message"].lower() and err["param"] == param
    assert err["type"]


def test_bad_chat_input_and_client_errors(server: Running, client: openai.OpenAI) -> None:
    for messages, words in (([], "at least one"), ([{"role": "robot", "content": "x"}], "role"),
                            ([{"role": "user"}, 3], "messages.1"),
                            ([{"role": "user", "content": [{"type": "image_url"}]}], "text")):
        r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                       json={"model": "tiny-S", "messages": messages})
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="tiny-XXL", prompt="a")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny-S", messages=[{"role": "user",
                                                                  "content": "a"}],
                                       temperature=-1)
    assert httpx.get(server.url + "/health", timeout=30).json()["status"] == "ok"  # still up


def test_concurrent_requests_for_different_sizes_are_not_mixed_up(
        server: Running, ckpt: tuple[Path, MatFormerLM]) -> None:
    model = ckpt[1]
    sizes = {"tiny-S": (8, 8), "tiny-M": (16, 16), "tiny-L": (32, 32), "tiny-XL": (64, 64)}
    jobs = [(name, f"prompt {i}: " + "xyz"[: i % 3], 6 + i % 5)
            for i, name in enumerate(list(sizes) * 3)]

    def call(job: tuple[str, str, int]) -> dict[str, Any]:
        name, prompt, n = job
        r = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"model": name, "prompt": prompt, "max_tokens": n,
                             "temperature": 0, "ignore_eos": True})
        return r.json()

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(call, jobs))
    for (name, prompt, n), res in zip(jobs, results, strict=True):
        assert res["model"] == name
        assert res["choices"][0]["text"] == _expected(model, prompt, sizes[name], n)
        assert res["usage"]["completion_tokens"] == n
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    assert "matformer_batch_size_bucket" in metrics and 'submodel="tiny-L"' in metrics


def _wait_idle(url: str) -> dict[str, Any]:
    for _ in range(1000):  # bounded: the scheduler frees slots within a step or two
        health = httpx.get(url + "/health", timeout=30).json()
        if health["active"] == 0 and health["queued"] == 0:
            return health
        time.sleep(0.01)
    raise AssertionError(f"slots not freed: {health}")


def test_client_disconnecting_mid_stream_frees_its_slot(server: Running) -> None:
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                      json={"model": "tiny-XL", "prompt": "a", "max_tokens": 400,
                            "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        assert json.loads(first[5:])["model"] == "tiny-XL"
    _wait_idle(server.url)
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    assert 'matformer_requests_total{outcome="cancelled",submodel="tiny-XL"} 1' in metrics


def test_next_event_notices_a_client_that_left() -> None:
    """Events come first while the client is there; once it has gone, None, even while the
    request keeps producing events faster than the client is checked."""
    import asyncio

    from matformer.serve import app

    class Http:  # the client is gone from the second time it is asked
        calls = 0

        async def is_disconnected(self) -> bool:
            self.calls += 1
            return self.calls >= 2

    async def run() -> list[Any]:
        events: asyncio.Queue[Event] = asyncio.Queue()
        client = app._Client(Http())  # type: ignore[arg-type]
        got = []
        for _ in range(3):
            for _ in range(5):
                events.put_nowait(Event("delta", text="x"))
            got.append(await app._next_event(events, client))
            client.checked -= app.DISCONNECT_POLL_S  # as if the poll interval had passed
        return got

    first, second, third = asyncio.run(run())
    assert first is not None and first.text == "x"
    assert second is not None  # asked once: still there
    assert third is None  # asked again: gone, though events were waiting


def test_client_leaving_a_non_streamed_request_frees_its_slot(
        ckpt: tuple[Path, MatFormerLM]) -> None:
    """Decoding slowed to 50 ms a step: 300 tokens would take 15 s, but the client leaves after
    0.5 s and the request is cancelled, its slot freed, well before."""
    running = Running(ckpt[0], max_batch=2, measure_latency=False)
    sched = running.server.scheduler
    step = sched._decode_step

    def slow_step() -> None:
        time.sleep(0.05)
        step()

    sched._decode_step = slow_step  # type: ignore[method-assign]
    try:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(running.url + "/v1/completions", timeout=0.5,
                       json={"model": "tiny-S", "prompt": "a", "max_tokens": 300,
                             "ignore_eos": True})
        _wait_idle(running.url)
        m = sched.metrics
        assert m.get("requests_total", outcome="cancelled", submodel="tiny-S") == 1
        assert m.get("completion_tokens_total", submodel="tiny-S") < 300
    finally:
        running.stop()


def test_api_key_busy_queue_and_graceful_shutdown(ckpt: tuple[Path, MatFormerLM]) -> None:
    running = Running(ckpt[0], max_batch=1, max_queue=0, api_key="sekrit",
                      measure_latency=False)
    try:
        url, auth = running.url, {"Authorization": "Bearer sekrit"}
        r = httpx.get(url + "/v1/models", timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        body = {"model": "tiny-S", "prompt": "a", "max_tokens": 300, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=auth,
                          timeout=60) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data:"))  # it holds the one slot
            busy = httpx.post(url + "/v1/completions", json={**body, "stream": False},
                              headers=auth, timeout=30)
            assert busy.status_code == 429 and busy.json()["error"]["code"] == "queue_full"
            running.uv.should_exit = True  # shut down while the stream is running
            rest = [json.loads(line[5:]) for line in lines
                    if line.startswith("data:") and line != "data: [DONE]"]
        assert rest[-1]["choices"][0]["finish_reason"] == "length"  # finished, not cut off
        assert rest[-1]["usage"]["completion_tokens"] == 300
    finally:
        running.stop()


def test_cli_refuses_an_open_host_without_a_key_and_nested_heads(
        ckpt: tuple[Path, MatFormerLM], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from matformer.cli.main import main

    assert main(["serve", str(ckpt[0]), "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().err
    assert main(["serve", str(ckpt[0]), "--max-batch", "0"]) == 2
    heads = tiny_model(vocab_size=257, n_head=4, nest_heads=True)
    save_checkpoint(tmp_path / "heads", heads, Tokenizer.byte_level())
    with pytest.raises(ValueError, match="nested attention heads"):
        load_server(tmp_path / "heads", measure_latency=False)
