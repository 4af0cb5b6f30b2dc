"""Tests for matformer.tokenizer: exact round-trips, vocabularies and the tokenizer.json format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from matformer.tokenizer import EOS_TOKEN, Tokenizer

TRICKY = [
    "",
    " ",
    "hello",
    "  leading and trailing spaces  ",
    "multiple   spaces\tand\ttabs",
    "line one\nline two\n\n\nthree blank lines\r\nwindows\n",
    "\n\n  indented\n    more\n",
    "accents: é è ü ñ ç, and CJK 日本語",
    "emoji 😀👍🏽 and a ZWJ family 👨‍👩‍👧",
    "control \x00\x01\x7f chars",
    "quotes 'single' \"double\" — dash … ellipsis",
    f"text with the special token {EOS_TOKEN} inside",
]

SAMPLE = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles\n"
    "And by opposing end them. Café, naïve, 😀.\n"
)


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train_bpe(
        [SAMPLE] * 20 + ["the quick brown fox jumps over the lazy dog\n"], 320
    )


def test_byte_level_vocab() -> None:
    tok = Tokenizer.byte_level()
    assert tok.vocab_size == 257
    assert tok.eos_id == 256
    assert tok.decode([tok.eos_id]) == EOS_TOKEN
    # Token id b is exactly byte b.
    assert tok.encode("A") == [65]
    assert tok.encode("é😀") == list("é😀".encode())
    assert tok.encode(" \n") == [32, 10]


@pytest.mark.parametrize("text", TRICKY)
def test_byte_level_round_trip(text: str) -> None:
    tok = Tokenizer.byte_level()
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    if EOS_TOKEN not in text:
        assert ids == list(text.encode("utf-8"))


def test_all_bytes_round_trip() -> None:
    tok = Tokenizer.byte_level()
    text = "".join(chr(c) for c in range(1, 0x800)) + "\U0001f600"
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", [*TRICKY, SAMPLE])
def test_bpe_round_trip(bpe: Tokenizer, text: str) -> None:
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_vocab_and_compression(bpe: Tokenizer) -> None:
    assert 257 < bpe.vocab_size <= 320
    assert bpe.backend.id_to_token(bpe.eos_id) == EOS_TOKEN
    # Merges make it shorter than bytes.
    assert len(bpe.encode(SAMPLE)) < len(SAMPLE.encode()) / 2
    # Every byte is still encodable, even ones never seen in training.
    assert bpe.decode(bpe.encode("Ω ∑ 🚀 \x01")) == "Ω ∑ 🚀 \x01"


def test_bpe_skip_special_tokens(bpe: Tokenizer) -> None:
    ids = [*bpe.encode("ab"), bpe.eos_id, *bpe.encode("cd")]
    assert bpe.decode(ids) == f"ab{EOS_TOKEN}cd"
    assert bpe.decode(ids, skip_special_tokens=True) == "abcd"


def test_bpe_training_is_deterministic(bpe: Tokenizer) -> None:
    again = Tokenizer.train_bpe(
        [SAMPLE] * 20 + ["the quick brown fox jumps over the lazy dog\n"], 320
    )
    assert again.to_json() == bpe.to_json()
    assert again == bpe


def test_bpe_min_vocab_has_no_merges() -> None:
    tok = Tokenizer.train_bpe([SAMPLE], 257)
    assert tok.vocab_size == 257
    assert len(tok.encode(SAMPLE)) == len(SAMPLE.encode())


@pytest.mark.parametrize("bad", [256, 0, -5, 300.0, "4096", True])
def test_bpe_bad_vocab_size(bad: object) -> None:
    with pytest.raises(ValueError, match=rf"vocab_size.*257.*{bad!r}"):
        Tokenizer.train_bpe([SAMPLE], bad)  # type: ignore[arg-type]


def test_encode_batch_matches_encode(bpe: Tokenizer) -> None:
    assert bpe.encode_batch(TRICKY) == [bpe.encode(t) for t in TRICKY]
    assert bpe.encode_batch([]) == []
    with pytest.raises(TypeError, match="int"):
        bpe.encode_batch(["ok", 3])  # type: ignore[list-item]


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_save_load(tmp_path: Path, bpe: Tokenizer, kind: str) -> None:
    tok = Tokenizer.byte_level() if kind == "byte" else bpe
    path = tmp_path / "sub" / "tokenizer.json"
    tok.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokenizer.json"]  # no temp files
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["model"]["type"] == "BPE"
    assert data["pre_tokenizer"]["type"] == "ByteLevel"
    loaded = Tokenizer.load(path)
    assert loaded == tok
    assert loaded.to_json() == tok.to_json()
    assert (loaded.vocab_size, loaded.eos_id) == (tok.vocab_size, tok.eos_id)
    assert loaded.encode_batch(TRICKY) == tok.encode_batch(TRICKY)
    # The file is a plain tokenizers file, loadable without this package.
    assert HFTokenizer.from_file(str(path)).encode(SAMPLE).ids == tok.encode(SAMPLE)


def test_load_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        Tokenizer.load(tmp_path / "nope.json")


def test_load_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text("{ not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"not a valid tokenizer\.json"):
        Tokenizer.load(path)


def test_load_without_eos(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    HFTokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(path))
    with pytest.raises(ValueError, match="endoftext"):
        Tokenizer.load(path)


def test_transformers_can_load(tmp_path: Path, bpe: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "tokenizer.json"
    bpe.save(path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOS_TOKEN)
    assert fast.eos_token_id == bpe.eos_id
    assert fast.encode(SAMPLE, add_special_tokens=False) == bpe.encode(SAMPLE)
    assert fast.decode(bpe.encode(SAMPLE)) == SAMPLE
