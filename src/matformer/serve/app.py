"""The HTTP server: an OpenAI-compatible API over one loaded MatFormer (FastAPI + uvicorn).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed as server-sent
events with ``"stream": true``), ``GET /v1/models``, ``GET /health``, ``GET /metrics``
(Prometheus text). ``model`` names a submodel of the registry or ``auto``. With an API key,
``/v1/*`` needs ``Authorization: Bearer <key>``. See docs/serving.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ..model import MatFormerLM
from ..tokenizer import InvalidTextError, Tokenizer
from . import protocol as P
from .metrics import server_metrics
from .policy import AutoPolicy
from .registry import AUTO, Servable
from .scheduler import Event, QueueFull, Scheduler, ShuttingDown
from .scheduler import Request as GenRequest

log = logging.getLogger(__name__)

#: Default max_tokens of /v1/completions when the request gives none (as OpenAI's).
DEFAULT_COMPLETION_TOKENS = 16


class Server:
    """What the app serves: the model, its submodels, the scheduler and the auto policy.

    Args:
        model, tokenizer: The one loaded model and its tokenizer.
        submodels: The named submodels (:func:`~matformer.serve.registry.build_registry`).
        max_batch: Rows decoded together.
        max_queue: Requests waiting beyond the free slots before 429.
        latency_target_ms: Per-token latency ``auto`` keeps (None: follow the queue only).
        api_key: Required as a bearer token on ``/v1/*`` when set.
        context: Positions a request may use, prompt and completion (None: the model's
            context); the KV cache holds ``max_batch x context`` of them.
    """

    def __init__(self, model: MatFormerLM, tokenizer: Tokenizer, submodels: Sequence[Servable],
                 *, max_batch: int = 8, max_queue: int = 64,
                 latency_target_ms: float | None = None, api_key: str | None = None,
                 context: int | None = None) -> None:
        if not submodels:
            raise ValueError("no submodels to serve")
        self.model, self.tokenizer, self.api_key = model, tokenizer, api_key
        self.submodels = {s.name: s for s in submodels}
        levels = sorted(submodels, key=lambda s: s.params)
        self.policy = AutoPolicy(levels, latency_target_ms, queue_high=max(1, max_batch // 2))
        self.metrics = server_metrics()
        self.scheduler = Scheduler(model, tokenizer, policy=self.policy, max_batch=max_batch,
                                   max_queue=max_queue, metrics=self.metrics, context=context)

    def lookup(self, name: str) -> Servable | None:
        """The submodel called ``name``; None for ``auto``; 404 for an unknown name."""
        if name == AUTO:
            return None
        if name not in self.submodels:
            raise P.APIError(404, f"model {name!r} does not exist; available: "
                             f"{[*self.submodels, AUTO]}", "model", "model_not_found")
        return self.submodels[name]

    def models(self) -> list[dict[str, Any]]:
        auto = {"id": AUTO, "object": "model", "created": 0, "owned_by": "matformer",
                "kind": "auto", "description": "picks a submodel from the load (smaller under "
                "load); extension field latency_budget_ms caps its per-token latency",
                "levels": [s.name for s in self.policy.levels],
                "latency_target_ms": self.policy.target_ms, "current": self.policy.current.name}
        return [s.card() for s in self.submodels.values()] + [auto]


def _error(e: P.APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|[a-z]+-[a-z-]+.*)$")


def _param(loc: Sequence[Any]) -> str | None:
    """The field a validation error is about, without "body" or pydantic's union-member tags."""
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(p for p in parts if not _TYPE_TAG.match(p)) or None


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors() or [{"msg": "invalid request", "loc": (), "type": "invalid"}]
    err = errors[0]
    if err.get("type") == "json_invalid":
        return _error(P.APIError(400, f"malformed JSON in the request body: {err.get('msg')}",
                                 code="invalid_json"))
    param = _param(err.get("loc", ()))
    if param is None:
        return _error(P.APIError(400, "the request body must be a JSON object "
                                 f"({err.get('msg')})", code=err.get("type")))
    # a union (prompt: string or token ids) fails once per member: say all of them
    msgs = list(dict.fromkeys(e["msg"] for e in errors if _param(e.get("loc", ())) == param))
    return _error(P.APIError(400, f"{param}: {'; or '.join(msgs)} (got {err.get('input')!r:.80})",
                             param, err.get("type")))


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the scheduler; on shutdown let it finish every running and waiting request."""
    server: Server = app.state.server
    server.scheduler.start()
    yield
    log.info("shutting down: finishing %s", server.scheduler.load)
    await asyncio.to_thread(server.scheduler.shutdown)


def _add_error_handlers(app: FastAPI) -> None:
    """Answer every error, expected or not, with an OpenAI-style JSON error body."""

    @app.exception_handler(P.APIError)
    async def api_error(request: Request, exc: P.APIError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(P.APIError(500, f"internal error: {exc}", type_="server_error"))


def _bearer_auth(server: Server) -> Callable[[Request], None]:
    """The dependency of ``/v1/*``: with an API key, a request must carry it as a bearer token."""

    def auth(request: Request) -> None:
        if server.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {server.api_key}".encode()):
            raise P.APIError(401, "missing or incorrect API key (Authorization: Bearer ...)",
                             code="invalid_api_key")

    return auth


def _completion_ids(server: Server, prompt: str | list[int] | list[str]) -> list[int]:
    """The token ids of a ``/v1/completions`` prompt: a string, a list of exactly one string,
    or token ids (checked against the vocabulary)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise P.APIError(400, "prompt: one prompt per request (a list of strings must "
                             "hold exactly one)", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, list):
        vocab = server.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise P.APIError(400, f"prompt: token ids must be in 0..{vocab - 1}", "prompt")
        return list(prompt)
    return _encode(server, prompt, "prompt")


def _encode(server: Server, text: str, param: str) -> list[int]:
    """Token ids of request text; 400 naming ``param`` when the text is not valid Unicode."""
    try:
        return server.tokenizer.encode(text)
    except InvalidTextError as e:
        raise P.APIError(400, f"{param}: {e}", param) from e


def create_app(server: Server) -> FastAPI:
    """The FastAPI application; its lifespan starts the scheduler and, on shutdown, lets it
    finish every running and waiting request before the thread stops."""
    app = FastAPI(title="matformer", lifespan=_lifespan)
    app.state.server = server
    _add_error_handlers(app)
    auth = _bearer_auth(server)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **server.scheduler.stats()}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.metrics.render(),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": server.models()}

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: P.CompletionRequest, http: Request) -> Any:
        return await _generate(server, http, body, _completion_ids(server, body.prompt),
                               chat=False, max_tokens=body.max_tokens,
                               default=DEFAULT_COMPLETION_TOKENS)

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat(body: P.ChatRequest, http: Request) -> Any:
        prompt, stops = P.chat_prompt(body.messages, server.tokenizer)
        mt, param = ((body.max_completion_tokens, "max_completion_tokens")
                     if body.max_completion_tokens is not None else (body.max_tokens, "max_tokens"))
        ids = _encode(server, prompt, "messages")
        return await _generate(server, http, body, ids, chat=True, max_tokens=mt, default=None,
                               param=param, chat_stops=stops)

    return app


#: The status logged for a request whose client went away (nginx's convention; never sent).
CLIENT_CLOSED = 499
#: How often a request waiting for tokens checks whether its client is still there (s).
DISCONNECT_POLL_S = 0.25


class _Client:
    """Whether the HTTP client of a request is still there, asked at most every
    :data:`DISCONNECT_POLL_S` seconds."""

    def __init__(self, http: Request) -> None:
        self.http, self.checked = http, time.monotonic()

    async def gone(self) -> bool:
        now = time.monotonic()
        if now - self.checked < DISCONNECT_POLL_S:
            return False
        self.checked = now
        return await self.http.is_disconnected()


async def _next_event(events: asyncio.Queue[Event], client: _Client) -> Event | None:
    """The next event of a request, or None once its client has disconnected (a client that
    leaves a request that is queued or not streamed is otherwise only noticed when the
    answer is written, after decoding every token it asked for)."""
    if await client.gone():
        return None
    if not events.empty():  # the common case while tokens stream in: no task, no timer
        return events.get_nowait()
    get = asyncio.ensure_future(events.get())
    try:
        while True:
            done, _ = await asyncio.wait({get}, timeout=DISCONNECT_POLL_S)
            if done:
                return get.result()
            if await client.gone():
                return None
    finally:
        get.cancel()


async def _generate(server: Server, http: Request, body: P._Common, ids: list[int], *,
                    chat: bool, max_tokens: int | None, default: int | None,
                    param: str = "max_tokens", chat_stops: Sequence[str] = ()) -> Any:
    """Validate, queue the request, and answer it whole or as a stream; a client that
    disconnects cancels its request (freeing its place in the queue or its batch slot)."""
    sub = server.lookup(body.model)
    stops = P.check_sampling(body) + list(chat_stops)
    if not ids:  # an empty prompt starts from a document boundary
        ids = [server.tokenizer.eos_id]
    n = P.check_length(len(ids), max_tokens, server.scheduler.executor.context, default, param)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def emit(ev: Event) -> None:  # called from the scheduler thread
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            loop.call_soon_threadsafe(events.put_nowait, ev)

    req = GenRequest(ids, n, sub, emit, temperature=body.temperature,
                     top_p=body.top_p if body.top_p < 1 else None, seed=body.seed, stop=stops,
                     ignore_eos=body.ignore_eos, latency_budget_ms=body.latency_budget_ms)
    try:
        server.scheduler.submit(req)
    except QueueFull as e:
        raise P.APIError(429, str(e), code="queue_full", type_="rate_limit_error") from e
    except ShuttingDown as e:
        raise P.APIError(503, str(e), code="shutting_down", type_="server_error") from e
    rid = P.new_id("chatcmpl" if chat else "cmpl")
    client = _Client(http)
    try:
        start = await _next_event(events, client)
    except BaseException:
        req.cancel()
        raise
    if start is None:  # the client left while the request waited for a slot
        req.cancel()
        return Response(status_code=CLIENT_CLOSED)
    if start.kind == "error":
        raise P.APIError(500, start.text, type_="server_error")
    answered = start.submodel
    if body.stream:
        return StreamingResponse(_stream(req, events, rid, chat, answered, body),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    parts: list[str] = []
    try:
        while (ev := await _next_event(events, client)) is not None and ev.kind == "delta":
            parts.append(ev.text)
    except BaseException:
        req.cancel()
        raise
    if ev is None:  # the client left: stop decoding for it
        req.cancel()
        return Response(status_code=CLIENT_CLOSED)
    if ev.kind == "error":
        raise P.APIError(500, ev.text, type_="server_error")
    return P.completion_body(rid, chat, ev.submodel, body.model, "".join(parts),
                             ev.finish_reason, ev.usage, ev.history)


async def _stream(req: GenRequest, events: asyncio.Queue[Event], rid: str, chat: bool,
                  sub: Servable, body: P._Common) -> AsyncIterator[str]:
    """Server-sent events; a client that goes away cancels this generator, which frees the
    request's slot."""
    finished = False

    def sse(data: dict[str, Any]) -> str:
        return f"data: {json.dumps(data)}\n\n"

    try:
        if chat:
            yield sse(P.chunk_body(rid, chat, sub, body.model, "", first=True))
        while True:
            ev = await events.get()
            if ev.kind == "delta":
                yield sse(P.chunk_body(rid, chat, sub, body.model, ev.text))
            elif ev.kind == "done":
                yield sse(P.chunk_body(rid, chat, ev.submodel, body.model,
                                       None if chat else "", ev.finish_reason, ev.usage,
                                       history=ev.history))
                break
            else:
                yield sse(P.APIError(500, ev.text, type_="server_error").body())
                break
        finished = True
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            req.cancel()
