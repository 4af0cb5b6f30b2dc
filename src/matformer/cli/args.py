"""The command line's rules in one place: argument types and cross-flag checks.

Every numeric flag of every command uses a :class:`Number` (or :class:`NumberList`) type, which
refuses NaN, infinities and out-of-range values with the allowed range in the message; argparse
prefixes the flag's name, and :class:`Parser` prints it as one ``error: ...`` line with exit
code 2. Rules between flags (a flag the chosen mode would ignore, two flags that exclude each
other) are ``check_args`` hooks that a command's ``add_*`` function sets with
``set_defaults(check_args=...)``; :func:`matformer.cli.main.main` runs the hook before the
command and prints its ValueError the same way.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from ..config import DEFAULT_NAMES

#: A command's cross-flag rules (``args.check_args``): raise ValueError naming the flags.
Check = Callable[[argparse.Namespace], None]


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
SEED = Number(int, low=0, high=2**32 - 1)  # = matformer.recipe.MAX_SEED
POSITIVE = Number(float, low=0, low_open=True)
NON_NEGATIVE = Number(float, low=0)
#: Granularities as fractions of d_ff.
RATIOS = NumberList(Number(float, low=0, high=1, low_open=True))
#: Per-granularity probabilities or loss weights (normalised to sum to 1 by the trainer).
WEIGHTS = NumberList(Number(float, low=0), positive_sum=True)
POSITIVE_INTS = NumberList(POSITIVE_INT)


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
    if getattr(args, "resume", False):  # commands without --resume (elastify)
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


DRAFT_LEN = 4  # tokens drafted per speculative round, unless --draft-len
MAX_DRAFT_LEN = 8  # longest draft of --adaptive and --draft auto, unless --max-draft-len


def check_generate(args: argparse.Namespace) -> None:
    """Cross-flag rules of ``generate``: the speculative flags need a drafter; --stream shows
    one prompt's text."""
    one_submodel(args)
    if args.stream and (args.json or len(args.prompt or []) > 1):
        raise ValueError("--stream prints one prompt's text as it grows: it takes one --prompt "
                         "and no --json")
    if args.draft is None and args.draft_model is None:
        for flag, given in (("--draft-len", args.draft_len is not None),
                            ("--adaptive", args.adaptive),
                            ("--shared-cache", args.shared_cache)):
            if given:
                raise ValueError(f"{flag} applies to speculative decoding: add --draft "
                                 "(a granularity or widths) or --draft-model")
    if args.draft_table and args.draft != "auto":
        raise ValueError("--draft-table prints the table that --draft auto searches: add "
                         "--draft auto")
    if args.max_draft_len is not None:
        if not (args.adaptive or args.draft == "auto"):
            raise ValueError("--max-draft-len bounds the drafts of --adaptive and of the "
                             "--draft auto search: add one of them")
        if args.draft_len is not None and args.draft_len > args.max_draft_len:
            raise ValueError(f"--draft-len {args.draft_len} exceeds --max-draft-len "
                             f"{args.max_draft_len}")
    if args.draft_len is None:
        args.draft_len = DRAFT_LEN
    if args.max_draft_len is None:
        args.max_draft_len = MAX_DRAFT_LEN


def parse_widths(text: str, n_layer: int) -> tuple[int, ...]:
    """Parse ``"256"`` (every layer) or ``"128,128,256,512"`` (one per layer)."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as e:
        raise ValueError(f"--widths {text!r}: expected integers separated by commas") from e
    if len(values) == 1:
        values *= n_layer
    if len(values) != n_layer:
        raise ValueError(f"--widths {text!r}: got {len(values)} values, the model has "
                         f"{n_layer} layers (give 1 or {n_layer})")
    return tuple(values)


def parse_layers(text: str, n_layer: int) -> tuple[int, ...]:
    """Parse ``"3,4"``: distinct layer indices in ``0..n_layer-1``, returned ascending."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as e:
        raise ValueError(f"--skip-attention {text!r}: expected layer indices separated by "
                         "commas") from e
    bad = [v for v in values if not 0 <= v < n_layer]
    if not values or bad or len(set(values)) != len(values):
        raise ValueError(f"--skip-attention {text!r}: need distinct layer indices in "
                         f"0..{n_layer - 1} "
                         f"(the model has {n_layer} layers)")
    return tuple(sorted(values))
