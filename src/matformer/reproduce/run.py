"""The whole reproduction in order: data, then per seed every training run, evaluation,
consistency and speculative decoding, the Mix'n'Match sweep (seed 0) and the report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..outputs import make_dir, write_text_atomic
from .plan import ReproConfig
from .report import write_all
from .stages import (
    GRANULARITIES,
    Progress,
    Stages,
    consistency,
    evaluate_run,
    load_run,
    mixnmatch,
    prepare,
    speculative,
    train_run,
    val_batches,
)


def reproduce(rc: ReproConfig, out: str | Path, *, device: str = "cpu",
              progress: Progress | None = None, command: str = "",
              scaling: bool = False) -> dict[str, Any]:
    """Run (or finish) a reproduction into ``out``; returns the results written there.

    ``out/config.json`` fixes the settings: a rerun with other settings is refused (start a
    new ``out`` instead), with the same ones it skips finished stages. More ``seeds`` than a
    finished run had are allowed: only the new seeds are trained.
    """
    out = Path(out)
    cfg_file = out / "config.json"
    if out.is_dir() and any(out.iterdir()) and not cfg_file.is_file():
        raise ValueError(f"{out} is not empty and holds no reproduction (no {cfg_file.name}); "
                         "nothing was changed: choose a new or empty output directory")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; choose a directory")
    make_dir(out)
    if cfg_file.is_file():
        old = ReproConfig.from_dict(json.loads(cfg_file.read_text()))
        if {**old.to_dict(), "seeds": 0} != {**rc.to_dict(), "seeds": 0}:
            raise ValueError(f"{out} holds a reproduction with other settings ({cfg_file}); "
                             "rerun it with the same ones to resume, or choose a new output directory")
    write_text_atomic(cfg_file, json.dumps(rc.to_dict(), indent=1) + "\n")
    stages = Stages(out / "stages", progress)
    t0 = time.perf_counter()
    tokenizer, data = prepare(rc, out)
    eval_b = val_batches(rc, data, rc.eval_batches)
    cons_b = eval_b[: rc.consistency_batches]
    runs = rc.runs()
    for seed in range(rc.seeds):
        for spec in runs:
            run_dir = out / "runs" / f"seed{seed}" / spec.name
            stages.run(f"train-seed{seed}-{spec.name}", lambda s=spec, d=run_dir, sd=seed:
                       train_run(s, rc, tokenizer, data, sd, d, device))
        models = {s.name: load_run(out / "runs" / f"seed{seed}" / s.name, device) for s in runs}
        for spec in runs:
            stages.run(f"eval-seed{seed}-{spec.name}",
                       lambda m=models[spec.name]: evaluate_run(m, eval_b, rc))
        matlms = {r: models[r] for r in rc.recipes}
        bases = {g: models[f"base-{g}"] for g in GRANULARITIES}
        stages.run(f"consistency-seed{seed}",
                   lambda m=matlms, b=bases: consistency(m, b, cons_b))
        stages.run(f"speculative-seed{seed}",
                   lambda m=matlms, b=bases: speculative(m, b, rc, data))
        if seed == 0:
            stages.run("mixnmatch", lambda m=matlms, b=bases: mixnmatch(
                m["sample"], b, eval_b[: rc.sweep_batches], rc, out / "mixnmatch"))
    if scaling:  # the seed-0 models at two narrower sizes, and the fits
        from .scaling import scaling as study

        def train(spec: Any, c: ReproConfig, d: Path) -> dict[str, Any]:
            return train_run(spec, c, tokenizer, data, 0, d, device)

        def evaluate(c: ReproConfig, d: Path) -> dict[str, Any]:
            return evaluate_run(load_run(d, device), eval_b, c)

        result = study(rc, out, stages, train, evaluate)  # its runs are stages of their own
        stages.run("scaling-fit", lambda: dict(result))
    return write_all(rc, out, stages, device=device, command=command,
                     seconds=time.perf_counter() - t0)
