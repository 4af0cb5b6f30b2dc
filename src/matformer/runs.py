"""Run directories: starting one without overwriting anything, and the facts a checkpoint
records about its data so that resumes and evaluations read the data it was trained on.

A run directory holds ``train_config.json``, ``metrics.jsonl``, ``checkpoints/step_*``, a
``latest`` file naming the newest checkpoint and, for language models, ``tokenizer.json``
(:mod:`matformer.checkpoint` writes, prunes and resolves the checkpoints).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from . import checkpoint as ckpt
from .outputs import write_text_atomic

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


def mark_run_dir(run_dir: str | Path) -> None:
    """Create ``run_dir`` (if needed) with its :data:`RUN_MARKER`, before any other file of a
    new run is written there."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not _marked(run_dir):
        write_text_atomic(run_dir / RUN_MARKER, json.dumps(_MARK) + "\n")


def check_new_run_dir(run_dir: str | Path, extra: tuple[str, ...] = ()) -> None:
    """Refuse to start a new run where it would overwrite something.

    ``run_dir`` may be missing, empty, or hold what a new run writes before its first checkpoint
    (:data:`FRESH_RUN_FILES` plus ``extra``, e.g. the vision run's settings file) next to the
    :data:`RUN_MARKER` that run wrote first: a run killed that early has nothing worth keeping.
    A run with checkpoints needs ``resume=True``; anything else (an extracted checkpoint, a folder
    of the user's files, even with names such as ``metrics.jsonl``) is not a run of ours.

    Raises:
        ValueError: Naming the directory, what it holds and what to do instead.
    """
    run_dir = Path(run_dir)
    if not (run_dir.exists() or run_dir.is_symlink()):
        return
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is a file, not a run directory; choose another run "
                         "directory")
    if (run_dir / ckpt.LATEST).exists() or (run_dir / ckpt.LATEST).is_symlink():
        raise ValueError(f"{run_dir} already holds a run; pass resume=True to continue it or "
                         "choose another run directory")
    steps = ckpt.step_dirs(run_dir / ckpt.CHECKPOINTS)
    if steps:
        raise ValueError(f"{run_dir} holds checkpoints (step {max(steps)} the newest) but no "
                         f"{ckpt.LATEST} file, so it cannot be resumed or safely started afresh; "
                         "nothing was changed: choose another run directory")
    ours = (*FRESH_RUN_FILES, *extra) if _marked(run_dir) else ()
    others = sorted(p.name for p in run_dir.iterdir()
                    if p.name not in ours and not _leftover_of(p.name, ours))
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise ValueError(f"{run_dir} is not empty and not a training run (it holds {shown}); "
                         "nothing was changed: choose a new or empty run directory")


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


def read_train_config(run_dir: str | Path, config_cls: type[T]) -> T:
    """The training settings a run saved (``train_config.json``), for ``--resume``.

    Raises:
        ValueError: The run has none, or it cannot be read (naming the file).
    """
    f = Path(run_dir) / TRAIN_CONFIG
    if not f.is_file():
        raise ValueError(f"{run_dir} has no {TRAIN_CONFIG}: there is no run to resume there "
                         "(train without resume=True to start one)")
    try:
        return config_cls.from_dict(json.loads(f.read_text()))  # type: ignore[attr-defined]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{f} is not a valid training config: {e}") from e
