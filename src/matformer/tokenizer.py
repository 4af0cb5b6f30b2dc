"""Byte-level BPE tokenizers stored as a single Hugging Face ``tokenizer.json`` file.

Two kinds of tokenizer share one class and one on-disk format:

* :meth:`Tokenizer.byte_level` -- 256 byte tokens (id ``b`` is byte ``b``) plus ``<|endoftext|>``
  (id 256). Needs no training.
* :meth:`Tokenizer.train_bpe` -- a byte-level BPE trained on a corpus with ``tokenizers``.

Both use the GPT-2 style ByteLevel pre-tokenizer and decoder with no normaliser, so
``decode(encode(text)) == text`` for every string. The saved ``tokenizer.json`` can be loaded
by ``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
"""The end-of-text special token, appended after every document."""

MIN_BPE_VOCAB_SIZE = 257
"""Smallest BPE vocabulary: 256 byte tokens plus ``<|endoftext|>``."""


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


def _configure_byte_level(tok: HFTokenizer) -> None:
    """Attach the ByteLevel pre-tokenizer and decoder (no normaliser, no prefix space)."""
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()


class Tokenizer:
    """A byte-level BPE tokenizer with an ``<|endoftext|>`` token.

    Args:
        hf_tokenizer: The wrapped ``tokenizers.Tokenizer``. Its vocabulary must contain
            ``<|endoftext|>``.

    Raises:
        ValueError: If ``<|endoftext|>`` is not in the vocabulary.
    """

    def __init__(self, hf_tokenizer: HFTokenizer) -> None:
        eos = hf_tokenizer.token_to_id(EOS_TOKEN)
        if eos is None:
            raise ValueError(f"tokenizer has no {EOS_TOKEN!r} token; it is required as EOS")
        self._tok = hf_tokenizer
        self._eos_id: int = eos

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
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train a byte-level BPE tokenizer on ``texts``.

        Args:
            texts: Training documents.
            vocab_size: Target vocabulary size, including the 256 byte tokens and
                ``<|endoftext|>``; at least 257. A tiny corpus may yield fewer merges, so the
                final :attr:`vocab_size` can be smaller.

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
        tok = HFTokenizer(models.BPE())
        _configure_byte_level(tok)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            show_progress=False,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(texts, trainer=trainer)
        result = cls(tok)
        logger.info("trained byte-level BPE: %d tokens (asked %d)", result.vocab_size, vocab_size)
        return result

    # ----------------------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        """Id of ``<|endoftext|>``."""
        return self._eos_id

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

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tokenizer as a ``tokenizer.json`` file at ``path`` (parents created).

        Args:
            path: Destination file.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(self.to_json(), encoding="utf-8")
        os.replace(tmp, path)

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
            return cls(tok)
        except ValueError as exc:
            raise ValueError(f"{str(path)!r}: {exc}") from exc

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tokenizer):
            return NotImplemented
        return self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"
