"""Checkpoint directories: written atomically, verified on load, resumable.

A checkpoint is a directory holding ``config.json`` (the ModelConfig; a ``"kind"`` field says
which model it describes: absent or ``"lm"`` for the language model, ``"vit"`` for the vision
encoder), ``model.safetensors``, ``tokenizer.json`` (language models only; an imported model's
chat template and end-of-turn token beside it in ``tokenizer_config.json``),
``manifest.json`` (sha256 of every file, so corruption is caught at load
time with a clear message) and, for training runs, ``train_state.pt`` (optimizer, step).
This module knows no model family: :mod:`matformer.families` picks the class from ``kind``.

A training run directory keeps several: ``checkpoints/step_000100/`` ... plus a ``latest`` file
naming the newest (:class:`matformer.runs.RunDir` writes, prunes and cleans them; here
:func:`resolve` only reads ``latest``). Every checkpoint is first written to a temporary
directory beside its final place and then renamed (:func:`matformer.outputs.atomic_output`: an
existing directory is only replaced when asked, never when it is the command's input); a crash
at any moment leaves the previous good checkpoint where it was.

Loading checks every file against the manifest first; ``train_state.pt`` is read with
``torch.load(weights_only=True)`` only after its checksum matched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

from .chat_template import CONFIG_FILE as TOKENIZER_CONFIG
from .config import ModelConfig
from .outputs import atomic_output, disk_full, write_text_atomic
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

CONFIG, WEIGHTS, TOKENIZER, MANIFEST, TRAIN_STATE = (
    "config.json", "model.safetensors", "tokenizer.json", "manifest.json", "train_state.pt")
LATEST, CHECKPOINTS = "latest", "checkpoints"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or corrupt, or cannot be written."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(path: str | Path, model: nn.Module, tokenizer: Tokenizer | None,
                    *,
                    train_state: dict[str, Any] | None = None,
                    metadata: dict[str, Any] | None = None,
                    overwrite: bool = False,
                    sources: Iterable[str | Path] = ()) -> Path:
    """Write a checkpoint directory atomically (:func:`matformer.outputs.atomic_output`).

    Args:
        path: Destination directory. An existing one is refused unless ``overwrite`` (then it is
            replaced as a whole, atomically); it may never be one of ``sources``.
        model: The model (its ``config`` is saved beside the weights).
        tokenizer: Saved as ``tokenizer.json``; None for models without one (vision).
        train_state: Optional resume state (optimizer state dict, step, ...), saved with
            ``torch.save``.
        metadata: Optional JSON-serialisable facts stored in the manifest (e.g. the widths an
            extracted model came from).
        overwrite: Replace an existing ``path``.
        sources: The checkpoints (or run directories) the command read: never replaced.

    Raises:
        OutputExistsError: ``path`` exists (without ``overwrite``) or is one of ``sources``.
        CheckpointError: A file cannot be written (a full disk); the message names it, and
            whatever was at ``path`` is kept.
    """
    path = Path(path)
    writers: list[tuple[str, Callable[[Path], Any]]] = [
        (CONFIG, model.config.save),
        # save_model de-duplicates tied tensors (embedding and head)
        (WEIGHTS, lambda f: _save_weights(model, f))]
    if tokenizer is not None:
        writers.append((TOKENIZER, tokenizer.save))
        if tokenizer.config:  # an imported model's chat template and end-of-turn token
            writers.append((TOKENIZER_CONFIG, tokenizer.save_config))
    if train_state is not None:
        writers.append((TRAIN_STATE, lambda f: torch.save(train_state, f)))

    def manifest(f: Path) -> None:
        files = sorted(p.name for p in f.parent.iterdir())
        write_text_atomic(f, json.dumps({"files": {n: _sha256(f.parent / n) for n in files},
                                         "metadata": metadata or {}}, indent=2) + "\n")

    with atomic_output(path, overwrite=overwrite, sources=inputs(*sources)) as tmp:
        for name, write in [*writers, (MANIFEST, manifest)]:
            try:
                write(tmp / name)
            except (OSError, RuntimeError, SafetensorError) as e:  # torch.save: RuntimeError
                if disk_full(e, tmp / name):
                    raise CheckpointError(f"no space left on device writing {path / name}; "
                                          "nothing was replaced") from e
                raise CheckpointError(f"cannot write {path / name}: {e}; nothing was replaced"
                                      ) from e
    log.info("saved checkpoint %s", path)
    return path


def _save_weights(model: nn.Module, f: Path) -> None:
    """``save_model``, with any weight held in another memory layout (a decoding pool's
    :func:`~matformer.runner.streaming_layout`) written from a contiguous copy; the model
    keeps its layout."""
    moved = [(p, p.data) for p in model.parameters() if not p.is_contiguous()]
    try:
        for p, data in moved:
            p.data = data.contiguous()
        save_model(model, str(f))
    finally:
        for p, data in moved:
            p.data = data


def inputs(*paths: str | Path) -> list[Path]:
    """The paths a command reads when given these checkpoints or run directories: each path
    and, for a run directory, the checkpoint its ``latest`` names (to refuse as outputs)."""
    out = []
    for p in paths:
        out.append(Path(p))
        with suppress(CheckpointError):
            out.append(resolve(p))
    return out


def resolve(path: str | Path) -> Path:
    """The checkpoint directory behind ``path``: itself, or a run directory's latest one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if (path / CONFIG).exists():
        return path
    latest = path / LATEST
    if latest.is_symlink() and not latest.exists():
        raise CheckpointError(f"{latest} is a link to {os.readlink(latest)}, which does not "
                              "exist (a dangling link): point it at a checkpoint of the run")
    if latest.exists():
        if not latest.is_file():
            raise CheckpointError(f"{latest} should be a file naming the newest checkpoint "
                                  "(e.g. checkpoints/step_000100), but it is a directory")
        try:
            name = latest.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read {latest}: {e}") from e
        target = path / name
        if not name or not (target / CONFIG).exists():
            raise CheckpointError(f"{latest} points to {target}, which is not a checkpoint")
        return target
    raise CheckpointError(f"{path} is neither a checkpoint directory (no {CONFIG}) nor a training "
                          f"run directory (no {LATEST} file)")


def _manifest(path: Path) -> dict[str, Any]:
    """The manifest of checkpoint ``path``, checked for shape (not yet against the files)."""
    f = path / MANIFEST
    if not f.exists():
        raise CheckpointError(f"{path} has no {MANIFEST}: the checkpoint is incomplete")
    try:
        manifest = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f} is corrupt: {e}") from e
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise CheckpointError(f"{f} has no file list ('files': name -> sha256): the checkpoint "
                              "is incomplete or corrupt")
    if not isinstance(manifest.get("metadata", {}), dict):
        raise CheckpointError(f"{f} is corrupt: 'metadata' is not a JSON object")
    unlisted = [name for name in (CONFIG, WEIGHTS) if name not in files]
    if unlisted:
        raise CheckpointError(f"{f} does not list {unlisted}: the checkpoint is incomplete or "
                              "corrupt")
    return manifest


def _check_file(path: Path, name: str, digest: str) -> None:
    f = path / name
    if not f.is_file():
        raise CheckpointError(f"{path} is missing {name}")
    try:
        ok = _sha256(f) == digest
    except OSError as e:
        raise CheckpointError(f"cannot read {f}: {e}") from e
    if not ok:
        raise CheckpointError(f"{f} does not match its checksum: the file is corrupt or "
                              f"truncated; use an earlier checkpoint")


def verify(path: Path) -> dict[str, Any]:
    """Check every file the model needs against the manifest; return the manifest. The
    resume state is checked only when a resume reads it (:func:`load_train_state`): damage
    there does not keep eval, generate or serve from intact weights."""
    manifest = _manifest(path)
    for name, digest in manifest["files"].items():
        if name != TRAIN_STATE:
            _check_file(path, name, digest)
    return manifest


def read_config(path: str | Path) -> dict[str, Any]:
    """The raw ``config.json`` of a checkpoint (or a run directory's latest one)."""
    f = resolve(path) / CONFIG
    try:
        data = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f} is not a valid model config: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{f} is not a valid model config: not a JSON object")
    return data


def materialize(model_cls: Callable[[Any], nn.Module], cfg: Any,
                state: Mapping[str, torch.Tensor]) -> nn.Module:
    """``model_cls(cfg)`` built on the meta device with ``state`` assigned to it.

    The tensors of ``state`` become the parameters (no second copy is allocated). A tied output
    head, stored once under either name, is tied again; buffers that are not saved (the LM's
    rotary tables) are rebuilt. CheckpointError when ``state`` does not fit the config.
    """
    state = dict(state)
    tied = getattr(cfg, "tie_embeddings", False)
    if tied:
        head = state.pop("lm_head.weight", None)
        if "embed.weight" not in state and head is not None:
            state["embed.weight"] = head
    with torch.device("meta"):
        model = model_cls(cfg)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"does not fit its config: {e}") from e
    if tied:
        model.lm_head.weight = model.embed.weight
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"does not fit its config: missing {missing}, "
                              f"unexpected {unexpected}")
    if hasattr(model, "reset_rope"):  # rotary tables are not saved: build them for real
        model.reset_rope()
    return model


def load_model(path: str | Path, config_cls: type[ModelConfig],
               model_cls: Callable[[Any], nn.Module], *, device: str | torch.device = "cpu",
               check: bool = True) -> nn.Module:
    """The model stored in a checkpoint (or a run directory's latest one), as ``model_cls``.

    Which class fits a checkpoint is the caller's knowledge (:mod:`matformer.families` reads
    the config's ``kind``); this module only moves tensors in and out of directories.
    """
    ckpt = resolve(path)
    if check:
        verify(ckpt)
    try:
        cfg = config_cls.load(ckpt / CONFIG)
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise CheckpointError(f"{ckpt / CONFIG} is not a valid model config: {e}") from e
    try:
        state = load_file(str(ckpt / WEIGHTS), device=str(device))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot read weights {ckpt / WEIGHTS}: {e}") from e
    try:
        return materialize(model_cls, cfg, state)
    except CheckpointError as e:
        raise CheckpointError(f"{ckpt / WEIGHTS}: {e}") from e


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer saved in a checkpoint (or a run directory's latest one)."""
    ckpt = resolve(path)
    if not (ckpt / TOKENIZER).exists():
        raise CheckpointError(f"{ckpt} has no {TOKENIZER}: a language model needs its tokenizer")
    return Tokenizer.load(ckpt / TOKENIZER)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The free-form metadata stored in a checkpoint's manifest (data spec, origin widths...)."""
    return _manifest(resolve(path)).get("metadata", {})


def load_train_state(path: str | Path) -> dict[str, Any]:
    """The resume state saved with a training checkpoint (checked against the manifest, then
    read with ``weights_only=True``: tensors and plain containers, never arbitrary objects)."""
    ckpt = resolve(path)
    f = ckpt / TRAIN_STATE
    if not f.exists():
        raise CheckpointError(f"{ckpt} has no {TRAIN_STATE}: it cannot be resumed")
    digest = _manifest(ckpt)["files"].get(TRAIN_STATE)
    if digest is None:
        raise CheckpointError(f"{ckpt / MANIFEST} does not list {TRAIN_STATE}: it cannot be "
                              "trusted for a resume")
    _check_file(ckpt, TRAIN_STATE, digest)
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"cannot read {f}: {e}") from e
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{f} is not a training state (no integer 'step')")
    return state
