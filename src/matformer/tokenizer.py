"""Byte-level BPE tokenizers stored as a single Hugging Face ``tokenizer.json`` file.

Two kinds of tokenizer share one class and one on-disk format:

* :meth:`Tokenizer.byte_level` -- 256 byte tokens (id ``b`` is byte ``b``) plus ``<|endoftext|>``
  (id 256). Needs no training.
* :meth:`Tokenizer.train_bpe` -- a byte-level BPE trained on a corpus with ``tokenizers``.

Both use the GPT-2 style ByteLevel pre-tokenizer and decoder with no normaliser, so
``decode(encode(text)) == text`` for every string. The saved ``tokenizer.json`` can be loaded
by ``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``.

A trained BPE caps pre-tokens at :data:`MAX_PRETOKEN_CHARS` characters: it splits text with
GPT-2's pre-tokenizer regex, every ``+`` bounded, in a ``Split`` step followed by a
``ByteLevel`` step that only maps bytes (both stored in ``tokenizer.json``, so training and
encoding agree). Without the cap a long stretch of text with no whitespace (CJK prose, base64,
a minified file) is one pre-token and BPE training slows down quadratically with its length.
Pre-tokens shorter than the cap -- all of ordinary text -- are exactly GPT-2's, so their tokens
are unchanged. Tokenizers saved before the cap (plain ``ByteLevel`` pre-tokenizer) load and
encode exactly as before.

An imported model keeps its own tokenizer (any ``tokenizer.json``, its pre-tokenizer as it is)
and, beside it in ``tokenizer_config.json`` (the file transformers reads), its chat template and
its end-of-turn token: :meth:`Tokenizer.render_chat` renders the template as transformers does
(Jinja in a sandbox), and :attr:`Tokenizer.stop_ids` holds every id that ends a generation.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from .chat_template import read_config, render
from .outputs import write_text_atomic

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
"""The end-of-text special token, appended after every document."""


MIN_BPE_VOCAB_SIZE = 257
"""Smallest BPE vocabulary: 256 byte tokens plus ``<|endoftext|>``."""

MAX_PRETOKEN_CHARS = 256
"""Longest pre-token (in characters) of a trained BPE; longer runs are cut into pieces.

Keeps BPE training near-linear in the corpus size on text without whitespace, and bounds the
longest possible BPE token (at most 4 bytes per character)."""

PROGRESS_MIN_CHARS = 1_000_000
"""Corpora at least this large (characters) show the trainer's progress bar by default."""

_GPT2_PATTERN = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{{L}}{{1,{run}}}| ?\p{{N}}{{1,{run}}}"
    r"| ?[^\s\p{{L}}\p{{N}}]{{1,{run}}}|\s{{1,{ws}}}(?!\S)|\s{{1,{ws}}}"
)
"""GPT-2's pre-tokenizer regex (as in ``ByteLevel(use_regex=True)``) with bounded repeats."""


def _capped_gpt2_regex(max_chars: int) -> str:
    """GPT-2's pre-tokenizer regex with every run limited so no match exceeds ``max_chars``.

    Matches shorter than ``max_chars`` are the same as the unbounded regex's, as are the
    pieces a text is split into when none of its pieces reaches the cap.

    Args:
        max_chars: The longest match, in characters.

    Returns:
        The regex, for a ``tokenizers`` ``Split`` pre-tokenizer.

    Raises:
        ValueError: If ``max_chars`` is below 4.
    """
    if max_chars < 4:  # the longest contraction, "'re", plus room for " x"
        raise ValueError(f"max_chars must be >= 4, got {max_chars}")
    return _GPT2_PATTERN.format(run=max_chars - 1, ws=max_chars)


def _bytes_to_unicode() -> dict[int, str]:
    """Return GPT-2's reversible map from byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _configure_byte_level(tok: HFTokenizer, max_pretoken_chars: int | None = None) -> None:
    """Attach the ByteLevel pre-tokenizer and decoder (no normaliser, no prefix space).

    Args:
        tok: The tokenizer to configure in place.
        max_pretoken_chars: ``None``: plain ``ByteLevel(use_regex=True)``. Otherwise split with
            :func:`_capped_gpt2_regex` first, then ``ByteLevel(use_regex=False)`` (which only
            maps bytes to characters), so no pre-token is longer than this many characters.
            Splitting happens between characters, and the decoder is unchanged, so
            ``decode(encode(text)) == text`` still holds.
    """
    tok.normalizer = None
    if max_pretoken_chars is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        split = pre_tokenizers.Split(
            Regex(_capped_gpt2_regex(max_pretoken_chars)), behavior="isolated", invert=False
        )
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    tok.decoder = decoders.ByteLevel()


class Tokenizer:
    """A byte-level BPE tokenizer with an end-of-text token, and optionally a chat template.

    Args:
        hf_tokenizer: The wrapped ``tokenizers.Tokenizer``. Its vocabulary must contain
            ``<|endoftext|>`` or ``eos_token``.
        chat_template: A Jinja chat template (transformers' format), or None.
        eos_token: The model's own end token when it is not ``<|endoftext|>`` (an instruct
            model's end of turn, e.g. ``<|im_end|>``); generation stops at it too.

    Raises:
        ValueError: If neither ``<|endoftext|>`` nor ``eos_token`` is in the vocabulary.
    """

    def __init__(self, hf_tokenizer: HFTokenizer, *, chat_template: str | None = None,
                 eos_token: str | None = None) -> None:
        eos = hf_tokenizer.token_to_id(EOS_TOKEN)
        own = None if eos_token is None else hf_tokenizer.token_to_id(eos_token)
        if eos_token is not None and own is None:
            raise ValueError(f"eos_token {eos_token!r} is not in the tokenizer's vocabulary")
        if eos is None and own is None:
            raise ValueError(f"tokenizer has no {EOS_TOKEN!r} token; it is required as EOS")
        if chat_template is not None and not isinstance(chat_template, str):
            raise ValueError(f"chat_template must be a string, got {type(chat_template).__name__}")
        self._tok = hf_tokenizer
        self._eos_id: int = eos if eos is not None else own  # type: ignore[assignment]
        self._eos_token = eos_token if eos_token != EOS_TOKEN else None
        self._stop_ids = frozenset(i for i in (eos, own) if i is not None)
        self._chat_template = chat_template or None

    # ----------------------------------------------------------------------------- builders
    @classmethod
    def byte_level(cls) -> Tokenizer:
        """Build the untrained byte-level tokenizer: 256 byte tokens plus ``<|endoftext|>``.

        Token id ``b`` (0 <= b < 256) is the single byte ``b``; ``<|endoftext|>`` is id 256.

        Returns:
            The tokenizer (vocabulary size 257).
        """
        vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        _configure_byte_level(tok)
        tok.add_special_tokens([EOS_TOKEN])
        return cls(tok)

    @classmethod
    def train_bpe(
        cls, texts: Iterable[str], vocab_size: int, *, show_progress: bool | None = None
    ) -> Tokenizer:
        """Train a byte-level BPE tokenizer on ``texts``.

        Pre-tokens are capped at :data:`MAX_PRETOKEN_CHARS` characters (module docstring),
        so training time grows about linearly with the corpus even without whitespace.

        Args:
            texts: Training documents.
            vocab_size: Target vocabulary size, including the 256 byte tokens and
                ``<|endoftext|>``; at least 257. A tiny corpus may yield fewer merges, so the
                final :attr:`vocab_size` can be smaller.
            show_progress: Show the ``tokenizers`` progress bars (drawn on stderr when it is a
                terminal; the trainer also prints a blank line to stdout after each stage).
                ``None`` (default): show them when stderr is a terminal and ``texts`` is a
                sequence of at least :data:`PROGRESS_MIN_CHARS` characters or of unknown size.

        Returns:
            The trained tokenizer.

        Raises:
            ValueError: If ``vocab_size`` is not an int >= 257.
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise ValueError(
                f"vocab_size must be an int >= {MIN_BPE_VOCAB_SIZE}, got {vocab_size!r}"
            )
        if vocab_size < MIN_BPE_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size must be >= {MIN_BPE_VOCAB_SIZE} (256 bytes + {EOS_TOKEN}), "
                f"got {vocab_size}"
            )
        length: int | None = None
        chars: int | None = None
        if isinstance(texts, Sequence):
            length = len(texts)
            chars = sum(len(t) for t in texts if isinstance(t, str))
        if show_progress is None:
            large = chars is None or chars >= PROGRESS_MIN_CHARS
            show_progress = large and sys.stderr is not None and sys.stderr.isatty()
        size = "unknown size" if chars is None else f"{chars / 1e6:.1f}M characters"
        logger.info("training byte-level BPE (%d tokens) on %s", vocab_size, size)
        start = time.perf_counter()
        tok = HFTokenizer(models.BPE())
        _configure_byte_level(tok, MAX_PRETOKEN_CHARS)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            show_progress=bool(show_progress),
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(texts, trainer=trainer, length=length)
        result = cls(tok)
        logger.info(
            "trained byte-level BPE: %d tokens (asked %d) in %.1fs",
            result.vocab_size, vocab_size, time.perf_counter() - start,
        )
        return result

    # ----------------------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        """Id of ``<|endoftext|>`` (the document separator), else of the model's ``eos_token``."""
        return self._eos_id

    @property
    def stop_ids(self) -> frozenset[int]:
        """Every id that ends a generation: :attr:`eos_id` and the model's own end token."""
        return self._stop_ids

    @property
    def eos_token(self) -> str | None:
        """The model's own end token when it differs from ``<|endoftext|>``."""
        return self._eos_token

    @property
    def chat_template(self) -> str | None:
        """The model's Jinja chat template, or None (then callers use a plain one)."""
        return self._chat_template

    def render_chat(self, messages: Sequence[Mapping[str, Any]], *,
                    add_generation_prompt: bool = True) -> str:
        """The prompt the chat template makes of ``messages`` (``{"role", "content"}``
        mappings), rendered as transformers renders it: a sandboxed Jinja environment with
        ``trim_blocks`` and ``lstrip_blocks``, ``raise_exception`` and the ``tojson`` filter.

        Raises:
            ValueError: Without a template, or when the template raises or fails to render
                (its message is kept).
        """
        if self._chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        return render(self._chat_template, messages, eos_token=self._eos_token or EOS_TOKEN,
                      add_generation_prompt=add_generation_prompt)

    @property
    def backend(self) -> HFTokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    # ----------------------------------------------------------------------------- coding
    def encode(self, text: str) -> list[int]:
        """Encode one string to token ids (no EOS is appended).

        Args:
            text: Any string.

        Returns:
            The token ids.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        check_text(text)
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many strings in parallel (Rust threads) to token ids.

        Args:
            texts: Strings to encode.

        Returns:
            One list of token ids per input string.
        """
        texts = list(texts)
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"encode_batch expects strings, got a {type(bad).__name__}")
        for t in texts:
            check_text(t)
        fast = getattr(self._tok, "encode_batch_fast", None)  # skips offsets; tokenizers >= 0.20
        encode = fast if fast is not None else self._tok.encode_batch
        return [enc.ids for enc in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Decode token ids back to text.

        Args:
            ids: Token ids.
            skip_special_tokens: Drop ``<|endoftext|>`` instead of rendering it.

        Returns:
            The decoded text; ``decode(encode(text)) == text`` exactly.
        """
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ----------------------------------------------------------------------------- I/O
    def to_json(self) -> str:
        """Serialise to the ``tokenizer.json`` string (stable; usable as a cache key)."""
        return self._tok.to_str()

    @property
    def config(self) -> dict[str, Any]:
        """What :data:`CONFIG_FILE` holds: the chat template and the model's own end token
        (empty for a tokenizer that has neither)."""
        out: dict[str, Any] = {}
        if self._chat_template is not None:
            out["chat_template"] = self._chat_template
        if self._eos_token is not None:
            out["eos_token"] = self._eos_token
        return out

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tokenizer as a ``tokenizer.json`` file at ``path`` (parents created).
        The chat template and end token are written apart (:meth:`save_config`).

        Args:
            path: Destination file.
        """
        write_text_atomic(path, self.to_json())

    def save_config(self, path: str | os.PathLike[str]) -> None:
        """Write :attr:`config` as a ``tokenizer_config.json`` file at ``path``."""
        write_text_atomic(path, json.dumps(self.config, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a tokenizer saved by :meth:`save` (or any compatible ``tokenizer.json``).

        Args:
            path: A ``tokenizer.json`` file.

        Returns:
            The tokenizer.

        Raises:
            FileNotFoundError: If ``path`` does not exist or is not a file.
            ValueError: If the file is not a valid tokenizer.json or lacks ``<|endoftext|>``.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {str(path)!r}")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as exc:
            raise ValueError(f"{str(path)!r} is not a valid tokenizer.json file ({exc})") from exc
        try:
            return cls(tok, **read_config(path.parent))
        except ValueError as exc:
            raise ValueError(f"{str(path)!r}: {exc}") from exc

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tokenizer):
            return NotImplemented
        return self.to_json() == other.to_json() and self.config == other.config

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class InvalidTextError(ValueError):
    """A string that is not valid Unicode text (a lone surrogate): it has no UTF-8 bytes."""


def check_text(text: str) -> None:
    """InvalidTextError naming the position of a lone surrogate (what Python makes of bytes
    that are not UTF-8 on a command line, or of a ``"\\ud800"`` escape in JSON)."""
    if text.isascii():  # the common case, at no cost
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidTextError(f"the text is not valid Unicode: a lone surrogate "
                               f"{text[e.start]!a} at character {e.start} (invalid UTF-8 "
                               "bytes?)") from None
