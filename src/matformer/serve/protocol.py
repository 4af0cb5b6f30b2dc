"""The OpenAI-compatible wire format: request schemas, the chat template, errors, responses.

Requests are validated strictly (a string where a number belongs is an error, not a guess);
every failure becomes an OpenAI-style JSON error ``{"error": {"message", "type", "param",
"code"}}`` that names the field.

Chat template: a model that brought its own (an imported instruct model) is prompted with it,
rendered as transformers renders it, and generation stops at its end-of-turn token. Otherwise
(our models are base models, trained on plain text) the plain template: every message becomes a
line ``"<Role>: <content>\\n"`` (``System``, ``User``, ``Assistant``; ``developer`` counts as
System), the prompt ends with ``"Assistant:"``, and generation stops at ``"\\nUser:"`` or
``"\\nSystem:"`` besides the request's own stop strings.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..tokenizer import Tokenizer
from .registry import Servable
from .scheduler import token_room

ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOPS = ("\nUser:", "\nSystem:")
MAX_STOPS = 4


class APIError(Exception):
    """An error answered to the client: HTTP status, message, offending field, code."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type_)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class _Common(BaseModel):
    """Fields shared by both endpoints (unknown OpenAI fields are accepted and ignored)."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    #: Extension: ``auto`` only: the per-token latency (ms) the chosen submodel must meet.
    latency_budget_ms: float | None = None
    #: Extension: keep generating past end-of-text (load tests).
    ignore_eos: bool = False


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] = Field(
        description="a string, a list of token ids, or a list holding one string")


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


def _messages(messages: list[ChatMessage]) -> list[tuple[str, str]]:
    """(role, text) of every message, checked: a known role, text content only."""
    if not messages:
        raise APIError(400, "messages must hold at least one message", "messages")
    out = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise APIError(400, f"messages[{i}].role={m.role!r}: use one of {sorted(ROLES)}",
                           f"messages[{i}].role")
        content = m.content or ""
        if isinstance(content, list):  # content parts: only text can be served
            if any(p.get("type") != "text" or not isinstance(p.get("text"), str)
                   for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts "
                               "({'type': 'text', 'text': ...}) are supported",
                               f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        out.append((m.role, content))
    return out


def chat_prompt(messages: list[ChatMessage], tokenizer: Tokenizer) -> tuple[str, list[str]]:
    """The prompt for ``messages`` and the stop strings it adds: the tokenizer's own chat
    template when it has one (it ends turns with a token, so no strings), else the plain
    template (see the module docstring)."""
    turns = _messages(messages)
    if tokenizer.chat_template is not None:
        try:
            return tokenizer.render_chat([{"role": r, "content": c} for r, c in turns]), []
        except ValueError as e:  # the template refused these messages (e.g. role order)
            raise APIError(400, f"messages: {e}", "messages") from e
    lines = [f"{ROLES[r]}: {c}\n" for r, c in turns]
    return "".join(lines) + "Assistant:", list(CHAT_STOPS)


#: OpenAI fields this server does not implement, with the value that asks for nothing: any
#: other value is refused with a 400 naming the field, rather than ignored.
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
               "best_of": (None, 1), "logit_bias": (None, {}), "suffix": (None, ""),
               "presence_penalty": (None, 0), "frequency_penalty": (None, 0)}


def check_sampling(req: _Common) -> list[str]:
    """Validate the shared fields' ranges; return the stop strings as a list."""
    for name, value in (req.model_extra or {}).items():
        if name in UNSUPPORTED and not any(
                value is ok or (value == ok and isinstance(value, bool) == isinstance(ok, bool))
                for ok in UNSUPPORTED[name]):
            raise APIError(400, f"{name}={value!r} is not supported by this server (it would "
                           "be ignored); drop the field", name)
    if req.n != 1:
        raise APIError(400, f"n={req.n}: only n=1 is supported", "n")
    if not 0 <= req.temperature <= 2:
        raise APIError(400, f"temperature={req.temperature} must be between 0 and 2",
                       "temperature")
    if not 0 < req.top_p <= 1:
        raise APIError(400, f"top_p={req.top_p} must be in (0, 1]", "top_p")
    if req.seed is not None and not 0 <= req.seed < 2 ** 63:
        raise APIError(400, f"seed={req.seed} must be in [0, 2^63)", "seed")
    if req.latency_budget_ms is not None and not req.latency_budget_ms > 0:
        raise APIError(400, f"latency_budget_ms={req.latency_budget_ms} must be > 0",
                       "latency_budget_ms")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise APIError(400, f"stop: up to {MAX_STOPS} non-empty strings", "stop")
    return stops


def check_length(n_prompt: int, max_tokens: int | None, context: int, default: int | None,
                 param: str = "max_tokens") -> int:
    """The number of tokens to generate (at most :func:`~.scheduler.token_room`); 400 when the
    prompt or the request does not fit."""
    room = token_room(n_prompt, context)
    if room < 1:
        raise APIError(400, f"the prompt is {n_prompt} tokens; the model's context is {context} "
                       "tokens, which leaves no room to generate", "prompt",
                       "context_length_exceeded")
    if max_tokens is None:
        return room if default is None else min(default, room)
    if max_tokens < 1:
        raise APIError(400, f"{param}={max_tokens} must be >= 1", param)
    if max_tokens > room:
        raise APIError(400, f"{param}={max_tokens} is too large: the prompt is {n_prompt} tokens "
                       f"and the context is {context}, so at most {room} can be generated",
                       param, "context_length_exceeded")
    return max_tokens


# ----------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def submodel_info(sub: Servable, requested: str,
                  history: list[tuple[str, int]] | None = None) -> dict[str, Any]:
    """Which submodel answered (an extension field in every response); the final response
    adds ``history``, the submodels in order with the tokens each generated (an ``auto``
    request may step down while it runs)."""
    info = {"name": sub.name, "requested": requested, "widths": list(sub.submodel.widths),
            "params": sub.params}
    if history is not None:
        info["history"] = [{"name": name, "tokens": n} for name, n in history]
    return info


def completion_body(rid: str, chat: bool, sub: Servable, requested: str, text: str,
                    finish: str | None, usage: dict[str, int] | None,
                    history: list[tuple[str, int]] | None = None) -> dict[str, Any]:
    """A whole (non-streamed) response."""
    choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": text},
                               "finish_reason": finish, "logprobs": None} if chat else
                              {"index": 0, "text": text, "finish_reason": finish,
                               "logprobs": None})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": sub.name, "choices": [choice],
            "usage": usage, "submodel": submodel_info(sub, requested, history)}


def chunk_body(rid: str, chat: bool, sub: Servable, requested: str, text: str | None,
               finish: str | None = None, usage: dict[str, int] | None = None,
               first: bool = False, history: list[tuple[str, int]] | None = None
               ) -> dict[str, Any]:
    """One server-sent event of a streamed response; the last one carries ``usage``."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish,
                                  "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
    body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": sub.name, "choices": [choice],
            "submodel": submodel_info(sub, requested, history)}
    if usage is not None:
        body["usage"] = usage
    return body

