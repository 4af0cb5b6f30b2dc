"""The ``matformer vision`` commands: train, eval, retrieve, mixnmatch.

Each takes the parsed arguments (:mod:`matformer.cli.vision` defines them) and returns
``(result, text)``, the convention of every command (:mod:`matformer.cli.common`).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from ..outputs import make_dir, write_text_atomic
from .common import Result, extra_widths, model_overrides, train_config

VISION_FILE = "vision.json"  # training-only data settings of a run (augmentation)


# ----------------------------------------------------------------------------- helpers
def _load_vit(path: Path) -> Any:
    from ..families import load_checkpoint, model_kind

    if model_kind(path) != "vit":
        raise ValueError(f"{path} is a language-model checkpoint; use the LM commands "
                         "(matformer eval / mixnmatch) for it")
    return load_checkpoint(path)[0]


def _dataset(path: Path, args: argparse.Namespace, model: Any) -> Any:
    from .. import checkpoint as ckpt
    from ..vision.data import load_images

    meta = ckpt.read_metadata(path)
    spec = args.data or meta.get("data")
    if spec is None:
        raise ValueError(f"{path} does not record its data; pass --data")
    cfg = model.config
    data = load_images(spec, cfg.image_size, cfg.channels, meta.get("val_fraction", 0.2),
                       skip_unreadable=args.skip_unreadable)
    recorded = meta.get("classes")
    if recorded is not None and list(recorded) != list(data.classes):
        raise ValueError(f"{path} was trained on the classes {list(recorded)}, but {spec!r} "
                         f"holds {list(data.classes)}: the labels would not mean the same; use "
                         "the data it was trained on")
    if data.num_classes > cfg.num_classes:
        raise ValueError(f"{spec!r} holds {data.num_classes} classes but {path} classifies "
                         f"{cfg.num_classes}: use the data it was trained on")
    return data


def _same_data(models: list[Any]) -> None:
    shapes = {m.config.image_shape for m in models}
    if len(shapes) > 1:
        raise ValueError(f"the checkpoints take different image shapes {sorted(shapes)}")


# ----------------------------------------------------------------------------- train
def _new_vit(args: argparse.Namespace, data: Any, vis: dict[str, Any]) -> tuple[Any, Any]:
    """A new run's MatViT (the preset, the image shape of ``vis``, the classes of ``data``,
    the model flags) and its TrainConfig; the same initial weights on every rank."""
    from ..train import TrainConfig
    from ..vision import MatViT, vit_preset

    over: dict[str, Any] = {"image_size": vis["image_size"], "channels": vis["channels"],
                            "num_classes": data.num_classes}
    over.update(model_overrides(args, ("patch_size", "pos_embed", "d_model", "n_layer",
                                       "n_head", "activation", "d_ff")))
    if args.d_model and not args.d_ff:
        over["d_ff"] = 4 * args.d_model
    mcfg = vit_preset(args.preset, **over)
    if args.mode == "baseline":
        mcfg = mcfg.dense(args.granularity)
    cfg = train_config(args, TrainConfig, steps=args.steps, eval_batches=max(
        1, math.ceil(len(data.val_y) / args.batch_size)))
    torch.manual_seed(cfg.seed)
    return MatViT(mcfg), cfg


def _train(args: argparse.Namespace) -> Result:
    from .. import checkpoint as ckpt
    from .. import distributed as dist
    from ..corpora import absolute_spec
    from ..runs import RunDir
    from ..train import TrainConfig, run
    from ..vision import VIT_PRESETS, VisionTask, evaluate_classifier
    from ..vision.data import EMBEDDED, load_images

    out: Path = args.out
    with dist.session(args.device) as env:
        if args.resume:
            cfg = RunDir(out).read_train_config(TrainConfig)
            try:
                vis = json.loads((out / VISION_FILE).read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot read {out / VISION_FILE}: {e}") from e
            model = _load_vit(out)
        else:
            RunDir(out).check_new(extra=(VISION_FILE,))  # never overwrite what is not ours
            dist.barrier()  # every rank has checked before rank 0 writes the first file
            args.data = absolute_spec(args.data, EMBEDDED)  # evals read the same files
            base = VIT_PRESETS[args.preset]
            size = args.image_size or base["image_size"]
            channels = args.channels or base.get("channels", 1)
            vis = {"data": args.data, "image_size": size, "channels": channels,
                   "val_fraction": args.val_fraction, "skip_unreadable": args.skip_unreadable,
                   "max_shift": size // 16 if args.max_shift is None else args.max_shift}
        data = load_images(vis["data"], vis["image_size"], vis["channels"],
                           vis["val_fraction"], skip_unreadable=vis["skip_unreadable"])
        if not args.resume:
            model, cfg = _new_vit(args, data, vis)
            if env.is_main:
                RunDir(out).mark()  # the run's first file: its folder is now a run
                write_text_atomic(out / VISION_FILE, json.dumps(vis, indent=2) + "\n")
        mcfg = model.config
        task = VisionTask(data, mcfg, max_shift=vis["max_shift"])
        trainer, wrapped, final, elapsed = run(model, task, cfg, out, env, resume=args.resume,
                                               progress=not args.no_progress)
        model = dist.unwrap(wrapped)
        rows = []
        for sub in mcfg.granularities():  # every rank runs the forwards (FSDP gathers weights)
            ev = evaluate_classifier(model, data.val_x, data.val_y, widths=sub)
            rows.append({"name": sub.name, "widths": list(sub.widths),
                         "params": model.num_params(sub),
                         "val_loss": final.get(sub.name, ev["loss"]), "accuracy": ev["accuracy"]})
        dist.reshard(wrapped)
    if not env.is_main:
        return None, ""
    result = {"out": str(out), "mode": cfg.mode, "steps": trainer.step, "seconds": elapsed,
              "data": repr(data), "config": mcfg.to_dict(), "results": rows,
              "checkpoint": str(ckpt.resolve(out))}
    lines = [f"{data}", f"trained {cfg.mode} for {trainer.step} steps in {elapsed:.1f} s; "
             f"checkpoint {result['checkpoint']}", f"{'granularity':<12}{'params':>10}"
             f"{'val loss':>10}{'top-1':>9}"]
    lines += [f"{r['name']:<12}{r['params'] / 1e3:>9.1f}K{r['val_loss']:>10.4f}"
              f"{100 * r['accuracy']:>8.2f}%" for r in rows]
    return result, "\n".join(lines)


# ----------------------------------------------------------------------------- eval
def _family(path: Path) -> str:
    from .. import checkpoint as ckpt

    p = ckpt.resolve(path)
    return (p.parent.parent.name if p.parent.name == ckpt.CHECKPOINTS else p.name) or str(p)


def _eval(args: argparse.Namespace) -> Result:
    from ..vision import evaluate_classifier
    from ..vision.evaluate import cost, plot_accuracy

    models = [_load_vit(p) for p in args.checkpoints]
    bases = [_load_vit(p) for p in args.baselines]
    _same_data(models + bases)
    data = _dataset(args.checkpoints[0], args, models[0])
    x, y = (data.val_x, data.val_y) if args.split == "val" else (data.train_x, data.train_y)

    def row(model: Any, name: str, spec: Any) -> dict[str, Any]:
        sub = model.config.submodel(spec)  # a granularity name brings its nested heads
        ev = evaluate_classifier(model, x, y, widths=sub, precision=args.precision)
        return {"name": name, "widths": list(sub.widths), **cost(model, sub),
                "accuracy": ev["accuracy"], "loss": ev["loss"]}

    labels = [s.strip() for s in args.labels.split(",")] if args.labels else [
        f"MatViT {_family(p)}" if len(m.config.names) > 1 else _family(p)
        for p, m in zip(args.checkpoints, models, strict=True)]
    if len(labels) != len(models) or len(set(labels)) != len(labels):
        raise ValueError(f"--labels {args.labels!r}: need {len(models)} distinct names, one "
                         "per checkpoint")
    families: dict[str, list[dict[str, Any]]] = {}
    for label, model in zip(labels, models, strict=True):
        cfg = model.config
        targets: dict[str, Any] = {}
        if args.granularity:
            targets[args.granularity] = args.granularity
        for w in extra_widths(args, cfg):
            targets[",".join(map(str, w))] = w
        if not targets:
            targets = {n: n for n in cfg.names}
        families[label] = [row(model, n, w) for n, w in targets.items()]
    if bases:
        families["baselines"] = [row(b, b.config.names[0], None) for b in bases]
    result = {"data": repr(data), "split": args.split, "images": len(y), "families": families}
    if args.plot:
        result["plot"] = str(plot_accuracy(families, args.plot))
    lines = [f"{data}: top-1 on {len(y)} {args.split} images"]
    head = f"{'submodel':<22}{'FFN widths':<20}{'non-emb':>9}{'MFLOPs':>8}{'top-1':>9}{'loss':>8}"
    for family, rows in families.items():
        lines += ["", family, head]
        for r in rows:
            w = r["widths"]
            ws = f"{w[0]} x{len(w)}" if len(set(w)) == 1 else ",".join(map(str, w))
            lines.append(f"{r['name']:<22}{ws:<20}{r['non_embedding_params'] / 1e3:>8.1f}K"
                         f"{r['flops_per_image'] / 1e6:>8.2f}{100 * r['accuracy']:>8.2f}%"
                         f"{r['loss']:>8.4f}")
    return result, "\n".join(lines)


# ----------------------------------------------------------------------------- retrieve
def _retrieval_rows(args: argparse.Namespace, model: Any, bases: list[Any], data: Any
                    ) -> list[dict[str, Any]]:
    """Retrieval rows of every query encoder: the MatViT granularities (with their nested
    heads), extra and Mix'n'Match widths, then the baselines against their largest's gallery;
    each with its group and, unless --no-latency, its measured batch-1 latency."""
    from ..submodels import candidates as mm
    from ..submodels.latency import forward_latency
    from ..vision.evaluate import retrieval

    cfg = model.config
    queries = [(f"MatViT {s.name}", model, s) for s in cfg.granularities()]
    groups = ["matvit"] * len(queries)
    extra = extra_widths(args, cfg)
    if args.mixnmatch:
        extra += [c.widths for c in mm.rule_candidates(cfg) if len(set(c.widths)) > 1]
    for w in dict.fromkeys(extra):
        queries.append((f"MatViT {mm.describe(cfg, w)}", model, w))
        groups.append("matvit-mixnmatch")
    rows = retrieval(model, queries, data, ks=args.k, precision=args.precision)
    if bases:
        bq = [(f"baseline {b.config.names[0]}", b, None) for b in bases]
        rows += retrieval(bases[-1], bq, data, ks=args.k, precision=args.precision)
        groups += ["baseline"] * len(bq)
        queries += bq
    for r, g in zip(rows, groups, strict=True):
        r["group"] = g
    if not args.no_latency:
        setups = [(m, w) for _, m, w in queries]
        inputs = [torch.rand(1, *m.config.image_shape,
                             generator=torch.Generator().manual_seed(0)) for m, _ in setups]
        for r, lat in zip(rows, forward_latency(setups, inputs, repeats=args.repeats),
                          strict=True):
            r.update(lat)
    return rows


def _retrieve(args: argparse.Namespace) -> Result:
    from .. import checkpoint as ckpt
    from ..submodels.report import markdown_table
    from ..vision.evaluate import plot_retrieval

    model = _load_vit(args.checkpoint)
    bases = [_load_vit(p) for p in args.baselines]
    _same_data([model, *bases])
    data = _dataset(args.checkpoint, args, model)
    rows = _retrieval_rows(args, model, bases, data)
    out = args.out or args.checkpoint / "retrieval"
    make_dir(out)
    result = {"checkpoint": str(ckpt.resolve(args.checkpoint)), "data": repr(data),
              "gallery": len(data.train_y), "queries": len(data.val_y), "ks": list(args.k),
              "baseline_gallery": str(args.baselines[-1]) if bases else None, "rows": rows}
    cols = [("name", "query encoder", "s"), ("widths", "FFN widths", "s"),
            ("non_embedding_params", "non-emb params", "k"),
            ("flops_per_image", "MFLOPs/image", "m")]
    cols += [("latency_ms", "latency ms", "ms")] if not args.no_latency else []
    cols += [("top1_accuracy", "1-NN acc", "pct")]
    cols += [(f"recall@{k}", f"recall@{k}", "pct") for k in args.k if k != 1]
    cols += [("same_encoder_top1", "own-gallery 1-NN", "pct")]
    table = markdown_table(rows, cols)
    files = {"json": out / "retrieval.json", "plot": out / "retrieval.png",
             "markdown": out / "retrieval.md"}
    result["files"] = {k: str(v) for k, v in files.items()}
    write_text_atomic(files["json"], json.dumps(result, indent=1) + "\n")
    plot_retrieval(result, files["plot"])
    gal = "MatViT XL" + (f" / baseline {bases[-1].config.names[0]}" if bases else "")
    write_text_atomic(
        files["markdown"],
        f"# Adaptive retrieval: {result['checkpoint']}\n\nGallery: {result['gallery']} "
        f"training images embedded by {gal}; queries: {result['queries']} held-out images. "
        f"Chance: {100 * rows[0]['chance']:.1f}%.\n\n![retrieval]({files['plot'].name})\n\n"
        + table)
    text = (f"{data}\ngallery: {result['gallery']} training images embedded once by {gal}; "
            f"{result['queries']} held-out queries; chance {100 * rows[0]['chance']:.1f}%\n"
            + table + f"wrote {', '.join(result['files'].values())}")
    return result, text


# ----------------------------------------------------------------------------- mixnmatch
def _mixnmatch(args: argparse.Namespace) -> Result:
    from .. import checkpoint as ckpt
    from ..submodels import candidates as mm
    from ..submodels.report import markdown_table
    from ..vision.evaluate import SWEEP_COLUMNS, select, vit_sweep, write_sweep_report

    model = _load_vit(args.checkpoint)
    bases = [(f"baseline {b.config.names[0]} ({p.name})", b)
             for p, b in zip(args.baselines, (_load_vit(p) for p in args.baselines),
                             strict=True)]
    _same_data([model, *(b for _, b in bases)])
    data = _dataset(args.checkpoint, args, model)
    cfg = model.config
    cands = mm.candidates(cfg, [p.strip() for p in args.patterns.split(",") if p.strip()],
                          widths=extra_widths(args, cfg),
                          seed=args.seed, nested=not args.any_width)
    rows = vit_sweep(model, data, cands, baselines=bases, latency=not args.no_latency,
                     repeats=args.repeats, precision=args.precision,
                     progress=not args.no_progress)
    result = {"checkpoint": str(ckpt.resolve(args.checkpoint)), "data": repr(data),
              "images": len(data.val_y), "config": cfg.to_dict(), "patterns": args.patterns,
              "candidates": rows[: len(cands)], "baselines": rows[len(cands):]}
    out = args.out or args.checkpoint / "mixnmatch"
    result["files"] = {k: str(v) for k, v in write_sweep_report(result, out).items()}
    budgets = {"max_params": args.max_params, "max_flops": args.max_flops,
               "max_latency_ms": args.max_latency_ms}
    result["selected"] = (select(result["candidates"], **budgets)
                          if any(b is not None for b in budgets.values()) else None)
    text = markdown_table(sorted(result["candidates"], key=lambda r: r["params"])
                          + result["baselines"], SWEEP_COLUMNS)
    text += (f"{len(cands)} submodels on {len(data.val_y)} held-out images of {data.name}; "
             f"wrote {', '.join(result['files'].values())}")
    if result["selected"]:
        s = result["selected"]
        text += (f"\nbest under the budget: {s['name']} (widths {','.join(map(str, s['widths']))}"
                 f"), {s['params'] / 1e3:.1f}K params, top-1 {100 * s['accuracy']:.2f}%")
    return result, text


COMMANDS = {"train": _train, "eval": _eval, "retrieve": _retrieve, "mixnmatch": _mixnmatch}
