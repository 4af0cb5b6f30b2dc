"""Tests for matformer.tokenizer: exact round-trips, vocabularies and the tokenizer.json format."""

from __future__ import annotations

import io
import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from matformer import tokenizer as tokenizer_module
from matformer.tokenizer import EOS_TOKEN, MAX_PRETOKEN_CHARS, Tokenizer

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


# Ids the fixture BPE gave these sentences before pre-tokens were capped (commit c520c0a).
IDS_BEFORE_CAP = {
    "To be, or not to be, that is the question:\n": [
        287, 276, 12, 259, 82, 277, 84, 267, 276, 12, 257, 301, 221, 272, 263, 282, 271, 313,
        78, 26, 199,
    ],
    "The quick brown fox jumps over the lazy dog; Café naïve 😀!\n": [
        288, 282, 73, 67, 75, 262, 283, 78, 281, 88, 221, 74, 85, 77, 80, 83, 259, 86, 268, 263,
        221, 76, 65, 90, 89, 221, 68, 79, 71, 27, 221, 285, 299, 103, 265, 293, 108, 86, 69, 221,
        173, 254, 247, 223, 1, 199,
    ],
}


def _long_runs(n: int) -> list[str]:
    """Whitespace-free (or whitespace-only) runs of ``n`` characters of every regex class."""
    rng = random.Random(0)
    return [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n)),
        "".join(rng.choice("0123456789") for _ in range(n)),
        "".join(rng.choice("+/=-_.,;!") for _ in range(n)),
        "".join(rng.choice("日本語の文章中国") for _ in range(n)),
        "😀" * n,
        " " * n,
        "\n" * n,
        " " * n + "word",
    ]


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
    if kind == "byte":  # no merges, so no cap needed: the format is unchanged
        assert data["pre_tokenizer"]["type"] == "ByteLevel"
    else:
        steps = data["pre_tokenizer"]["pretokenizers"]
        assert [step["type"] for step in steps] == ["Split", "ByteLevel"]
        assert f"{{1,{MAX_PRETOKEN_CHARS - 1}}}" in steps[0]["pattern"]["Regex"]
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


# ------------------------------------------------------------------- capped pre-tokens
def test_bpe_normal_text_ids_unchanged_by_cap(bpe: Tokenizer) -> None:
    for text, ids in IDS_BEFORE_CAP.items():
        assert bpe.encode(text) == ids
        assert bpe.decode(ids) == text


def test_capped_pretokenizer_matches_gpt2_below_cap(bpe: Tokenizer) -> None:
    """Below the cap the pre-tokens are exactly those of plain ``ByteLevel(use_regex=True)``."""
    plain = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    capped = bpe.backend.pre_tokenizer
    rng = random.Random(1)
    alphabet = [*"ab Z'srevmld 09\t\n\r.,!-_😀é日\u00a0\u2003", "'s", "'re", "  ", "\n\n"]
    for text in [*TRICKY, SAMPLE]:
        assert capped.pre_tokenize_str(text) == plain.pre_tokenize_str(text)
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert capped.pre_tokenize_str(text) == plain.pre_tokenize_str(text), repr(text)


@pytest.mark.parametrize("n", [MAX_PRETOKEN_CHARS - 1, MAX_PRETOKEN_CHARS + 1, 20_000])
def test_pretoken_length_is_capped(bpe: Tokenizer, n: int) -> None:
    for text in _long_runs(n):
        pieces = bpe.backend.pre_tokenizer.pre_tokenize_str(text)
        spans = [offsets for _, offsets in pieces]
        # The pieces tile the text, in order, and none is longer than the cap.
        assert spans[0][0] == 0 and spans[-1][1] == len(text)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        assert max(end - start for start, end in spans) <= MAX_PRETOKEN_CHARS
        if n > MAX_PRETOKEN_CHARS:
            assert len(pieces) > 1


@pytest.mark.parametrize("kind", ["trained-on-runs", "fixture"])
def test_bpe_round_trip_long_whitespace_free(bpe: Tokenizer, kind: str) -> None:
    runs = _long_runs(20_000)
    tok = Tokenizer.train_bpe(runs, 400) if kind == "trained-on-runs" else bpe
    assert tok.vocab_size > 257 or kind == "fixture"
    for text in [*runs, "".join(runs), "x" * 100_000]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.encode_batch([text]) == [ids]
    # Merges never span a cut, so no token decodes to more than the cap's bytes.
    longest = max(len(tok.decode([i]).encode()) for i in range(256, tok.vocab_size))
    assert longest <= 4 * MAX_PRETOKEN_CHARS


def test_old_uncapped_tokenizer_json_still_loads_unchanged(tmp_path: Path, bpe: Tokenizer) -> None:
    """A tokenizer.json saved before the cap (plain ByteLevel) keeps its pre-tokenizer."""
    data = json.loads(bpe.to_json())
    data["pre_tokenizer"] = {
        "type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True,
    }
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    old = Tokenizer.load(path)
    assert json.loads(old.to_json())["pre_tokenizer"]["type"] == "ByteLevel"  # not upgraded
    for text, ids in IDS_BEFORE_CAP.items():
        assert old.encode(text) == ids
    assert old.encode_batch([*TRICKY, SAMPLE]) == bpe.encode_batch([*TRICKY, SAMPLE])
    long_run = _long_runs(2_000)[0]
    assert len(old.backend.pre_tokenizer.pre_tokenize_str(long_run)) == 1  # as before
    assert old.decode(old.encode(long_run)) == long_run
    old.save(tmp_path / "again.json")
    assert Tokenizer.load(tmp_path / "again.json") == old


# ------------------------------------------------------------------- progress
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def trainer_progress(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record the ``show_progress`` every BpeTrainer is built with."""
    seen: list[bool] = []
    real = trainers.BpeTrainer

    def spy(**kwargs: object) -> trainers.BpeTrainer:
        seen.append(bool(kwargs["show_progress"]))
        return real(**{**kwargs, "show_progress": False})  # keep test output clean

    monkeypatch.setattr(tokenizer_module.trainers, "BpeTrainer", spy)
    return seen


def test_progress_shown_for_large_corpus_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, trainer_progress: list[bool]
) -> None:
    monkeypatch.setattr(tokenizer_module, "PROGRESS_MIN_CHARS", len(SAMPLE) * 3)

    def docs() -> Iterator[str]:
        yield SAMPLE

    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal: never by default
    Tokenizer.train_bpe([SAMPLE] * 3, 300)
    monkeypatch.setattr("sys.stderr", _Terminal())
    Tokenizer.train_bpe([SAMPLE] * 2, 300)  # small
    Tokenizer.train_bpe([SAMPLE] * 3, 300)  # large
    Tokenizer.train_bpe(docs(), 300)  # unknown size
    Tokenizer.train_bpe([SAMPLE] * 3, 300, show_progress=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    Tokenizer.train_bpe([SAMPLE], 300, show_progress=True)
    assert trainer_progress == [False, False, True, True, False, True]
