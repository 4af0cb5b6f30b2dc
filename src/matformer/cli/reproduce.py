"""``matformer reproduce | sizes``: the paper's claims in one command, and what each size of a
checkpoint costs and gives.

Each command returns ``(result, text)`` (see :mod:`matformer.cli.common`)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .args import POSITIVE_INT, Number
from .common import Result, add_command, add_eval_data, checkpoint_batches, load_checkpoint

EXAMPLES = """\
examples:
  matformer reproduce --quick --out reports/quick          # a few minutes: checks the pipeline
  matformer reproduce --out reports/repro                  # the default reproduction (CPU)
  matformer reproduce --out reports/repro --seeds 5        # add seeds to a finished one
  matformer reproduce --recipes sample,xl-up --base-steps 300 --out reports/r2
  matformer reproduce --out reports/repro --scaling        # + 2 narrower sizes, the fits
  matformer reproduce --preset paper-78m --device cuda --base-steps 2000 --out reports/gpu
  matformer sizes runs/demo                                # params, loss, tokens/s per size
"""


def add_reproduce(sub: argparse._SubParsersAction) -> None:
    from ..reproduce.plan import RECIPES, SHAPES

    p = add_command(
        sub, "reproduce", "train MatLM recipes and dense baselines; report the paper's claims",
        EXAMPLES,
        description="Train a MatLM (sample mode, 4X tokens) and dense S/M/L/XL baselines (X "
        "tokens each; the paper's equal-compute rule), the equal-tokens control (dense S and "
        "XL on 4X) and the chosen extra recipes; evaluate every granularity, sweep "
        "Mix'n'Match, measure consistency and speculative decoding; write report.md, "
        "results.json and plots into --out. Rerun the same command to resume a killed run.")
    p.add_argument("--out", type=Path, default=Path("reports/reproduce"),
                   help="output directory (resumed when it holds the same reproduction)")
    p.add_argument("--quick", action="store_true",
                   help="tiny model, few steps, byte tokenizer: minutes, numbers meaningless")
    p.add_argument("--preset", help="model shape: " + ", ".join(sorted(SHAPES))
                   + " or a package preset (demo, paper-78m, ...); default repro")
    p.add_argument("--data", help="corpus (default shakespeare)")
    p.add_argument("--recipes", help="nested recipes, comma separated, from "
                   f"{','.join(RECIPES)} (sample always runs; default: all)")
    p.add_argument("--seeds", type=POSITIVE_INT, help="repetitions with seeds 0..N-1 (default 3; a "
                   "finished run takes more)")
    p.add_argument("--base-steps", type=POSITIVE_INT, help="X: one baseline's steps (default 150)")
    p.add_argument("--batch-size", type=POSITIVE_INT)
    p.add_argument("--seq-len", type=POSITIVE_INT)
    p.add_argument("--distill", type=Number(float, low=0, high=1), help="weight of the distill recipe (default 0.5)")
    p.add_argument("--scaling", action="store_true",
                   help="also train the sample MatLM and the baselines at two narrower sizes "
                   "(seed 0) and fit Loss = a (N D)^b + c for both families")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--no-progress", action="store_true", help="no per-stage lines")
    p.add_argument("--json", action="store_true", help="print results.json")


def add_sizes(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "sizes", "what each granularity costs and gives: params, loss, "
                    "measured decode tokens/s", EXAMPLES)
    p.add_argument("checkpoint", type=Path, help="checkpoint or run directory")
    p.add_argument("--out", type=Path, help="plot file (default: RUN/sizes.png)")
    add_eval_data(p, batches=20)
    p.add_argument("--repeats", type=POSITIVE_INT, default=5, help="timed rounds (median)")
    p.add_argument("--json", action="store_true")


def reproduce(args: argparse.Namespace) -> Result:
    import time

    import torch

    from ..reproduce import plan
    from ..reproduce.run import reproduce as run

    changes = {k: v for k, v in (("shape", args.preset), ("data", args.data),
                                 ("seeds", args.seeds), ("base_steps", args.base_steps),
                                 ("batch_size", args.batch_size), ("seq_len", args.seq_len),
                                 ("distill", args.distill)) if v is not None}
    if args.recipes:
        recipes = tuple(r.strip() for r in args.recipes.split(",") if r.strip())
        twice = sorted({r for r in recipes if recipes.count(r) > 1})
        if twice:
            raise ValueError(f"--recipes names {', '.join(twice)} more than once; name each "
                             "recipe once")
        changes["recipes"] = recipes
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    rc = plan.quick_config(**changes) if args.quick else plan.ReproConfig(**changes)
    t0 = time.perf_counter()

    def progress(key: str, what: str, seconds: float) -> None:
        if args.no_progress:
            return
        stamp = f"[{(time.perf_counter() - t0) / 60:5.1f} min]"
        note = {"skip": f"done before ({seconds:.0f} s), skipped", "start": "running ...",
                "done": f"done in {seconds:.0f} s"}[what]
        print(f"{stamp} {key}: {note}", file=sys.stderr, flush=True)

    command = "matformer " + " ".join(shlex.quote(a) for a in sys.argv[1:]) \
        if sys.argv and Path(sys.argv[0]).name == "matformer" else _describe(args)
    results = run(rc, args.out, device=args.device, progress=progress, command=command,
                  scaling=args.scaling)
    s, v = results["losses"], results["vs_baseline"]["sample"]
    lines = [f"wrote {args.out / 'report.md'}, results.json, loss_vs_params.png, consistency.png",
             "val loss S / M / L / XL:",
             "  dense baselines : " + " / ".join(f"{s[f'base-{g}'][g]['mean']:.3f}"
                                                 for g in ("S", "M", "L", "XL"))]
    for rec in rc.recipes:
        lines.append(f"  MatLM {rec:<9}: " + " / ".join(f"{s[rec][g]['mean']:.3f}"
                                                        for g in ("S", "M", "L", "XL")))
    lines.append("sample minus baselines: " + " / ".join(
        f"{v[g]['mean']:+.3f} ({v[g]['verdict']})" for g in ("S", "M", "L", "XL")))
    return results, "\n".join(lines)


def _describe(args: argparse.Namespace) -> str:
    """The command line that gives ``args`` (when not run as the ``matformer`` script)."""
    skip = {"command", "json", "no_progress", "verbose", "threads"}
    parts = ["matformer"] + ([f"--threads {args.threads}"] if args.threads else []) + [
        "reproduce"]
    for k, v in vars(args).items():
        if k in skip or v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        parts.append(flag if v is True else f"{flag} {v}")
    return " ".join(parts)


def sizes(args: argparse.Namespace) -> Result:
    from .. import checkpoint as ckpt
    from ..reproduce.sizes import plot_sizes, size_table

    model, tokenizer = load_checkpoint(args.checkpoint)
    batches, info = checkpoint_batches(args, model, tokenizer)
    rows = size_table(model, batches, precision=args.precision, repeats=args.repeats,
                      context=min(64, model.config.max_seq_len - 1))
    default = args.checkpoint if args.checkpoint.is_dir() else args.checkpoint.parent
    plot = plot_sizes(rows, args.out or default / "sizes.png",
                      title=f"{ckpt.resolve(args.checkpoint).name}: cost and quality per size")
    result = {"checkpoint": str(ckpt.resolve(args.checkpoint)), **info, "sizes": rows,
              "plot": str(plot), "threads": 1}
    lines = [f"{result['checkpoint']}: what each size costs and gives ({info['val_tokens']:,} "
             "validation tokens; decode: batch 1, KV cache, 1 thread, median)",
             f"{'size':<6}{'params':>9}{'non-emb':>9}{'val loss':>10}{'vs XL':>8}"
             f"{'decode tok/s':>14}{'vs XL':>8}"]
    for r in rows:
        lines.append(f"{r['name']:<6}{r['params'] / 1e6:>8.2f}M"
                     f"{r['non_embedding_params'] / 1e6:>8.2f}M{r['val_loss']:>10.4f}"
                     f"{r['loss_vs_full']:>+8.3f}{r['tokens_per_s']:>14.0f}"
                     f"{r['speed_vs_full']:>7.2f}x")
    lines.append(f"plot: {plot}")
    return result, "\n".join(lines)
