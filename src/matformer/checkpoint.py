"""Checkpoint directories: written atomically, verified on load, resumable.

A checkpoint is a directory holding ``config.json`` (the ModelConfig; a ``"kind"`` field says
which model it describes: absent or ``"lm"`` for the language model, ``"vit"`` for the vision
encoder), ``model.safetensors``, ``tokenizer.json`` (language models only),
``manifest.json`` (sha256 of every file, so corruption is caught at load
time with a clear message) and, for training runs, ``train_state.pt`` (optimizer, step).
This module knows no model family: :mod:`matformer.families` picks the class from ``kind``.

A training run directory keeps several: ``checkpoints/step_000100/`` ... plus a ``latest`` file
naming the newest. Every checkpoint is first written to a temporary directory beside its final
place and then renamed, and ``latest`` is replaced with ``os.replace``; a crash at any moment
leaves the previous good checkpoint where it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

from .config import ModelConfig
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

CONFIG, WEIGHTS, TOKENIZER, MANIFEST, TRAIN_STATE = (
    "config.json", "model.safetensors", "tokenizer.json", "manifest.json", "train_state.pt")
LATEST, CHECKPOINTS = "latest", "checkpoints"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or corrupt."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(path: str | Path, model: nn.Module, tokenizer: Tokenizer | None,
                    *,
                    train_state: dict[str, Any] | None = None,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory atomically; an existing one at ``path`` is replaced.

    Args:
        path: Destination directory.
        model: The model (its ``config`` is saved beside the weights).
        tokenizer: Saved as ``tokenizer.json``; None for models without one (vision).
        train_state: Optional resume state (optimizer state dict, step, ...), saved with
            ``torch.save``.
        metadata: Optional JSON-serialisable facts stored in the manifest (e.g. the widths an
            extracted model came from).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        model.config.save(tmp / CONFIG)
        # save_model de-duplicates tied tensors (embedding and head) and writes contiguous copies.
        save_model(model, str(tmp / WEIGHTS))
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER)
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {"files": {name: _sha256(tmp / name) for name in files},
                    "metadata": metadata or {}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved checkpoint %s", path)
    return path


def resolve(path: str | Path) -> Path:
    """The checkpoint directory behind ``path``: itself, or a run directory's latest one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if (path / CONFIG).exists():
        return path
    latest = path / LATEST
    if latest.exists():
        target = path / latest.read_text().strip()
        if not (target / CONFIG).exists():
            raise CheckpointError(f"{latest} points to {target}, which is not a checkpoint")
        return target
    raise CheckpointError(f"{path} is neither a checkpoint directory (no {CONFIG}) nor a training "
                          f"run directory (no {LATEST} file)")


def verify(path: Path) -> dict[str, Any]:
    """Check every file against the manifest; return the manifest."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(f"{path} has no {MANIFEST}: the checkpoint is incomplete")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{manifest_path} is corrupt: {e}") from e
    for name, digest in manifest["files"].items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"{path} is missing {name}")
        if _sha256(f) != digest:
            raise CheckpointError(f"{f} does not match its checksum: the file is corrupt or "
                                  f"truncated; use an earlier checkpoint")
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
    f = resolve(path) / MANIFEST
    try:
        return json.loads(f.read_text()).get("metadata", {})
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {f}: {e}") from e


def load_train_state(path: str | Path) -> dict[str, Any]:
    """The resume state saved with a training checkpoint."""
    ckpt = resolve(path)
    f = ckpt / TRAIN_STATE
    if not f.exists():
        raise CheckpointError(f"{ckpt} has no {TRAIN_STATE}: it cannot be resumed")
    return torch.load(f, map_location="cpu", weights_only=True)


def save_run_checkpoint(run_dir: Path, step: int, model: nn.Module,
                        tokenizer: Tokenizer | None,
                        train_state: dict[str, Any], keep: int = 2,
                        metadata: dict[str, Any] | None = None) -> Path:
    """Save ``checkpoints/step_NNNNNN`` in a run directory, point ``latest`` at it, prune old."""
    rel = Path(CHECKPOINTS) / f"step_{step:06d}"
    path = save_checkpoint(run_dir / rel, model, tokenizer, train_state=train_state,
                           metadata=metadata)
    tmp = run_dir / f".{LATEST}.tmp"
    tmp.write_text(f"{rel.as_posix()}\n")
    os.replace(tmp, run_dir / LATEST)
    done = sorted(p for p in (run_dir / CHECKPOINTS).glob("step_*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path
