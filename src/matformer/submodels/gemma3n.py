"""Slice a Gemma 3n checkpoint into a smaller one: per-layer FFN widths and skipped layers.

Gemma 3n is a MatFormer: each layer's FFN is nested, so the first ``w`` hidden units (rows of
``gate_proj``/``up_proj``, columns of ``down_proj``) form a smaller FFN, and whole layers can be
skipped. A slice is ``widths`` (one per *kept* layer) plus ``skip`` (original layer indices).
:func:`slice_hf` writes it as an ordinary transformers folder, reading the source shards one
tensor at a time (only the kept part of each) and writing one output shard per input shard, so
memory stays near one shard. The multimodal checkpoint's vision and audio towers are copied
untouched; only the language model is sliced.

Every rule of a valid slice is checked by :func:`plan_slice`, with a :class:`SliceError` that
names it (:data:`RULES`):

* ``one-width-per-kept-layer``: ``len(widths) == num_hidden_layers - len(skip)``;
* ``skip-in-range``: skipped indices exist, are distinct, and at least one layer is kept;
* ``width-in-range``: ``1 <= widths[j] <=`` the source's ``intermediate_size`` of that layer;
* ``kv-producers-kept``: the last layer of each attention type before the KV-sharing range
  stores the keys/values the shared layers read (18 and 19 in E4B), so it may not be skipped.

The new config: ``intermediate_size`` becomes the per-layer list, ``layer_types`` and
``activation_sparsity_pattern`` keep the kept layers' entries, ``num_kv_shared_layers`` drops by
the number of skipped layers inside the sharing range; per-layer embeddings
(``embed_tokens_per_layer`` columns, ``per_layer_model_projection`` rows) keep the kept layers'
blocks, and layers are renumbered 0..n-1.

Google's slicing-config table (a CSV with columns name, # Layers, # Effective Params (B), MMLU
PT accuracy, FFN Hidden Dims, Layers Skipped) writes widths as Python-like expressions such as
``[2_048 * 4, 2_048 * 8]``; :func:`parse_int_list` evaluates those without ``eval``.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..outputs import atomic_file, atomic_output, check_output, write_text_atomic

log = logging.getLogger(__name__)

RULES = {
    "one-width-per-kept-layer": "the width list holds one entry per kept layer",
    "skip-in-range": "skipped layers are distinct indices of existing layers, and one is kept",
    "width-in-range": "each width is between 1 and the source layer's intermediate_size",
    "kv-producers-kept": "the last KV-producing layer of each attention type (the layers the "
                         "KV-shared layers read) may not be skipped",
    "table-layer-count": "a config-table row's '# Layers' equals the number of kept layers",
}
SLICE_INFO = "matformer_slice.json"
_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")


class SliceError(ValueError):
    """A slice breaks a Gemma 3n slicing rule; the message starts with the rule's name."""

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(f"[{rule}] {detail} (rule: {RULES[rule]})")
        self.rule = rule


# ----------------------------------------------------------------------------- config facts
def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language-model part of a Gemma 3n config dict (``text_config`` when multimodal)."""
    return config.get("text_config", config)


def _per_layer(value: Any, n: int, default: list[Any], what: str) -> list[Any]:
    if value is None:
        return default
    if isinstance(value, list | tuple):
        if len(value) != n:
            raise ValueError(f"config {what} has {len(value)} entries for {n} layers")
        return list(value)
    return [value] * n


def layer_facts(text: dict[str, Any]) -> dict[str, list[Any]]:
    """Per-layer ``intermediate_size``, ``layer_types`` and ``activation_sparsity_pattern`` of a
    text config, expanded the way ``Gemma3nTextConfig`` expands its defaults."""
    n = int(text["num_hidden_layers"])
    types = [("full_attention" if (i + 1) % 5 == 0 else "sliding_attention") for i in range(n)]
    sparse = 10 if n > 10 else 0
    return {
        "intermediate_size": [int(v) for v in _per_layer(text.get("intermediate_size", 16_384),
                                                          n, [], "intermediate_size")],
        "layer_types": _per_layer(text.get("layer_types"), n, types, "layer_types"),
        "activation_sparsity_pattern": [float(v) for v in _per_layer(
            text.get("activation_sparsity_pattern"), n, [0.95] * sparse + [0.0] * (n - sparse),
            "activation_sparsity_pattern")],
    }


def kv_producers(text: dict[str, Any]) -> list[int]:
    """Layers whose keys/values the KV-shared layers reuse: for each attention type, the last
    layer of that type before the sharing range (none when nothing is shared)."""
    n, shared = int(text["num_hidden_layers"]), int(text.get("num_kv_shared_layers", 0) or 0)
    if shared <= 0:
        return []
    first = n - shared
    types = layer_facts(text)["layer_types"]
    out = []
    for kind in sorted(set(types[first:])):
        before = [i for i in range(first) if types[i] == kind]
        if before:
            out.append(before[-1])
    return sorted(out)


# ----------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class SlicePlan:
    """A checked slice: ``widths`` of the kept layers, ``skip`` (original indices, sorted)."""

    num_layers: int
    widths: tuple[int, ...]
    skip: tuple[int, ...] = ()

    @property
    def kept(self) -> tuple[int, ...]:
        """Original indices of the kept layers, in order (new index = position here)."""
        return tuple(i for i in range(self.num_layers) if i not in self.skip)

    @property
    def layer_widths(self) -> tuple[int, ...]:
        """One width per *original* layer, 0 for a skipped one (what the in-place sweep runs)."""
        it = iter(self.widths)
        return tuple(0 if i in self.skip else next(it) for i in range(self.num_layers))

    @classmethod
    def from_layer_widths(cls, widths: Sequence[int]) -> SlicePlan:
        """The inverse of :attr:`layer_widths` (unchecked; pass it to :func:`plan_slice`)."""
        return cls(len(widths), tuple(w for w in widths if w), tuple(
            i for i, w in enumerate(widths) if not w))


def plan_slice(text: dict[str, Any], widths: Sequence[int], skip: Sequence[int] = ()
               ) -> SlicePlan:
    """Check a slice of the text config ``text`` against every rule; return its plan."""
    n = int(text["num_hidden_layers"])
    skip_list = [int(i) for i in skip]
    bad = [i for i in skip_list if not 0 <= i < n]
    if bad or len(set(skip_list)) != len(skip_list) or len(skip_list) >= n:
        raise SliceError("skip-in-range", f"skip {skip_list} for a {n}-layer model "
                         f"(out of range: {bad}; valid indices 0..{n - 1})")
    kept = n - len(skip_list)
    widths = [int(w) for w in widths]
    if len(widths) != kept:
        raise SliceError("one-width-per-kept-layer", f"got {len(widths)} widths for {kept} "
                         f"kept layers ({n} layers - {len(skip_list)} skipped)")
    sizes = layer_facts(text)["intermediate_size"]
    kept_idx = [i for i in range(n) if i not in skip_list]
    for j, (i, w) in enumerate(zip(kept_idx, widths, strict=True)):
        if not 1 <= w <= sizes[i]:
            raise SliceError("width-in-range", f"width {w} for kept layer {j} (source layer "
                             f"{i}) is outside 1..{sizes[i]}")
    lost = sorted(set(skip_list) & set(kv_producers(text)))
    if lost:
        raise SliceError("kv-producers-kept", f"cannot skip layer(s) {lost}: the KV-shared "
                         f"layers read their keys/values (producers: {kv_producers(text)})")
    return SlicePlan(n, tuple(widths), tuple(sorted(skip_list)))


def sliced_text_config(text: dict[str, Any], plan: SlicePlan) -> dict[str, Any]:
    """The text config of the slice (a new dict; ``text`` is not changed)."""
    facts, kept = layer_facts(text), plan.kept
    n, shared = plan.num_layers, int(text.get("num_kv_shared_layers", 0) or 0)
    out = dict(text)
    out.update(
        num_hidden_layers=len(kept), intermediate_size=list(plan.widths),
        layer_types=[facts["layer_types"][i] for i in kept],
        activation_sparsity_pattern=[facts["activation_sparsity_pattern"][i] for i in kept],
        num_kv_shared_layers=shared - sum(1 for i in plan.skip if i >= n - shared))
    return out


# ----------------------------------------------------------------------------- config table
_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.FloorDiv: lambda a, b: a // b}


def _value(node: ast.AST, text: str) -> int | list[int]:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.List | ast.Tuple):
        out = [_value(e, text) for e in node.elts]
        if not all(isinstance(v, int) for v in out):
            raise ValueError(f"{text!r}: nested lists are not allowed")
        return out  # type: ignore[return-value]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        v = _value(node.operand, text)
        if isinstance(v, int):
            return -v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _value(node.left, text), _value(node.right, text)
        kinds = (isinstance(a, int), isinstance(b, int))
        if kinds == (True, True) or (isinstance(node.op, ast.Add) and kinds == (False, False)) \
                or (isinstance(node.op, ast.Mult) and kinds in ((True, False), (False, True))):
            if kinds in ((True, False), (False, True)) and (a if kinds[0] else b) > 100_000:
                raise ValueError(f"{text!r}: list repetition too large")
            return _BINOPS[type(node.op)](a, b)
    raise ValueError(f"{text!r}: only integers, lists, + - * // and parentheses are allowed "
                     f"(found {ast.dump(node)[:60]})")


def parse_int_list(text: str) -> list[int]:
    """A list of ints from a Python-like expression, safely (no ``eval``).

    Accepts what Google's slicing table writes (``[2_048 * 4, 2_048 * 8]``), list repetition and
    concatenation (``[8192] * 20 + [16384] * 15``), a bare comma list (``8192,8192``), a single
    int, or an empty string/``[]`` (no layers).
    """
    text = (text or "").strip()
    if not text or text.lower() in ("none", "nan"):
        return []
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"{text!r} is not a list expression ({e.msg})") from e
    value = _value(tree, text)
    return [value] if isinstance(value, int) else list(value)


def read_config_table(path: str | Path) -> list[dict[str, str]]:
    """Rows of a slicing-config CSV; header names are matched case- and space-insensitively."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in rows]


def table_slice(path: str | Path, name: str) -> tuple[list[int], list[int], dict[str, str]]:
    """(widths, skipped layers, the row) of the row called ``name`` in a config table."""
    rows = read_config_table(path)
    for row in rows:
        if row.get("name") == name:
            for col in ("ffn hidden dims", "layers skipped"):
                if col not in row:
                    raise ValueError(f"{path}: no column {col!r} (have {sorted(row)})")
            widths = parse_int_list(row["ffn hidden dims"])
            skip = parse_int_list(row["layers skipped"])
            layers = row.get("# layers", "")
            if layers.isdigit() and int(layers) != len(widths):
                raise SliceError("table-layer-count", f"row {name!r} says {layers} layers but "
                                 f"lists {len(widths)} FFN widths")
            return widths, skip, row
    names = [r.get("name", "?") for r in rows]
    raise ValueError(f"{path}: no row named {name!r}; rows: {names}")


# ----------------------------------------------------------------------------- streaming
def _shards(folder: Path) -> tuple[list[str], dict[str, str] | None]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted(set(weight_map.values())), weight_map
    if (folder / "model.safetensors").exists():
        return ["model.safetensors"], None
    raise FileNotFoundError(f"{folder} has no model.safetensors (or its index)")


def _text_prefix(names: Sequence[str]) -> str:
    """The prefix of the language model's tensors (``model.`` or ``model.language_model.``)."""
    found = {n[: -len("embed_tokens_per_layer.weight")] for n in names
             if n.endswith("embed_tokens_per_layer.weight")}
    if len(found) != 1:
        raise ValueError(f"expected one Gemma 3n language model (embed_tokens_per_layer), "
                         f"found {len(found)}: is this a Gemma 3n checkpoint?")
    return found.pop()


def _blocks(plan: SlicePlan, size: int) -> list[tuple[int, int]]:
    """Kept layers' ranges in a (layers * size) axis, adjacent ones merged."""
    out: list[tuple[int, int]] = []
    for i in plan.kept:
        a, b = i * size, (i + 1) * size
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _sliced(name: str, rest: str, part: Any, plan: SlicePlan, new_index: dict[int, int],
            hpl: int) -> tuple[str, torch.Tensor] | None:
    """(new name, tensor) of one language-model tensor, or None if its layer is skipped.
    ``rest`` is the name without the language-model prefix; ``part`` a safetensors slice."""
    m = _LAYER.match(rest)
    if m:
        i = int(m.group(1))
        if i not in new_index:
            return None
        j, leaf = new_index[i], m.group(2)
        w = plan.widths[j]
        if leaf in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            t = part[:w]
        elif leaf == "mlp.down_proj.weight":
            t = part[:, :w]
        else:
            t = part[:]
        return name[: len(name) - len(rest)] + f"layers.{j}.{leaf}", t
    if rest == "embed_tokens_per_layer.weight":
        return name, torch.cat([part[:, a:b] for a, b in _blocks(plan, hpl)], dim=1)
    if rest == "per_layer_model_projection.weight":
        return name, torch.cat([part[a:b] for a, b in _blocks(plan, hpl)], dim=0)
    return name, part[:]


@contextmanager
def _open_shard(path: Path) -> Iterator[Any]:
    """``safe_open`` of one weights file; a damaged file (truncated, not safetensors) is a
    ValueError naming it, not a library traceback."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read weights {path}: {e} (a damaged or truncated "
                         "file?)") from e


def _sliced_shard(path: Path, prefix: str, plan: SlicePlan, new_index: dict[int, int],
                  hpl: int) -> dict[str, torch.Tensor]:
    """The kept part of every tensor of one source shard, under its new name; tensors outside
    the language model (vision/audio towers) untouched."""
    out: dict[str, torch.Tensor] = {}
    with _open_shard(path) as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            rest = name[len(prefix):] if name.startswith(prefix) else None
            if rest is None:
                out[name] = f.get_tensor(name)  # vision/audio towers: untouched
                continue
            got = _sliced(name, rest, f.get_slice(name), plan, new_index, hpl)
            if got is not None:
                out[got[0]] = got[1].contiguous()
    return out


def _write_shards(src: Path, tmp: Path, files: Sequence[str], prefix: str, plan: SlicePlan,
                  hpl: int) -> tuple[int, int]:
    """Stream each source shard into its sliced namesake in ``tmp`` (plus the index when the
    source has one or several shards); returns (stored bytes, stored parameters)."""
    from safetensors.torch import save_file

    new_index = {i: j for j, i in enumerate(plan.kept)}
    weight_map: dict[str, str] = {}
    total = params = 0
    for fname in files:
        out = _sliced_shard(src / fname, prefix, plan, new_index, hpl)
        for name, t in out.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
            params += t.numel()
        if not out:  # every tensor of this shard belonged to skipped layers
            continue
        with atomic_file(tmp / fname) as f:
            save_file(out, str(f), metadata={"format": "pt"})
        log.info("wrote %s (%d tensors)", fname, len(out))
        del out
    if len(files) > 1 or (src / "model.safetensors.index.json").exists():
        write_text_atomic(tmp / "model.safetensors.index.json", json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(
                weight_map.items()))}, indent=2) + "\n")
    return total, params


def _copy_side_files(src: Path, tmp: Path, files: Sequence[str]) -> None:
    """Copy every file of ``src`` that is neither weights, config nor slice info."""
    for p in src.iterdir():  # tokenizer, processor, generation config, chat template ...
        if p.is_file() and p.name not in files and p.name not in (
                "config.json", "model.safetensors.index.json", SLICE_INFO):
            shutil.copy2(p, tmp / p.name)


def slice_hf(src: str | Path, dst: str | Path, widths: Sequence[int],
             skip: Sequence[int] = ()) -> dict[str, Any]:
    """Write the slice (``widths`` of the kept layers, ``skip``) of the Gemma 3n folder ``src``
    to ``dst``, a new transformers folder; returns facts about it.

    Shards are streamed: each source tensor is read (only its kept part) and written to the
    output shard of the same name, so memory stays near one shard. Tokenizer, processor and
    generation files are copied. ``dst`` is written beside itself first and then renamed, so a
    failure never leaves a half-written folder there.
    """
    src, dst = Path(src), Path(dst)
    check_output(dst, sources=[src])  # before reading anything
    config = json.loads((src / "config.json").read_text())
    text = text_config(config)
    plan = plan_slice(text, widths, skip)
    hpl = int(text.get("hidden_size_per_layer_input", 256))
    files, _ = _shards(src)
    prefix = _prefix_of(src, files)
    with atomic_output(dst, sources=[src]) as tmp:
        total, params = _write_shards(src, tmp, files, prefix, plan, hpl)
        new_text = sliced_text_config(text, plan)
        config = {**config, "text_config": new_text} if "text_config" in config else new_text
        write_text_atomic(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        _copy_side_files(src, tmp, files)
        info = {"source": str(src), "widths": list(plan.widths), "skipped_layers": list(plan.skip),
                "kept_layers": list(plan.kept), "num_hidden_layers": len(plan.kept),
                "num_kv_shared_layers": new_text["num_kv_shared_layers"],
                "stored_params": params, "stored_bytes": total}
        write_text_atomic(tmp / SLICE_INFO, json.dumps(info, indent=2) + "\n")
    info["out"] = str(dst)
    return info


def _prefix_of(src: Path, files: Sequence[str]) -> str:
    """The language-model prefix, from the index when there is one, else from the one file."""
    _, weight_map = _shards(src)
    if weight_map is not None:
        return _text_prefix(list(weight_map))
    with _open_shard(src / files[0]) as f:
        return _text_prefix(list(f.keys()))
