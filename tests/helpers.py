"""Tiny models, datasets and corpora shared by the tests (import as ``from helpers import ...``)."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matformer.config import ModelConfig
from matformer.data import TokenDataset
from matformer.model import MatFormerLM

TINY: dict[str, Any] = dict(vocab_size=64, n_layer=2, n_head=2, d_model=32, d_ff=64,
                            max_seq_len=32)


def tiny_config(**overrides: Any) -> ModelConfig:
    """The tests' standard tiny config (S/M/L/XL FFN widths 8/16/32/64)."""
    return ModelConfig(**{**TINY, **overrides})


def tiny_model(cfg: ModelConfig | None = None, seed: int = 0, **overrides: Any) -> MatFormerLM:
    """A freshly initialised tiny model, deterministic in ``seed``."""
    torch.manual_seed(seed)
    return MatFormerLM(cfg if cfg is not None else tiny_config(**overrides))


def clone(model: MatFormerLM) -> MatFormerLM:
    return copy.deepcopy(model)


def random_tokens(batch: int, seq_len: int, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def pattern_dataset(vocab: int = 64, n_train: int = 4000, n_val: int = 600, period: int = 11,
                    seed: int = 0) -> TokenDataset:
    """A learnable stream: a fixed random motif of ``period`` tokens, repeated."""
    rng = np.random.default_rng(seed)
    motif = rng.integers(0, vocab, period)
    stream = np.tile(motif, (n_train + n_val) // period + 1).astype(np.int64)
    return TokenDataset(train=stream[:n_train], val=stream[n_train:n_train + n_val],
                        name="pattern")


def random_dataset(vocab: int = 64, n_train: int = 4000, n_val: int = 600,
                   seed: int = 0) -> TokenDataset:
    rng = np.random.default_rng(seed)
    return TokenDataset(train=rng.integers(0, vocab, n_train), val=rng.integers(0, vocab, n_val),
                        name="random")


WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "cat", "sat",
         "on", "mat", "while", "bird", "sings", "a", "song", "to", "king", "queen", "in",
         "castle"]


def write_corpus(path: Path, n_words: int = 3000, seed: int = 0) -> Path:
    """A small English-like text file (about 5 x n_words bytes)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 12):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)) + ".")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    """Names of state_dict entries that differ (empty list: bit-identical)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return [k for k in sa if not torch.equal(sa[k], sb[k])]
