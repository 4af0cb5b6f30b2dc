"""``matformer slice-hf | sweep-hf | elastify``: bring your own model.

Slice a Gemma 3n checkpoint for a budget (picked on your text and device by an in-place sweep),
or make a pretrained dense Llama-family model elastic. Each command returns ``(result, text)``
(see :mod:`matformer.cli.common`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..elastify import DEFAULT_CONTEXT
from ..recipe import TEACHERS, TRAIN_ONLY
from .args import NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, RATIOS, Number
from .common import Result, add_budgets, add_command, add_training_args, train_config

EXAMPLES = """\
examples:
  matformer slice-hf hf/gemma-3n-E4B hf/e4b-slice --widths "[8192] * 20 + [16384] * 15"
  matformer slice-hf hf/gemma-3n-E4B hf/e2b-like --widths "[8192] * 30" \\
      --skip-layers "[20, 21, 22, 23, 24]"
  matformer slice-hf hf/gemma-3n-E4B hf/e2.98b --config-table configs.csv \\
      --config-name "Config for E2.98B (block-level)"
  matformer sweep-hf hf/gemma-3n-E4B --data my_text.txt --out runs/e4b-sweep \\
      --skip-set "[20, 21, 22, 23, 24]" --config-table configs.csv --max-params 3e9 \\
      --slice-to hf/e4b-for-me
  matformer elastify hf/my-llama --out runs/elastic --data my_text.txt --steps 300
  matformer elastify SmolLM2-135M-Instruct.Q4_1.gguf --out runs/smol --data shakespeare \\
      --eval-data bible --distill 0.5           # a GGUF file; forgetting measured on the Bible
"""


def _add_slice(p: argparse.ArgumentParser) -> None:
    p.add_argument("--widths", help="FFN width of every kept layer: a list expression such as "
                   "'[2_048 * 4] * 30' or '8192,8192,...'")
    p.add_argument("--skip-layers", default="", help="original indices of layers to drop, "
                   "e.g. '[20, 21, 22, 23, 24]'")
    p.add_argument("--config-table", type=Path, help="a slicing-config CSV (Google's columns: "
                   "name, # Layers, ..., FFN Hidden Dims, Layers Skipped)")
    p.add_argument("--config-name", help="the row of --config-table to use")


def add_slice_hf(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "slice-hf", "slice a Gemma 3n checkpoint: per-layer FFN widths, skipped layers",
        EXAMPLES, description="Write a smaller Gemma 3n transformers folder: each kept layer's "
        "FFN cut to its first units, the listed layers dropped, the config rebuilt "
        "(intermediate_size list, layer_types, activation_sparsity_pattern, "
        "num_kv_shared_layers, per-layer embeddings). Shards are streamed (memory near one "
        "shard); a multimodal checkpoint keeps its vision and audio towers untouched.")
    p.add_argument("src", type=Path, help="Gemma 3n folder (text or multimodal)")
    p.add_argument("dst", type=Path, help="new folder")
    _add_slice(p)
    p.add_argument("--check", action="store_true", help="load both with transformers and "
                   "compare the slice's logits with the source run in place as the same slice "
                   "(text checkpoints)")
    p.add_argument("--json", action="store_true")


def add_sweep_hf(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "sweep-hf", "pick a Gemma 3n slice for your text and device (in-place sweep)",
        EXAMPLES, description="Evaluate candidate slices of a Gemma 3n model in place (no "
        "slice written): held-out loss on --data, parameters, measured prefill latency; write "
        "mixnmatch.json/.png/.md with the Pareto fronts; with a budget pick the best slice, and "
        "with --slice-to write it.")
    p.add_argument("src", type=Path, help="Gemma 3n folder")
    p.add_argument("--data", help="your text: a file, directory, glob or an embedded corpus "
                   "name (required unless --sweep)")
    p.add_argument("--out", type=Path, help="report directory (required unless --sweep)")
    p.add_argument("--sweep", type=Path, help="pick from this stored mixnmatch.json (or its "
                   "directory) instead of sweeping again")
    p.add_argument("--ratios", type=RATIOS, default=(0.5, 0.625, 0.75, 0.875, 1.0),
                   help="uniform FFN fractions to try (default 0.5,0.625,0.75,0.875,1)")
    p.add_argument("--no-mixed", action="store_true",
                   help="no per-layer mixes (the paper's rule over --ratios)")
    p.add_argument("--skip-set", action="append", default=[],
                   help="a set of layers to skip, tried with every ratio (repeatable)")
    p.add_argument("--config-table", type=Path, help="also try every row of this table that "
                   "fits the model")
    p.add_argument("--seq-len", type=POSITIVE_INT, default=128)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=4)
    p.add_argument("--batches", type=NON_NEGATIVE_INT, default=8, help="held-out batches (0: all)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--repeats", type=POSITIVE_INT, default=5, help="latency rounds (median)")
    p.add_argument("--prefill-len", type=POSITIVE_INT, default=128, help="latency: prompt tokens")
    p.add_argument("--no-progress", action="store_true")
    add_budgets(p, params="text-model parameters, e.g. 3e9")
    p.add_argument("--slice-to", type=Path, help="write the picked slice to this folder")
    p.add_argument("--json", action="store_true")


GUARD_NATS = 0.25  # elastify --max-loss-increase default

ELASTIFY_WHY = """\
why these defaults differ from `matformer train`: elastify continues training a pretrained
model instead of starting from noise. Its weights already sit near a good minimum, so the
learning rate is small (1e-4, not 3e-3: a from-scratch rate took SmolLM2-135M's validation
loss from 4.06 to 7.35 nats in five steps), weight decay is off (it would pull the pretrained
weights towards zero) and windows are 512 tokens (a model's 8,192-token context makes each step
far longer on a CPU). Distillation from the original (--distill W: the imported model, frozen,
teaches every granularity) keeps the full model what it was while the smaller ones learn to
imitate it; on SmolLM2 it kept more than cross-entropy on text the run never saw, at 1.85x the
step time (docs/byom.md).
--eval-data measures what the model forgets on text it does not train on, and the guard stops
a run whose full model gets worse on the training corpus (--max-loss-increase).
"""


def add_elastify(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "elastify", "make a pretrained dense Llama-family model elastic (S/M/L/XL)",
        EXAMPLES + "\n" + ELASTIFY_WHY, description="Import a Hugging Face Llama/Arcee folder "
        "or a Llama GGUF file, reorder each FFN's units by importance on calibration text (the "
        "full model's outputs do not change), give it granularities and continue training in "
        "sample mode so every granularity becomes good. The run directory is an ordinary "
        "checkpoint; elastify.json in it holds the loss of every granularity naively sliced, "
        "reordered and trained, on the training corpus and on --eval-data.")
    p.add_argument("folder", type=Path, help="Hugging Face folder (Llama or Arcee) or a .gguf "
                   "file (llama architecture, any quantisation transformers reads)")
    p.add_argument("--out", type=Path, required=True, help="run directory (created)")
    p.add_argument("--data", required=True, help="corpus: embedded name, file, dir or glob")
    p.add_argument("--eval-data", help="a second corpus the run does not train on, evaluated "
                   "before and after (forgetting shows there), e.g. bible when training on "
                   "shakespeare")
    p.add_argument("--val-fraction", type=Number(float, low=0, high=0.5, low_open=True), default=0.1)
    p.add_argument("--ratios", type=RATIOS, default=(0.125, 0.25, 0.5, 1.0),
                   help="granularities as fractions of d_ff (default S/M/L/XL)")
    p.add_argument("--names", default="S,M,L,XL")
    p.add_argument("--no-reorder", action="store_true", help="keep the units in their order")
    p.add_argument("--calib-batches", type=POSITIVE_INT, default=8, help="training batches used to "
                   "measure unit importance")
    p.add_argument("--no-train", action="store_true", help="only import (and reorder)")
    p.add_argument("--seq-len", type=POSITIVE_INT, help=f"context of training and validation "
                   f"windows (default: {DEFAULT_CONTEXT}, or the model's context if shorter)")
    p.add_argument("--eval-batches", type=POSITIVE_INT, default=4,
                   help="validation batches (the same windows at every stage)")
    t = add_training_args(p, steps=300, batch_size=8, weight_decay=0.0, eval_interval=50,
                          ckpt_interval=50, precision="bf16", lr=1e-4, warmup_steps=20,
                          lr_help="peak learning rate (AdamW; small: this continues training, "
                          "see below)")
    t.add_argument("--distill", type=Number(float, low=0, high=1), default=0.0, metavar="W",
                   help="distillation weight: every granularity minimises (1-W) CE + W "
                   "KL(teacher || granularity), the teacher being --teacher (default 0: "
                   "cross-entropy alone)")
    t.add_argument("--teacher", choices=TEACHERS, default="original",
                   help="with --distill: original (the imported model, frozen; teaches every "
                   "granularity) or self (the full model of the same step teaches the smaller "
                   "ones)")
    t.add_argument("--train-only", choices=TRAIN_ONLY, default="all",
                   help="ffn: train only the FFN matrices (the part that becomes elastic), the "
                   "rest stays as imported")
    t.add_argument("--max-loss-increase", type=POSITIVE, default=GUARD_NATS, metavar="NATS",
                   help="stop when the full model's validation loss rises this far above the "
                   "original's, keeping the last good checkpoint (every checkpoint is validated)")
    t.add_argument("--no-guard", action="store_true", help="no --max-loss-increase limit")
    p.add_argument("--json", action="store_true")


# --------------------------------------------------------------------------- commands
def _slice_spec(args: argparse.Namespace) -> tuple[list[int], list[int]]:
    from ..submodels.gemma3n import parse_int_list, table_slice

    if args.config_table or args.config_name:
        if not (args.config_table and args.config_name) or args.widths:
            raise ValueError("give --widths [--skip-layers], or --config-table with "
                             "--config-name")
        widths, skip, _ = table_slice(args.config_table, args.config_name)
        return widths, skip
    if not args.widths:
        raise ValueError("give --widths (one per kept layer) or --config-table/--config-name")
    return parse_int_list(args.widths), parse_int_list(args.skip_layers)


def slice_hf(args: argparse.Namespace) -> Result:
    from ..submodels.gemma3n import SlicePlan, slice_hf

    widths, skip = _slice_spec(args)
    if args.check and "text_config" in json.loads((args.src / "config.json").read_text()):
        raise ValueError("--check builds the models with transformers: it supports text "
                         "checkpoints (the multimodal one needs the vision tower's timm)")
    info = slice_hf(args.src, args.dst, widths, skip)
    text = (f"wrote {info['out']}: {info['num_hidden_layers']} layers (skipped "
            f"{info['skipped_layers'] or 'none'}), num_kv_shared_layers "
            f"{info['num_kv_shared_layers']}, {info['stored_params'] / 1e6:.3f}M stored "
            f"parameters ({info['stored_bytes'] / 1e6:.1f} MB)")
    if args.check:
        from ..submodels.gemma3n_sweep import check_slice, load_gemma3n

        plan = SlicePlan(info["num_hidden_layers"] + len(skip), tuple(widths),
                         tuple(sorted(skip)))
        src = load_gemma3n(args.src, dtype="float32")
        info["check_max_abs_logit_diff"] = check_slice(src, args.dst, plan.layer_widths)
        text += (f"\ncheck: stock transformers on the slice vs the source run in place, max "
                 f"abs logit diff {info['check_max_abs_logit_diff']:.2e}")
    return info, text


def _table_candidates(path: Path, n_layers: int) -> tuple[list[tuple[str, list[int]]],
                                                          list[str]]:
    from ..submodels.gemma3n import SlicePlan, parse_int_list, read_config_table

    out, skipped = [], []
    for row in read_config_table(path):
        widths = parse_int_list(row.get("ffn hidden dims", ""))
        skip = parse_int_list(row.get("layers skipped", ""))
        if len(widths) + len(skip) != n_layers:
            skipped.append(row.get("name", "?"))
            continue
        out.append((row.get("name", "?"), list(SlicePlan(n_layers, tuple(widths),
                                                         tuple(sorted(skip))).layer_widths)))
    return out, skipped


def _sweep(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """Run the in-place sweep the flags describe; the result and its text lines."""
    from ..submodels.gemma3n import parse_int_list
    from ..submodels.gemma3n_sweep import (
        SliceSpace,
        gemma3n_sweep,
        load_gemma3n,
        slice_candidates,
        text_token_batches,
    )
    from ..submodels.latency import settings
    from ..submodels.report import markdown_table, write_report

    if not (args.data and args.out):
        raise ValueError("sweep-hf needs --data and --out (or --sweep to pick from a stored one)")
    model = load_gemma3n(args.src, args.dtype)
    ratios = tuple(sorted(set(args.ratios)))
    space = SliceSpace.of(model, ratios)
    explicit, unfit = ([], []) if not args.config_table else _table_candidates(
        args.config_table, space.n_layer)
    cands = slice_candidates(space, mixed=not args.no_mixed, explicit=explicit,
                             skip_sets=[parse_int_list(s) for s in args.skip_set])
    batches, n_tokens = text_token_batches(args.src, args.data, args.seq_len, args.batch_size,
                                           args.batches or None)
    rows = gemma3n_sweep(model, batches, cands, space, latency=not args.no_latency,
                         prefill_len=args.prefill_len, repeats=args.repeats,
                         progress=not args.no_progress)
    result: dict[str, Any] = {
        "checkpoint": str(args.src), "data": args.data, "text_tokens": n_tokens,
        "val_tokens": sum(y.numel() for _, y in batches), "ratios": list(ratios),
        "latency": None if args.no_latency else settings(None, args.repeats,
                                                         prefill_len=args.prefill_len),
        "candidates": rows, "table_rows_not_fitting": unfit}
    result["files"] = {k: str(v) for k, v in write_report(
        result, args.out, title="Gemma 3n slice sweep").items()}
    lines = [markdown_table(rows), f"{len(rows)} slices on {result['val_tokens']:,} tokens of "
             f"{args.data}; wrote {', '.join(result['files'].values())}"]
    if unfit:
        lines.append(f"table rows for another layer count, not tried: {unfit}")
    return result, lines


def sweep_hf(args: argparse.Namespace) -> Result:
    from ..submodels.gemma3n import SlicePlan, slice_hf
    from ..submodels.report import load_sweep
    from ..submodels.sweep import select

    budgets = {"max_params": args.max_params, "max_flops": args.max_flops,
               "max_latency_ms": args.max_latency_ms}
    if args.slice_to and all(v is None for v in budgets.values()):
        raise ValueError("--slice-to needs a budget (--max-params, --max-flops or "
                         "--max-latency-ms) to pick the slice")
    result, lines = (load_sweep(args.sweep), []) if args.sweep else _sweep(args)
    chosen = None
    if any(v is not None for v in budgets.values()):
        chosen = select(result["candidates"], **budgets)
        plan = SlicePlan.from_layer_widths(chosen["widths"])
        lines.append(f"best under the budget: {chosen['name']}: {chosen['params'] / 1e6:.3f}M "
                     f"params, val loss {chosen['val_loss']:.4f}; widths {list(plan.widths)}, "
                     f"skip {list(plan.skip)}")
        if args.slice_to:
            info = slice_hf(args.src, args.slice_to, plan.widths, plan.skip)
            result["slice"] = info
            lines.append(f"wrote {info['out']}")
    result["selected"] = chosen
    return result, "\n".join(lines)


def elastify(args: argparse.Namespace) -> Result:
    from ..corpora import absolute_spec
    from ..elastify import elastify
    from ..recipe import TrainConfig

    names = tuple(n.strip() for n in args.names.split(",") if n.strip())
    if len(names) != len(args.ratios):
        raise ValueError(f"--names has {len(names)} names for {len(args.ratios)} --ratios")
    if args.no_guard and args.max_loss_increase != GUARD_NATS:
        raise ValueError("give --max-loss-increase or --no-guard, not both")
    args.data = absolute_spec(args.data)  # recorded: eval and --resume from any directory
    cfg = train_config(args, TrainConfig, steps=args.steps, seq_len=args.seq_len,
                       eval_batches=args.eval_batches, distill=args.distill,
                       teacher=args.teacher if args.distill else "self",
                       train_only=args.train_only)
    rep = elastify(args.folder, args.out, cfg, reorder=not args.no_reorder,
                   train=not args.no_train, calib_batches=args.calib_batches,
                   ratios=args.ratios, names=names, eval_batches=args.eval_batches,
                   eval_data=args.eval_data and absolute_spec(args.eval_data),
                   max_loss_increase=None if args.no_guard else args.max_loss_increase,
                   progress=not args.no_progress)
    return rep, elastify_table(rep)


def elastify_table(rep: dict[str, Any]) -> str:
    """The printed elastify report: loss per granularity and stage on each corpus, and each
    granularity's distance to the original model (the reordered full model)."""
    names, full = rep["names"], rep["names"][-1]
    columns = [(s, rep[s]) for s in ("naive", "reordered", "elastified") if s in rep]
    other = rep.get("eval_data")
    if other:
        columns += [(f"{s}*", other[s]) for s in ("reordered", "elastified") if s in other]
    last = columns[-1][1] if "elastified" in rep else None
    head = f"{'granularity':<12}{'width':>7}" + "".join(f"{c:>12}" for c, _ in columns)
    lines = [head + (f"{'vs orig XL':>12}" if last else "")]
    for n in names:
        row = f"{n:<12}{rep['widths'][n]:>7}" + "".join(f"{v[n]:>12.4f}" for _, v in columns)
        if last:
            origin = (other or rep)["reordered"][full]
            row += f"{last[n] - origin:>+12.4f}"
        lines.append(row)
    lines.append(f"validation loss (nats/token) on {rep['val_tokens']:,} tokens of {rep['data']}"
                 + (f"; * on {other['val_tokens']:,} tokens of {other['data']} (not trained on)"
                    if other else "")
                 + ("; 'vs orig XL': the last column minus the original model's loss there"
                    if last else ""))
    if "steps" in rep:
        lines.append(f"trained {rep['steps']} steps ({rep['train_tokens']:,} tokens) in "
                     f"{rep['seconds'] / 60:.1f} min")
    lines.append(f"checkpoint: {rep['checkpoint']}")
    return "\n".join(lines)


COMMANDS = {"slice-hf": slice_hf, "sweep-hf": sweep_hf, "elastify": elastify}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the bring-your-own-model commands."""
    for add in (add_slice_hf, add_sweep_hf, add_elastify):
        add(sub)
