"""Tokenised caches of corpora (:mod:`matformer.corpora`) and deterministic, resumable batching.

* :func:`prepare_data` -- tokenises a corpus once, splits it per document into train/validation
  and caches both as flat token files (memory-mapped on later calls).
* :class:`TokenDataset` -- random training windows that depend only on ``(seed, step)``, so a
  resumed run sees exactly the same batches, sharded across ranks; plus fixed validation windows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .corpora import corpus_digest, load_corpus
from .outputs import make_dir, write_bytes_atomic
from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_CACHE_FORMAT = 2  # 2: the validation tail is cut by characters, then tokenised


# --------------------------------------------------------------------------------- tokens
def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding ids ``0 .. vocab_size - 1`` (uint16 or uint32)."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """A document's train head and validation tail: the last ``round(n * val_fraction)`` of
    its ``n`` characters are held out (rounding half up).

    One rule for both uses: :func:`prepare_data` tokenises head and tail separately, and a
    tokenizer is trained on the heads, so it never sees validation text.

    Raises:
        ValueError: If ``val_fraction`` is outside (0, 0.5].
    """
    if not 0.0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction!r}")
    cut = len(text) - math.floor(len(text) * val_fraction + 0.5)
    return text[:cut], text[cut:]


def split_documents(
    texts: list[str],
    val_fraction: float,
    tokenizer: Tokenizer,
    dtype: np.dtype | type = np.int64,
) -> tuple[np.ndarray, np.ndarray]:
    """Split every document into a train head and a validation tail (:func:`split_text`) and
    tokenise both; each non-empty piece is followed by the end-of-text token and pieces are
    concatenated in document order. Deterministic.

    Returns:
        ``(train, val)`` flat token arrays.

    Raises:
        ValueError: If ``val_fraction`` is outside (0, 0.5].
    """
    pieces = [split_text(t, val_fraction) for t in texts]
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    out = []
    for part in (0, 1):
        ids = tokenizer.encode_batch([p[part] for p in pieces])
        arrays = [a for doc in ids if len(doc) for a in (np.asarray(doc, dtype=dtype), eos)]
        out.append(np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype))
    return out[0], out[1]


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the token frequency distribution of ``tokens``.

    This is the cross-entropy of a model that always predicts the unigram frequencies: a
    language model that has learned anything should get below it.

    Args:
        tokens: Token ids.
        vocab_size: Vocabulary size (ids must be < vocab_size).

    Returns:
        The entropy in nats.

    Raises:
        ValueError: If ``tokens`` is empty or holds ids outside ``[0, vocab_size)``.
    """
    tokens = np.asarray(tokens)
    if tokens.size == 0:
        raise ValueError("unigram_entropy needs at least one token, got an empty array")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(
            f"token ids must be in [0, {vocab_size}), got range [{tokens.min()}, {tokens.max()}]"
        )
    counts = np.bincount(tokens.ravel().astype(np.int64), minlength=vocab_size)
    p = counts[counts > 0] / tokens.size
    return float(-(p * np.log(p)).sum())


# --------------------------------------------------------------------------------- dataset
class TokenDataset:
    """Train and validation token streams with deterministic batching.

    Args:
        train: Training token ids (flat, documents separated by EOS).
        val: Validation token ids.
        name: Corpus name, used in error messages.
        digest: :func:`corpus_digest` of the documents, when known (checkpoints record it).
    """

    def __init__(self, train: np.ndarray, val: np.ndarray, name: str = "corpus",
                 digest: str | None = None) -> None:
        self.train = train
        self.val = val
        self.name = name
        self.digest = digest

    def __repr__(self) -> str:
        return f"TokenDataset({self.name!r}, train={len(self.train)}, val={len(self.val)})"

    def check_context(self, seq_len: int) -> None:
        """Check both splits hold at least one context of ``seq_len + 1`` tokens.

        Raises:
            ValueError: If ``seq_len`` < 1 or a split is too small.
        """
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        for split, tokens in (("train", self.train), ("validation", self.val)):
            if len(tokens) < seq_len + 1:
                raise ValueError(
                    f"corpus {self.name!r} is too small: its {split} split has {len(tokens)} "
                    f"tokens, fewer than one context of seq_len+1 = {seq_len + 1} tokens; use a "
                    "smaller seq_len or more data"
                )

    @staticmethod
    def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, ...]:
        index = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(seq_len + 1)
        rows = torch.from_numpy(np.asarray(tokens)[index].astype(np.int64))
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def train_batch(
        self,
        step: int,
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the global training batch for ``step``.

        The global batch of ``batch_size`` windows (starts uniform in
        ``[0, len(train) - seq_len - 1]``) depends only on ``(seed, step)``; rank ``r`` gets rows
        ``r::world_size``.

        Args:
            step: Training step (>= 0).
            batch_size: Global batch size, divisible by ``world_size``.
            seq_len: Context length.
            seed: Run seed.
            rank: This process's rank.
            world_size: Number of processes.

        Returns:
            ``(x, y)`` int64 tensors of shape ``(batch_size // world_size, seq_len)``;
            ``y`` is ``x`` shifted left by one token.

        Raises:
            ValueError: On bad arguments or a corpus smaller than one context.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need world_size >= 1 and 0 <= rank < world_size, got {rank=}, {world_size=}"
            )
        if batch_size < 1 or batch_size % world_size:
            msg = f"batch_size must be a positive multiple of world_size={world_size}"
            raise ValueError(f"{msg}, got {batch_size}")
        self.check_context(seq_len)
        state = np.random.SeedSequence([seed % 2**64, step]).generate_state(1, np.uint64)[0]
        gen = torch.Generator().manual_seed(int(state))
        starts = torch.randint(0, len(self.train) - seq_len, (batch_size,), generator=gen)
        return self._windows(self.train, starts[rank::world_size].numpy(), seq_len)

    def val_batches(
        self, batch_size: int, seq_len: int, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive non-overlapping validation windows, identical on every call.

        Window ``i`` starts at token ``i * seq_len``; the last batch may be smaller.

        Args:
            batch_size: Windows per batch.
            seq_len: Context length.
            max_batches: Stop after this many batches, if given.

        Returns:
            An iterator of ``(x, y)`` int64 tensors of shape ``(<= batch_size, seq_len)``.

        Raises:
            ValueError: On bad arguments or a corpus smaller than one context.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_batches is not None and max_batches < 0:
            raise ValueError(f"max_batches must be >= 0 or None, got {max_batches}")
        self.check_context(seq_len)  # eager: errors surface at the call, not on first next()
        starts = np.arange((len(self.val) - 1) // seq_len) * seq_len
        n_batches = math.ceil(len(starts) / batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        chunks = [starts[b * batch_size : (b + 1) * batch_size] for b in range(n_batches)]
        return (self._windows(self.val, chunk, seq_len) for chunk in chunks)


# --------------------------------------------------------------------------------- caching
def default_cache_dir() -> Path:
    """``$MATFORMER_CACHE`` if set, else ``~/.cache/matformer``."""
    env = os.environ.get("MATFORMER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "matformer"


def _cache_key(texts: list[str], tokenizer: Tokenizer, val_fraction: float) -> str:
    h = hashlib.sha256(f"matformer-data-v{_CACHE_FORMAT}\0{val_fraction!r}\0".encode())
    h.update(hashlib.sha256(tokenizer.to_json().encode()).digest())
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def _open_tokens(path: Path, dtype: np.dtype, length: int) -> np.ndarray:
    if path.stat().st_size != length * dtype.itemsize:
        raise ValueError(f"{str(path)!r} has the wrong size for {length} {dtype} tokens")
    return np.memmap(path, dtype=dtype, mode="r") if length else np.zeros(0, dtype=dtype)


def prepare_data(
    corpus: str,
    tokenizer: Tokenizer,
    *,
    val_fraction: float = 0.1,
    cache_dir: Path | None = None,
) -> TokenDataset:
    """Tokenise ``corpus`` (once) and return its train/validation split.

    Tokens are cached as ``train.bin``/``val.bin``/``meta.json`` under
    ``cache_dir / sha256(texts, tokenizer, val_fraction)``; files are written atomically
    (``meta.json`` last), so an interrupted run never leaves a usable half-written cache.

    Args:
        corpus: A :func:`load_corpus` spec.
        tokenizer: Tokenizer to apply.
        val_fraction: Fraction of each document held out for validation, in (0, 0.5].
        cache_dir: Cache root; defaults to :func:`default_cache_dir`.

    Returns:
        The dataset, its splits memory-mapped from the cache.
    """
    if not 0.0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction!r}")
    texts = load_corpus(corpus)
    key = _cache_key(texts, tokenizer, val_fraction)
    folder = Path(cache_dir if cache_dir is not None else default_cache_dir()) / key
    dtype = token_dtype(tokenizer.vocab_size)
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            train = _open_tokens(folder / "train.bin", dtype, meta["train_tokens"])
            val = _open_tokens(folder / "val.bin", dtype, meta["val_tokens"])
            logger.info("loaded cached tokens for %r from %s (no tokenising)", corpus, folder)
            return TokenDataset(train, val, name=corpus, digest=corpus_digest(texts))
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("ignoring broken token cache %s (%s); re-tokenising", folder, exc)
    t0 = time.perf_counter()
    train, val = split_documents(texts, val_fraction, tokenizer, dtype=dtype)
    seconds = time.perf_counter() - t0
    logger.info(
        "tokenised %r: %d train + %d val tokens in %.1fs", corpus, len(train), len(val), seconds
    )
    make_dir(folder)
    write_bytes_atomic(folder / "train.bin", train.tobytes())
    write_bytes_atomic(folder / "val.bin", val.tobytes())
    meta = dict(format=_CACHE_FORMAT, corpus=corpus, documents=len(texts), dtype=dtype.name)
    meta |= dict(train_tokens=len(train), val_tokens=len(val), val_fraction=val_fraction)
    write_bytes_atomic(meta_path, json.dumps(meta, indent=2).encode())
    return TokenDataset(
        _open_tokens(folder / "train.bin", dtype, len(train)),
        _open_tokens(folder / "val.bin", dtype, len(val)),
        name=corpus,
        digest=corpus_digest(texts),
    )


DEFAULT_EVAL_CONTEXT = 1024
"""Context of evaluation windows for a checkpoint that records none (an imported model): its
``max_seq_len`` capped here (at 8,192 tokens a window, evaluating SmolLM2 on a CPU had not
finished four batches in ten minutes). ``seq_len`` sets it explicitly."""


def eval_context(meta: dict[str, Any], max_seq_len: int, seq_len: int | None = None) -> int:
    """The context to evaluate a checkpoint at: ``seq_len`` when given (at most the model's
    ``max_seq_len``), else the one it was trained at, else ``max_seq_len`` capped at
    :data:`DEFAULT_EVAL_CONTEXT`."""
    if seq_len is not None:
        if not 1 <= seq_len <= max_seq_len:
            raise ValueError(f"seq_len={seq_len}: the model's context is 1..{max_seq_len}")
        return seq_len
    return min(meta.get("seq_len") or DEFAULT_EVAL_CONTEXT, max_seq_len)


def validation_batches(tokenizer: Tokenizer, meta: dict[str, Any], max_seq_len: int, *,
                       data: str | None = None, batch_size: int = 16,
                       max_batches: int | None = None, seq_len: int | None = None
                       ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """The held-out batches a checkpoint was validated on, from the facts its manifest records
    (``meta``: corpus, validation fraction, context); ``data`` overrides the corpus and
    ``seq_len`` the context (:func:`eval_context`).

    Returns ``(batches, info)``; info holds the corpus, seq_len, token count and the unigram
    entropy of the validation tokens (the loss of a model that learned only token frequencies).
    """
    corpus = data or meta.get("data")
    if corpus is None:
        raise ValueError("the checkpoint does not record its training data; give data=SPEC")
    if batch_size < 1 or (max_batches is not None and max_batches < 1):
        raise ValueError(f"batch_size={batch_size} and batches={max_batches} must be >= 1")
    seq_len = eval_context(meta, max_seq_len, seq_len)
    ds = prepare_data(corpus, tokenizer, val_fraction=meta.get("val_fraction", 0.1))
    recorded = meta.get("data_sha256")
    if data is None and recorded and recorded != ds.digest:
        raise ValueError(f"the corpus {corpus!r} has changed since the checkpoint was trained "
                         f"(sha256 {ds.digest[:12]}..., recorded {recorded[:12]}...): its "
                         "validation split is not the one training held out; restore the data, "
                         "or give data=SPEC to evaluate on other data")
    batches = list(ds.val_batches(batch_size, seq_len, max_batches))
    info = {"data": corpus, "seq_len": seq_len, "val_tokens": sum(y.numel() for _, y in batches),
            "unigram_entropy": unigram_entropy(ds.val, tokenizer.vocab_size)}
    return batches, info
