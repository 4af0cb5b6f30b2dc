"""llama.cpp's pre-tokenizer types and the Hugging Face pre-tokenizers that split text alike.

A byte-level BPE tokenizer first cuts text into pieces (the pre-tokenizer), then merges bytes
inside each piece. Two tokenizers with the same vocabulary and merges agree only when they cut
alike. A GGUF file names its cut by a type (``tokenizer.ggml.pre``) that llama.cpp maps to a
list of regular expressions; a ``tokenizer.json`` spells it as a pre-tokenizer tree. This module
maps the types we can express both ways:

- ``gpt-2``: GPT-2's regex (``ByteLevel(use_regex=True)``), also with our bounded pre-token
  length (:mod:`matformer.tokenizer`; the same pieces for every pre-token shorter than 256
  characters);
- ``smollm``: every digit a piece of its own, then GPT-2's regex
  (``Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)]``), the SmolLM and
  StarCoder tokenizers.

Anything else is refused by name rather than exported or imported with a cut that differs.
"""

from __future__ import annotations

from typing import Any

from tokenizers import pre_tokenizers

from ..tokenizer import MAX_PRETOKEN_CHARS, _capped_gpt2_regex

#: llama.cpp pre-tokenizer types this module maps.
SUPPORTED = ("gpt-2", "smollm")


class PreTokenizerError(ValueError):
    """A pre-tokenizer with no known exact counterpart on the other side."""


def hf_pretokenizer(pre: str, *, where: str = "") -> Any:
    """The ``tokenizers`` pre-tokenizer that cuts text as llama.cpp's type ``pre`` does."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "gpt-2":
        return byte_level
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        byte_level])
    raise PreTokenizerError(f"{where + ': ' if where else ''}llama.cpp pre-tokenizer {pre!r} "
                            f"has no exact Hugging Face counterpart here (known: {SUPPORTED})")


def _is_gpt2_byte_level(node: dict[str, Any]) -> bool:
    return node.get("type") == "ByteLevel" and bool(node.get("use_regex", True)) \
        and not node.get("add_prefix_space", False)


def _is_capped_gpt2(nodes: list[dict[str, Any]]) -> bool:
    """Our trained BPE's cut: the bounded GPT-2 regex split, then a byte map."""
    if len(nodes) != 2:
        return False
    split, byte_level = nodes
    pattern = (split.get("pattern") or {}).get("Regex")
    return (split.get("type") == "Split" and pattern == _capped_gpt2_regex(MAX_PRETOKEN_CHARS)
            and byte_level.get("type") == "ByteLevel"
            and not byte_level.get("use_regex", True)
            and not byte_level.get("add_prefix_space", False))


def bounded_pretokens(spec: dict[str, Any]) -> bool:
    """Whether a ``tokenizer.json`` (parsed) is our trained BPE's, which cuts runs at
    :data:`~matformer.tokenizer.MAX_PRETOKEN_CHARS` characters where llama.cpp does not."""
    node = spec.get("pre_tokenizer") or {}
    return node.get("type") == "Sequence" and _is_capped_gpt2(node.get("pretokenizers", []))


def llamacpp_pre(spec: dict[str, Any]) -> str:
    """llama.cpp's pre-tokenizer type for a ``tokenizer.json`` (parsed), or
    PreTokenizerError naming the pre-tokenizer that has none."""
    node = spec.get("pre_tokenizer") or {}
    if _is_gpt2_byte_level(node):
        return "gpt-2"
    nodes = node.get("pretokenizers", []) if node.get("type") == "Sequence" else []
    if _is_capped_gpt2(nodes):
        return "gpt-2"
    if (len(nodes) == 2 and nodes[0].get("type") == "Digits"
            and nodes[0].get("individual_digits") and _is_gpt2_byte_level(nodes[1])):
        return "smollm"
    shown = node.get("type", "none") if not nodes else \
        "Sequence[" + ", ".join(n.get("type", "?") for n in nodes) + "]"
    raise PreTokenizerError(f"the tokenizer's pre-tokenizer {shown} matches none of llama.cpp's "
                            f"types that we map ({SUPPORTED}); llama.cpp would cut text "
                            "differently, so the file is not written")
