"""Pieces shared by the command-line modules: the convention, argument groups and helpers.

The convention: every command takes the parsed arguments and returns ``(result, text)``, a
JSON-serialisable result and its human-readable rendering; :func:`matformer.cli.main.main` prints
one of them (``--json`` picks the result). Non-main ranks of a distributed run return
``(None, "")``. Only the command-line modules print; the library logs.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from ..config import DEFAULT_NAMES

#: What a command returns: (JSON-serialisable result or None, text for people).
Result = tuple[dict[str, Any] | None, str]
#: A command's cross-flag rules (``args.check_args``): raise ValueError naming the flags.
Check = Callable[[argparse.Namespace], None]

EXAMPLES = """\
examples:
  matformer train --preset demo --data shakespeare --out runs/demo      # nested LM, ~12 min CPU
  matformer train --preset demo --mode baseline --granularity S --out runs/base-S
  matformer train --out runs/demo --resume                             # continue a killed run
  matformer eval runs/demo                                             # S/M/L/XL loss table
  matformer eval runs/demo --widths 128,128,256,256,512,1024 --json
  matformer generate runs/demo --prompt "ROMEO." --granularity S
  matformer mixnmatch runs/demo                          # Mix'n'Match sweep, plot, Pareto front
  matformer extract runs/demo --max-params 4.5e6 --out runs/demo-4.5M  # best submodel that fits
  matformer export-hf runs/demo-4.5M --out hf/demo-4.5M --check        # transformers folder
  matformer vision train --out runs/vit                                # MatViT on 8x8 digits
"""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, like every other error of the CLI
    (``error: argument --steps: expected an integer >= 1, got '0' (see: matformer train
    --help)``), exit code 2; subcommand parsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples printed verbatim; every flag's help ends with its allowed range (for the
    number types below) and its default (when it has one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        if help_ is argparse.SUPPRESS:
            return help_
        allowed = getattr(action.type, "allowed", None)
        default = action.default
        if default is None or default is False or default == [] or default is argparse.SUPPRESS:
            default = None
        elif isinstance(default, tuple):
            default = ",".join(map(str, default))
        at = help_.rfind("(default")
        if allowed and at >= 0 and help_.endswith(")"):  # "(default: X)" -> "(RANGE; default: X)"
            return f"{help_[:at + 1]}{allowed}; {help_[at + 1:]}"
        notes = [allowed] if allowed else []
        if action.option_strings and default is not None and "default" not in help_:
            notes.append(f"default: {str(default).replace('%', '%%')}")
        return f"{help_} ({'; '.join(notes)})" if notes else help_


def _fmt(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


@dataclass(frozen=True)
class Number:
    """argparse type: one finite number in a range (NaN and infinities are refused).

    The error names the allowed range; argparse prefixes it with the flag's name and exits 2:
    ``argument --steps: expected an integer >= 1, got '0'``.

    Attributes:
        kind: ``int`` or ``float``.
        low / high: Bounds (None: unbounded on that side).
        low_open / high_open: Whether the bound itself is excluded.
    """

    kind: type = int
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    @property
    def allowed(self) -> str:
        """The range in words: ``an integer >= 1``, ``a number in (0, 1]``."""
        what = "an integer" if self.kind is int else "a finite number"
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            what = "an integer" if self.kind is int else "a number"
            return (f"{what} in {'(' if self.low_open else '['}{_fmt(lo)}, {_fmt(hi)}"
                    f"{')' if self.high_open else ']'}")
        if lo is not None:
            return f"{what} {'>' if self.low_open else '>='} {_fmt(lo)}"
        if hi is not None:
            return f"{what} {'<' if self.high_open else '<='} {_fmt(hi)}"
        return what

    def valid(self, value: float) -> bool:
        """Whether ``value`` (already a number) is finite and in range."""
        if not math.isfinite(value):
            return False
        lo, hi = self.low, self.high
        if lo is not None and (value < lo or (self.low_open and value == lo)):
            return False
        return not (hi is not None and (value > hi or (self.high_open and value == hi)))

    def __call__(self, text: str) -> Any:
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.allowed}, got {text!r}") from None
        if not self.valid(value):
            raise argparse.ArgumentTypeError(f"expected {self.allowed}, got {text!r}")
        return value


@dataclass(frozen=True)
class NumberList:
    """argparse type: comma-separated numbers, each a :class:`Number` (``"0.25,0.75"`` ->
    ``(0.25, 0.75)``); at least one, and with ``positive_sum`` a sum above zero."""

    item: Number
    positive_sum: bool = False

    @property
    def allowed(self) -> str:
        extra = ", with a positive sum" if self.positive_sum else ""
        return f"one or more comma-separated values, each {self.item.allowed}{extra}"

    def __call__(self, text: str) -> tuple[Any, ...]:
        parts = [v.strip() for v in text.split(",")]
        problem = f"expected {self.allowed}, got {text!r}"
        try:
            values = tuple(self.item.kind(v) for v in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(problem) from None
        if not all(self.item.valid(v) for v in values) or (self.positive_sum and
                                                              sum(values) <= 0):
            raise argparse.ArgumentTypeError(problem)
        return values


def names(text: str) -> tuple[str, ...]:
    """argparse type: ``"S,M,L,XL"`` -> ("S", "M", "L", "XL"); no empty or repeated name."""
    values = tuple(v.strip() for v in text.split(","))
    if not all(values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct non-empty names separated by "
                                         f"commas, got {text!r}")
    return values


@dataclass(frozen=True)
class Choices:
    """argparse type: comma-separated names, each one of ``choices``; returns the normalised
    string (``" rule, random"`` -> ``"rule,random"``)."""

    choices: tuple[str, ...]

    @property
    def allowed(self) -> str:
        return f"one or more comma-separated names from {','.join(self.choices)}"

    def __call__(self, text: str) -> str:
        values = [v.strip() for v in text.split(",")]
        if not all(v in self.choices for v in values):
            raise argparse.ArgumentTypeError(f"expected {self.allowed}, got {text!r}")
        return ",".join(values)


#: The number types of the command line: every numeric flag uses one of these.
POSITIVE_INT = Number(int, low=1)
NON_NEGATIVE_INT = Number(int, low=0)
SEED = Number(int, low=0, high=2**32 - 1)  # = matformer.train.MAX_SEED
POSITIVE = Number(float, low=0, low_open=True)
NON_NEGATIVE = Number(float, low=0)
#: Granularities as fractions of d_ff.
RATIOS = NumberList(Number(float, low=0, high=1, low_open=True))
#: Per-granularity probabilities or loss weights (normalised to sum to 1 by the trainer).
WEIGHTS = NumberList(Number(float, low=0), positive_sum=True)
POSITIVE_INTS = NumberList(POSITIVE_INT)


def model_overrides(args: argparse.Namespace, keys: tuple[str, ...]) -> dict[str, Any]:
    """ModelConfig fields given on the command line: ``keys`` copied when set, plus the
    granularity flags (--ratios, --names: names default to g0, g1, ... for custom ratios) and
    --nest-heads."""
    over: dict[str, Any] = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.ratios:
        over["ratios"] = args.ratios
        over["names"] = args.names or tuple(f"g{i}" for i in range(len(args.ratios)))
    elif args.names:
        over["names"] = args.names
    if args.nest_heads:
        over["nest_heads"] = True
    return over


def add_training_args(p: argparse.ArgumentParser, *, steps: int, batch_size: int,
                      weight_decay: float, eval_interval: int, ckpt_interval: int,
                      precision: str, check: Check | None = None) -> argparse._ArgumentGroup:
    """The training-loop flags shared by ``matformer train`` and ``matformer vision train``
    (their cross-flag rules: :func:`check_training`, then the command's own ``check``)."""
    from ..train import MODES

    t = p.add_argument_group("training")
    t.add_argument("--mode", default="sample", choices=MODES,
                   help="sample: one granularity per step (the paper); joint: all of them on "
                   "every batch; baseline: a dense model at --granularity's width")
    t.add_argument("--granularity", help="baseline mode only: which granularity's width to "
                   "train (default: the largest, XL)")
    t.add_argument("--steps", type=POSITIVE_INT, help=f"optimizer steps (default: {steps})")
    t.add_argument("--batch-size", type=POSITIVE_INT, default=batch_size,
                   help="global batch (over all processes and micro-batches)")
    t.add_argument("--lr", type=POSITIVE, default=3e-3, help="peak learning rate (AdamW)")
    t.add_argument("--warmup-steps", type=NON_NEGATIVE_INT, default=50,
                   help="linear warm-up (at most a tenth of --steps), then cosine decay")
    t.add_argument("--weight-decay", type=NON_NEGATIVE, default=weight_decay, help="AdamW")
    t.add_argument("--grad-clip", type=NON_NEGATIVE, default=1.0,
                   help="max gradient norm (0: off)")
    t.add_argument("--probs", type=WEIGHTS, help="sample mode only: per-granularity sampling "
                   "weights, normalised to sum to 1 (default: uniform)")
    t.add_argument("--loss-weights", type=WEIGHTS, help="joint mode only: per-granularity "
                   "loss weights, normalised to sum to 1 (default: equal)")
    t.add_argument("--eval-interval", type=POSITIVE_INT, default=eval_interval,
                   help="validate every N steps")
    t.add_argument("--ckpt-interval", type=POSITIVE_INT, default=ckpt_interval,
                   help="checkpoint every N steps")
    t.add_argument("--seed", type=SEED, default=0, help="seeds init, batches and draws")
    t.add_argument("--precision", default=precision, choices=("bf16", "fp32"),
                   help="bf16 autocast or fp32; compare their speed on your machine with "
                   "benchmarks/train_throughput.py --precision")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    t.add_argument("--parallel", choices=("none", "ddp", "fsdp"),
                   help="data parallelism when launched by torchrun with several processes "
                   "(default ddp; may be changed on --resume, as may the number of processes)")
    t.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: CUDA (NCCL) when available, else CPU (gloo)")
    p.set_defaults(check_args=functools.partial(check_training, parser=p, steps=steps,
                                                then=check))
    return t


#: What ``--resume`` takes from the command line; every other flag comes from the saved run.
RESUME_FLAGS = ("out", "resume", "parallel", "device", "no_progress", "json", "help",
                "check_args")


def check_training(args: argparse.Namespace, *, parser: argparse.ArgumentParser, steps: int,
                   then: Check | None = None) -> None:
    """Cross-flag rules of the training flags: a flag that the chosen mode would ignore is an
    error, not silence (with ``--resume``, a warning naming the flags the saved settings
    replace). Fills the defaults that depend on other flags (``--steps`` unless ``--tokens``
    sets it; the baseline's ``--granularity``).

    Raises:
        ValueError: naming the flags in conflict.
    """
    if args.resume:
        ignored = [max(a.option_strings, key=len) for a in parser._actions
                   if a.option_strings and a.dest not in RESUME_FLAGS
                   and getattr(args, a.dest) != a.default]
        if ignored and os.environ.get("RANK", "0") == "0":
            print(f"warning: --resume continues {args.out} with its saved settings; ignoring "
                  f"{', '.join(ignored)}", file=sys.stderr)
        if args.steps is None:
            args.steps = steps
        return
    if args.granularity is not None and args.mode != "baseline":
        raise ValueError(f"--granularity {args.granularity} applies to --mode baseline only; "
                         f"--mode {args.mode} trains every granularity (drop --granularity, or "
                         "pass --mode baseline)")
    for flag, value, mode in (("--probs", args.probs, "sample"),
                              ("--loss-weights", args.loss_weights, "joint")):
        if value is None:
            continue
        if args.mode != mode:
            raise ValueError(f"{flag} applies to --mode {mode} only, not --mode {args.mode}")
        count = len(args.ratios or args.names or DEFAULT_NAMES)
        if len(value) != count:
            raise ValueError(f"{flag} has {len(value)} values; the model has {count} "
                             "granularities (one value each)")
    if getattr(args, "tokens", None) is not None and args.steps is not None:
        raise ValueError("give --steps or --tokens (a token budget that sets the steps), not both")
    if args.steps is None:
        args.steps = steps
    if args.mode == "baseline" and args.granularity is None:
        args.granularity = (args.names or DEFAULT_NAMES)[-1]
    if then is not None:
        then(args)


def one_submodel(args: argparse.Namespace) -> None:
    """Check of the commands that take one submodel: ``--granularity`` or ``--widths``."""
    if args.granularity is not None and args.widths:
        raise ValueError(f"give --granularity ({args.granularity}) or --widths "
                         f"({args.widths}), not both")


def check_latency_budgets(args: argparse.Namespace) -> None:
    """Check of the sweeps: with ``--no-latency``, a latency budget could not be met."""
    if not args.no_latency:
        return
    for flag, value in (("--max-latency-ms", args.max_latency_ms),
                        ("--max-decode-ms", getattr(args, "max_decode_ms", None))):
        if value is not None:
            raise ValueError(f"{flag} needs latency measurements; drop --no-latency")


def add_command(sub: argparse._SubParsersAction, name: str, help_: str, epilog: str,
                description: str | None = None) -> argparse.ArgumentParser:
    """One subcommand, with its examples printed verbatim under ``--help``."""
    return sub.add_parser(name, help=help_, description=description or help_, epilog=epilog,
                          formatter_class=HelpFormatter)


def add_eval_data(p: argparse.ArgumentParser, batches: int | None) -> None:
    """Validation-data flags of the commands that evaluate a language-model checkpoint."""
    p.add_argument("--data", help="corpus (default: the one the checkpoint was trained on)")
    p.add_argument("--batches", type=POSITIVE_INT, default=batches,
                   help=f"validation batches (default: {batches or 'all'})")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=16, help="validation batch size")
    p.add_argument("--precision", default="fp32", choices=("bf16", "fp32"))


def add_latency(p: argparse.ArgumentParser, *, prefill: bool) -> None:
    """Latency-measurement flags (threads: the global ``matformer --threads``)."""
    p.add_argument("--repeats", type=POSITIVE_INT, default=7,
                   help="latency: timed rounds, interleaved over submodels (median)")
    if prefill:
        p.add_argument("--prefill-len", type=POSITIVE_INT, default=128,
                       help="latency: prompt tokens")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def read_json(path: Path) -> Any:
    """A JSON file the command needs; ValueError naming the file when it is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); is the file complete?") from e


def load_checkpoint(path: Any) -> tuple[Any, Any]:
    """The model and tokenizer of a checkpoint (see :func:`matformer.families.load_checkpoint`)."""
    from ..families import load_checkpoint as load

    return load(path)


def checkpoint_batches(args: argparse.Namespace, model: Any, tokenizer: Any
                       ) -> tuple[list[Any], dict[str, Any]]:
    """The validation batches of ``args.checkpoint`` (its recorded corpus unless --data)."""
    from ..checkpoint import read_metadata
    from ..data import validation_batches

    return validation_batches(tokenizer, read_metadata(args.checkpoint),
                              model.config.max_seq_len, data=args.data,
                              batch_size=args.batch_size, max_batches=args.batches)


def train_config(args: argparse.Namespace, config_cls: Any, *, steps: int, **extra: Any) -> Any:
    """The TrainConfig of a new run from the shared training flags (warm-up at most a tenth of
    the steps), plus command-specific fields in ``extra``."""
    return config_cls(
        mode=args.mode, data=args.data, val_fraction=args.val_fraction, steps=steps,
        batch_size=args.batch_size, lr=args.lr,
        warmup_steps=min(args.warmup_steps, max(1, steps // 10)),
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, probs=args.probs,
        loss_weights=args.loss_weights, eval_interval=args.eval_interval,
        ckpt_interval=args.ckpt_interval, seed=args.seed, precision=args.precision,
        parallel=args.parallel or "ddp", **extra)
