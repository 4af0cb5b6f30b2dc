"""Chat templates and the end-of-turn token of an imported tokenizer, as transformers keeps and
renders them: read from ``chat_template.jinja`` or ``tokenizer_config.json`` beside
``tokenizer.json``, rendered with Jinja in a sandbox. :class:`matformer.tokenizer.Tokenizer`
carries them; this module knows files and templates only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CONFIG_FILE = "tokenizer_config.json"
"""Beside ``tokenizer.json``: the chat template and end-of-turn token (transformers' keys)."""

CHAT_TEMPLATE_FILE = "chat_template.jinja"
"""Where transformers 5 keeps a chat template; read when present, never written by us."""


def render(template: str, messages: Sequence[Mapping[str, Any]], *, eos_token: str,
           add_generation_prompt: bool = True) -> str:
    """The prompt ``template`` makes of ``messages``, rendered as transformers renders it: a
    sandboxed Jinja environment with ``trim_blocks`` and ``lstrip_blocks``,
    ``raise_exception`` and the ``tojson`` filter.

    Raises:
        ValueError: When the template raises or fails to render (its message is kept).
    """
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False,
                                                              indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
            eos_token=eos_token, bos_token="")
    except TemplateError as e:
        raise ValueError(f"the chat template failed: {e}") from e


def _token_content(value: Any) -> str | None:
    """A special token as transformers' configs spell it: a string or ``{"content": ...}``."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def read_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The chat template and end token of the tokenizer in ``folder``, from transformers'
    files: ``chat_template.jinja`` (transformers 5), else ``tokenizer_config.json``'s
    ``chat_template`` (a string, or a list of named templates: the one named ``default``), and
    its ``eos_token``. Keyword arguments for :class:`Tokenizer`; empty when neither file is
    there.

    Raises:
        ValueError: A file is there but cannot be read as what it should be.
    """
    folder = Path(folder)
    out: dict[str, Any] = {}
    cfg_file = folder / CONFIG_FILE
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {cfg_file}: {e}") from e
        if not isinstance(cfg, dict):
            raise ValueError(f"{cfg_file} is not a JSON object")
        template = cfg.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str) and template:
            out["chat_template"] = template
        eos = _token_content(cfg.get("eos_token"))
        if eos is not None:
            out["eos_token"] = eos
    jinja = folder / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        try:
            out["chat_template"] = jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read {jinja}: {e}") from e
    return out
