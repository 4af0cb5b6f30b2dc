"""The named submodels a server offers: S/M/L/XL plus the Pareto front of a stored sweep.

Every entry is nothing but a tuple of per-layer FFN widths over the one loaded set of weights.
Names are ``<run>-<granularity>`` (``demo-S``) and, for Mix'n'Match configurations on the
loss-vs-parameters Pareto front of a ``mixnmatch.json``, ``<run>-mix-<size>`` (``demo-mix-3.4M``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import Submodel
from ..model import MatFormerLM

log = logging.getLogger(__name__)

AUTO = "auto"


@dataclass(frozen=True)
class Servable:
    """One servable submodel: a name and the submodel, with what is known of its cost.

    Attributes:
        name: What clients pass as ``model``.
        submodel: What runs (:class:`~matformer.config.Submodel`).
        params: Parameter count (embedding included).
        kind: ``granularity`` (S/M/L/XL) or ``mixnmatch`` (a sweep's Pareto-front config).
        description: The widths in the paper's notation (``"4xM+2xL"``) or the granularity.
        latency: Measured batch-1 latency in ms (``prefill_ms``, ``decode_ms``), if known.
        val_loss: Validation loss from the sweep, if known.
    """

    name: str
    submodel: Submodel
    params: int
    kind: str
    description: str
    latency: dict[str, float] = field(default_factory=dict)
    val_loss: float | None = None

    @property
    def decode_ms(self) -> float | None:
        return self.latency.get("decode_ms")

    def card(self) -> dict[str, Any]:
        """The ``/v1/models`` entry (OpenAI fields plus ours)."""
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "matformer",
                "kind": self.kind, "description": self.description,
                "widths": list(self.submodel.widths),
                "params": self.params, "latency_ms": self.latency or None,
                "val_loss": self.val_loss}


def run_name(path: str | Path) -> str:
    """The run's name for a checkpoint path: ``runs/demo`` and
    ``runs/demo/checkpoints/step_000100`` are both ``demo``."""
    p = Path(path).resolve()
    if re.fullmatch(r"step_\d+", p.name) and p.parent.name == "checkpoints":
        p = p.parent.parent
    return p.name or "model"


def size_label(params: int) -> str:
    """``3.4M``, ``19.6K``: a parameter count in a submodel name."""
    return f"{params / 1e6:.1f}M" if params >= 1e6 else f"{params / 1e3:.1f}K"


def build_registry(model: MatFormerLM, run: str, sweep: dict[str, Any] | None = None
                   ) -> list[Servable]:
    """S/M/L/XL (every granularity of the config), then the sweep's Pareto-front Mix'n'Match
    configs that are not a granularity already, ordered by parameters.

    Sweep rows lend their measured latency and loss to matching widths; depth rows (a layer's
    FFN or attention skipped) are left out. A sweep made on another model shape is refused
    (ValueError naming the mismatch).
    """
    cfg = model.config
    # Depth rows of a ``--depth`` sweep (a layer's FFN or attention skipped) are not FFN-width
    # submodels: the registry serves widths only, and a depth-attention row shares its widths
    # with a granularity, whose numbers it must not lend.
    rows = [r for r in (sweep["candidates"] if sweep else [])
            if not r.get("heads") and 0 not in r["widths"]]
    for r in rows:
        if len(r["widths"]) != cfg.n_layer or any(
                not 1 <= w <= d for w, d in zip(r["widths"], cfg.ffn_dims, strict=True)):
            raise ValueError(f"sweep row {r.get('name')!r} has widths {r['widths']}, which do "
                             f"not fit this model (FFN dims {list(cfg.ffn_dims)})")
    by_widths = {tuple(r["widths"]): r for r in rows}

    def known(widths: tuple[int, ...]) -> dict[str, Any]:
        r = by_widths.get(widths, {})
        lat = {k: float(r[k]) for k in ("prefill_ms", "decode_ms") if k in r}
        return {"latency": lat, "val_loss": r.get("val_loss")}

    subs = [Servable(f"{run}-{g.name}", g, cfg.num_params(g), "granularity", g.name,
                     **known(g.widths)) for g in cfg.granularities()]
    taken = {s.submodel.widths for s in subs}
    names = {s.name for s in subs}
    for r in sorted(rows, key=lambda r: r["params"]):
        w = tuple(r["widths"])
        if not r.get("pareto_params") or w in taken:
            continue
        name = f"{run}-mix-{size_label(r['params'])}"
        if name in names:  # two configs of (nearly) the same size: tell them apart
            name = f"{name}-{r['name']}"
        sub = cfg.submodel(w)
        subs.append(Servable(name, sub, cfg.num_params(sub), "mixnmatch", r["name"], **known(w)))
        taken.add(w)
        names.add(name)
    return subs


def with_measured_latency(model: MatFormerLM, subs: Sequence[Servable], *, repeats: int = 5
                          ) -> list[Servable]:
    """Measure batch-1 prefill/decode latency of the submodels that have none (interleaved)."""
    from ..submodels.latency import lm_latency

    todo = [i for i, s in enumerate(subs) if s.decode_ms is None]
    if not todo:
        return list(subs)
    log.info("measuring the latency of %d submodels", len(todo))
    lat = lm_latency([(model, subs[i].submodel) for i in todo], prefill_len=64, repeats=repeats)
    out = list(subs)
    for i, row in zip(todo, lat, strict=True):
        out[i] = replace(out[i], latency={k: round(row[k], 4)
                                          for k in ("prefill_ms", "decode_ms")})
    return out
