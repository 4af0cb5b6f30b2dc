"""Run directories (:class:`RunDir`: the only code that writes, prunes or cleans one), and the
facts a checkpoint records about its data so that resumes and evaluations read the data it was
trained on.

A run directory holds :data:`RUN_MARKER` (written first, and only by a run),
``train_config.json``, ``metrics.jsonl``, ``checkpoints/step_*``, a ``latest`` file naming the
newest checkpoint and, for language models, ``tokenizer.json``.
:func:`matformer.checkpoint.resolve` reads ``latest`` to find a run's checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from . import checkpoint as ckpt
from .outputs import (
    OutputError,
    append_line,
    clean_leftovers,
    make_dir,
    remove_output,
    write_text_atomic,
)
from .tokenizer import Tokenizer

T = TypeVar("T")

METRICS, TRAIN_CONFIG = "metrics.jsonl", "train_config.json"
#: The first file a new run writes, and only a run: it tells a run killed before its first
#: checkpoint from a folder of the user's files that merely have run-like names.
RUN_MARKER = "matformer_run.json"
_MARK = {"matformer_run": 1}
#: What a new run writes before its first checkpoint: a directory holding nothing else (a run
#: killed that early, marked by :data:`RUN_MARKER`) may be started afresh.
FRESH_RUN_FILES = (RUN_MARKER, TRAIN_CONFIG, METRICS, ckpt.TOKENIZER, ckpt.CHECKPOINTS,
                   f".{ckpt.LATEST}.tmp")


def _leftover_of(name: str, names: tuple[str, ...]) -> bool:
    """Whether ``name`` is a temporary file of an atomic write of one of ``names``."""
    return name.startswith(".") and ".tmp-" in name and name[1:].split(".tmp-")[0] in names


def _marked(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds the marker a new run writes first (its content, not a name)."""
    try:
        return json.loads((run_dir / RUN_MARKER).read_text()) == _MARK
    except (OSError, UnicodeDecodeError, ValueError):
        return False


class RunDir:
    """A training run's directory: marking it, its settings and metrics, its checkpoints and
    ``latest``, pruning, and the leftovers of interrupted writes.

    Args:
        path: The run directory (it need not exist yet).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def latest(self) -> Path:
        return self.path / ckpt.LATEST

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    def has_checkpoint(self) -> bool:
        return self.latest.exists() or self.latest.is_symlink()

    # ----------------------------------------------------------------- starting
    def check_new(self, extra: tuple[str, ...] = ()) -> None:
        """Refuse to start a new run where it would overwrite something.

        The directory may be missing, empty, or hold what a new run writes before its first
        checkpoint (:data:`FRESH_RUN_FILES` plus ``extra``, e.g. the vision run's settings
        file) next to the :data:`RUN_MARKER` that run wrote first: a run killed that early has
        nothing worth keeping. A run with checkpoints needs ``resume=True``; anything else (an
        extracted checkpoint, a folder of the user's files, even with names such as
        ``metrics.jsonl``) is not a run of ours.

        Raises:
            ValueError: Naming the directory, what it holds and what to do instead.
        """
        d = self.path
        if not (d.exists() or d.is_symlink()):
            return
        if not d.is_dir():
            raise ValueError(f"{d} is a file, not a run directory; choose another run "
                             "directory")
        if self.has_checkpoint():
            raise ValueError(f"{d} already holds a run; pass resume=True to continue it or "
                             "choose another run directory")
        steps = self.steps()
        if steps:
            raise ValueError(f"{d} holds checkpoints (step {max(steps)} the newest) but no "
                             f"{ckpt.LATEST} file, so it cannot be resumed or safely started "
                             "afresh; nothing was changed: choose another run directory")
        ours = (*FRESH_RUN_FILES, *extra) if _marked(d) else ()
        others = sorted(p.name for p in d.iterdir()
                        if p.name not in ours and not _leftover_of(p.name, ours))
        if others:
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            raise ValueError(f"{d} is not empty and not a training run (it holds {shown}); "
                             "nothing was changed: choose a new or empty run directory")

    def mark(self) -> None:
        """Create the directory (if needed) with its :data:`RUN_MARKER`, before any other file
        of a new run is written there."""
        make_dir(self.path)
        if not _marked(self.path):
            write_text_atomic(self.path / RUN_MARKER, json.dumps(_MARK) + "\n")

    # ----------------------------------------------------------------- settings and metrics
    def write_train_config(self, cfg: Any) -> None:
        write_text_atomic(self.path / TRAIN_CONFIG, json.dumps(cfg.to_dict(), indent=2) + "\n")

    def read_train_config(self, config_cls: type[T]) -> T:
        """The training settings the run saved (``train_config.json``), for a resume.

        Raises:
            ValueError: The run has none, or it cannot be read (naming the file).
        """
        f = self.path / TRAIN_CONFIG
        if not f.is_file():
            raise ValueError(f"{self.path} has no {TRAIN_CONFIG}: there is no run to resume "
                             "there (train without resume=True to start one)")
        try:
            return config_cls.from_dict(json.loads(f.read_text()))  # type: ignore[attr-defined]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"{f} is not a valid training config: {e}") from e

    def append_metrics(self, record: dict[str, Any]) -> None:
        append_line(self.metrics_file, json.dumps(record))

    def truncate_metrics(self, step: int) -> None:
        """Drop records logged after ``step`` (they will be produced again) and lines torn by a
        kill mid-write; the file is rewritten atomically, so a kill keeps them all."""
        f = self.metrics_file
        if not f.exists():
            return
        kept = []
        for line in f.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        write_text_atomic(f, "".join(line + "\n" for line in kept))

    # ----------------------------------------------------------------- checkpoints
    def steps(self) -> dict[int, Path]:
        """``checkpoints/step_NNNNNN`` directories by step."""
        folder = self.path / ckpt.CHECKPOINTS
        if not folder.is_dir():
            return {}
        return {int(p.name[5:]): p for p in folder.glob("step_*")
                if p.name[5:].isdigit() and p.is_dir() and not p.is_symlink()}

    def describe_latest(self) -> str:
        """Which checkpoint ``latest`` names, for the message of a stopped run."""
        try:
            return (f"the last good checkpoint is kept: {self.latest} -> "
                    f"{self.latest.read_text().strip()}")
        except OSError:
            return "there is no earlier checkpoint"

    def clean_leftovers(self) -> list[str]:
        """Remove what interrupted writes left (``.step_*.tmp-*``, ``.step_*.old-*``,
        ``.latest.tmp``, ``.metrics.jsonl.tmp-*``...); return their names. Called when
        training starts or resumes."""
        done = (clean_leftovers(self.path / ckpt.CHECKPOINTS, ".step_*")
                + clean_leftovers(self.path, ".*.tmp-*"))
        tmp = self.path / f".{ckpt.LATEST}.tmp"
        if tmp.is_file():
            tmp.unlink()
            done.append(tmp.name)
        return done

    def save_checkpoint(self, step: int, model: nn.Module, tokenizer: Tokenizer | None,
                        train_state: dict[str, Any], keep: int = 2,
                        metadata: dict[str, Any] | None = None) -> Path:
        """Save ``checkpoints/step_NNNNNN``, point ``latest`` at it, prune old ones.

        Pruning follows this run's history: of the checkpoints up to ``step`` the newest
        ``keep`` stay (all when ``keep`` <= 0); higher-numbered ones (left by an earlier
        attempt, or by a rollback of ``latest``) and ``latest``'s target are never deleted. A
        step directory of the same number (written before a crash, after the checkpoint
        ``latest`` named) is replaced.
        """
        rel = Path(ckpt.CHECKPOINTS) / f"step_{step:06d}"
        path = ckpt.save_checkpoint(self.path / rel, model, tokenizer, train_state=train_state,
                                    metadata=metadata, overwrite=True)
        try:
            write_text_atomic(self.latest, f"{rel.as_posix()}\n")
        except (OSError, OutputError) as e:
            raise ckpt.CheckpointError(f"cannot update {self.latest}: {e}; it still names the "
                                       "previous checkpoint") from e
        history = sorted((s, p) for s, p in self.steps().items() if s <= step)
        for _, old in history[:-keep] if keep > 0 else []:
            if old.resolve() != path.resolve():  # never latest's target
                remove_output(old)
        return path


def data_facts(task: Any) -> dict[str, Any]:
    """What a checkpoint records about its data beyond the spec, so resumes and evaluations can
    check they read the same data: the corpus digest (LM) or the class names (vision)."""
    data, facts = getattr(task, "data", None), {}
    if getattr(data, "digest", None):
        facts["data_sha256"] = data.digest
    if getattr(data, "classes", None):
        facts["classes"] = list(data.classes)
    return facts


def check_same_data(recorded: dict[str, Any], facts: dict[str, Any], where: str) -> None:
    """Raise ValueError when ``facts`` about the data contradict what ``recorded`` holds."""
    if "data_sha256" in recorded and "data_sha256" in facts and \
            recorded["data_sha256"] != facts["data_sha256"]:
        raise ValueError(f"the corpus {recorded.get('data')!r} has changed since {where} was "
                         f"trained (sha256 {facts['data_sha256'][:12]}..., recorded "
                         f"{recorded['data_sha256'][:12]}...); restore it, or train a new run")
    if "classes" in recorded and "classes" in facts and \
            list(recorded["classes"]) != list(facts["classes"]):
        raise ValueError(f"{where} was trained on the classes {list(recorded['classes'])}; the "
                         f"data {recorded.get('data')!r} now holds {list(facts['classes'])}")
