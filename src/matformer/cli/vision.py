"""``matformer vision train | eval | retrieve | mixnmatch``: the argument parsers.

:mod:`matformer.cli.main` mounts them under ``matformer vision``; the commands themselves live in
:mod:`matformer.cli.vision_commands` and return ``(result, text)``: a JSON-serialisable result and
its human-readable rendering, one of which the CLI prints (only the CLI prints).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import (
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    POSITIVE_INTS,
    RATIOS,
    SEED,
    Choices,
    HelpFormatter,
    Number,
    check_latency_budgets,
    names,
)
from .common import (
    Result,
    add_budgets,
    add_command,
    add_extra_widths,
    add_latency,
    add_training_args,
)

EXAMPLES = """\
examples:
  matformer vision train --out runs/vit                          # MatViT on the 8x8 digits
  matformer vision train --mode baseline --granularity S --steps 500 --out runs/vit-S
  matformer vision train --data photos/ --preset vit-small --image-size 32 --out runs/photos
  matformer vision eval runs/vit                                  # top-1 of S/M/L/XL
  matformer vision eval runs/vit --widths 32,64,128,256 --json
  matformer vision eval runs/vit runs/vit-joint --baselines runs/vit-S runs/vit-M \\
      runs/vit-L runs/vit-XL --plot acc.png                       # vs baselines
  matformer vision retrieve runs/vit --baselines runs/vit-S runs/vit-M runs/vit-L runs/vit-XL
  matformer vision mixnmatch runs/vit --baselines runs/vit-S runs/vit-XL --max-params 1.2e5
  matformer extract runs/vit --granularity M --out runs/vit-M    # a dense ViT checkpoint
"""


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="'digits' or an image folder (default: the checkpoint's)")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="skip image files Pillow cannot read (default: stop with an error)")
    p.add_argument("--precision", default="fp32", choices=("bf16", "fp32"))
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``vision`` and its sub-commands to the top-level sub-parsers."""
    from ..vision import POS_EMBEDS, VIT_PRESETS

    v = sub.add_parser("vision", help="MatViT: nested vision encoders (train, eval, retrieve, "
                       "mixnmatch)", epilog=EXAMPLES,
                       formatter_class=HelpFormatter,
                       description="Nested ViT encoders (arXiv 2310.07707, sec. 4.2): one set of weights, "
                       "classifiers and [CLS] embedders at every FFN width per layer.")
    vs = v.add_subparsers(dest="vision_command", required=True, metavar="VISION_COMMAND")
    p = add_command(
        vs, "train", "train a MatViT (or a dense baseline ViT)", EXAMPLES,
        description="Train a nested ViT classifier. Modes as for LMs: 'sample' (one granularity "
        "per step), 'joint' (all on every batch), 'baseline' (a dense ViT at one "
        "granularity's width). Equal compute as in the paper: sample mode for 4X steps "
        "vs each of 4 baselines for X steps (joint mode: X steps).")
    p.add_argument("--out", required=True, type=Path, help="run directory (created)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out with its saved settings (flags other than "
                   "--parallel, --device and --no-progress are ignored, with a warning)")
    p.add_argument("--data", default="digits", help="'digits' (scikit-learn's 8x8 digits, "
                   "embedded) or an image folder: one sub-folder of images per class")
    p.add_argument("--val-fraction", type=Number(float, low=0, high=1, low_open=True,
                                                 high_open=True), default=0.2,
                   help="held out per class (stratified, deterministic)")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="skip image files Pillow cannot read (default: stop with an error)")
    p.add_argument("--max-shift", type=NON_NEGATIVE_INT,
                   help="augmentation: random shift of up to N pixels, 0 disables (default: "
                   "image size // 16, so none on 8x8 digits, where one pixel is 12%% of the "
                   "image and slowed learning in our runs; 2 at 32x32)")
    m = p.add_argument_group("model")
    m.add_argument("--preset", default="vit-digits", choices=sorted(VIT_PRESETS))
    m.add_argument("--image-size", type=POSITIVE_INT,
                   help="images are resized to this square size (default: the preset's)")
    m.add_argument("--channels", type=int, choices=(1, 3), help="default: the preset's")
    m.add_argument("--patch-size", type=POSITIVE_INT, help="must divide --image-size")
    m.add_argument("--pos-embed", choices=POS_EMBEDS)
    m.add_argument("--d-model", type=POSITIVE_INT,
                   help="width (d_ff = 4 x d_model unless --d-ff)")
    m.add_argument("--d-ff", type=POSITIVE_INT, help="FFN width of the full model")
    m.add_argument("--n-layer", type=POSITIVE_INT, help="Transformer blocks")
    m.add_argument("--n-head", type=POSITIVE_INT, help="attention heads (must divide --d-model)")
    m.add_argument("--activation", choices=("swiglu", "gelu", "relu2"))
    m.add_argument("--ratios", type=RATIOS, help="granularities as fractions of d_ff "
                   "(default: 0.125,0.25,0.5,1)")
    m.add_argument("--names", type=names, help="granularity names, comma separated (default "
                   "S,M,L,XL; g0,g1,... with --ratios)")
    m.add_argument("--nest-heads", action="store_true", help="nest attention heads too")
    t = add_training_args(p, steps=2000, batch_size=64, weight_decay=0.05, eval_interval=250,
                          ckpt_interval=500, precision="fp32")  # tiny ViTs: bf16 was slower here (docs/vision.md)
    t.add_argument("--json", action="store_true", help="print the final result as JSON")

    p = add_command(
        vs, "eval", "top-1 accuracy of every granularity (or given widths)", EXAMPLES,
        description="Held-out top-1 accuracy and loss of MatViT submodels; with --baselines, of "
        "independently trained ViTs too, side by side by granularity name.")
    p.add_argument("checkpoints", nargs="+", type=Path, help="MatViT checkpoint(s) or run(s)")
    p.add_argument("--granularity", help="only this granularity")
    add_extra_widths(p, "per-layer FFN widths (repeatable): one int, or one per layer")
    p.add_argument("--baselines", nargs="+", type=Path, default=[], metavar="CKPT")
    p.add_argument("--labels", help="comma-separated names of the checkpoints' families "
                   "(default: their run directory names)")
    p.add_argument("--split", default="val", choices=("val", "train"))
    p.add_argument("--plot", type=Path, help="write accuracy vs parameters to this PNG")
    _data_args(p)

    p = add_command(
        vs, "retrieve", "adaptive retrieval: XL gallery, cheaper query encoders", EXAMPLES,
        description="Embed the training images (gallery) once with the full model and the held-out "
        "images (queries) with each submodel; report 1-NN accuracy and recall@k by "
        "cosine similarity of [CLS] embeddings. With --baselines, the same with "
        "independently trained ViTs as query encoders against the last baseline's "
        "(their XL's) gallery. Writes retrieval.json/.png/.md.")
    p.add_argument("checkpoint", type=Path, help="MatViT checkpoint or run directory")
    p.add_argument("--baselines", nargs="+", type=Path, default=[], metavar="CKPT",
                   help="dense baselines, smallest to largest; the last embeds their gallery")
    add_extra_widths(p, "an extra MatViT query encoder (repeatable)")
    p.add_argument("--mixnmatch", action="store_true",
                   help="also every Mix'n'Match candidate of the paper's rule")
    p.add_argument("--k", type=POSITIVE_INTS, default=(1, 5, 10), help="recall@k")
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    add_latency(p, prefill=False)
    p.add_argument("--out", type=Path, help="report directory (default: CHECKPOINT/retrieval)")
    _data_args(p)

    from ..submodels.candidates import PATTERNS

    p = add_command(
        vs, "mixnmatch", "Mix'n'Match sweep: accuracy vs params / FLOPs / latency", EXAMPLES,
        description="Evaluate the paper's Mix'n'Match candidates (and ablation patterns) of a "
        "MatViT by held-out accuracy, with parameters, FLOPs per image and measured "
        "batch-1 latency; writes mixnmatch.json/.png/.md; optionally picks the most "
        "accurate submodel under a budget.")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, help="output directory (default: CHECKPOINT/mixnmatch)")
    p.add_argument("--patterns", type=Choices(PATTERNS), default="rule",
                   help="candidate patterns (rule: the paper's; the others are ablations)")
    add_extra_widths(p, "an extra candidate (repeatable)")
    p.add_argument("--baselines", nargs="+", type=Path, default=[], metavar="CKPT")
    p.add_argument("--no-latency", action="store_true")
    add_latency(p, prefill=False)
    p.add_argument("--seed", type=SEED, default=0, help="seed of the random pattern")
    add_budgets(p, per="image", latency="measured latency (ms)")
    _data_args(p)
    p.set_defaults(check_args=check_latency_budgets)


def run(args: argparse.Namespace) -> Result:
    """Run ``matformer vision <command>``; returns (result, text), result None on non-main
    ranks of a distributed run."""
    from .vision_commands import COMMANDS

    return COMMANDS[args.vision_command](args)
