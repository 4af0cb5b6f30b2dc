"""The ``matformer`` command line: the parser, the dispatch, and ``main``.

The commands live in ``cli_lm`` (train, eval, generate, consistency), ``cli_submodels``
(mixnmatch, extract, export-hf, import-hf) and ``vision_cli`` (``matformer vision ...``).
Every command returns ``(result, text)``; :func:`main` prints one of them. Only the
command-line modules print; the library logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from . import lm as cli_lm
from . import reproduce as cli_reproduce
from . import submodels as cli_submodels
from .common import EXAMPLES, Result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="matformer", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Nested Transformers for elastic inference: train one model, run any of "
        "its submodels (a width per layer).", epilog=EXAMPLES)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: all "
                        "cores; 1 is often faster on a machine busy with other jobs)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (cli_lm.add_train, cli_lm.add_eval, cli_lm.add_generate, cli_lm.add_consistency,
                cli_submodels.add_mixnmatch, cli_submodels.add_extract,
                cli_submodels.add_export_hf, cli_submodels.add_import_hf,
                cli_reproduce.add_reproduce, cli_reproduce.add_sizes):
        add(sub)
    _add_vision(sub)
    return parser


def _add_vision(sub: argparse._SubParsersAction) -> None:
    from .vision import add_parser

    add_parser(sub)


def _vision(args: argparse.Namespace) -> Result:
    from .vision import run

    return run(args)


def _refuse_vision(args: argparse.Namespace) -> None:
    """Language-model commands given a MatViT checkpoint: say which commands fit it."""
    if args.command in ("eval", "generate", "consistency", "mixnmatch", "export-hf", "sizes"):
        from ..checkpoint import CheckpointError
        from ..families import model_kind

        try:
            kind = model_kind(args.checkpoint)
        except CheckpointError:  # not a checkpoint: the command itself reports it (or, with
            return              # `mixnmatch --sweep`, does not need it)
        if kind == "vit":
            raise ValueError(f"{args.checkpoint} is a vision (MatViT) checkpoint: use "
                             "`matformer vision eval|retrieve|mixnmatch` for it")


COMMANDS = {"train": cli_lm.train, "eval": cli_lm.evaluate, "generate": cli_lm.generate,
            "consistency": cli_lm.consistency, "mixnmatch": cli_submodels.mixnmatch,
            "extract": cli_submodels.extract, "export-hf": cli_submodels.export_hf,
            "import-hf": cli_submodels.import_hf, "vision": _vision,
            "reproduce": cli_reproduce.reproduce, "sizes": cli_reproduce.sizes}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``matformer`` console script."""
    torch.set_flush_denormal(True)  # fp32 denormals make CPU matmuls ~150x slower
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads={args.threads} must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from ..checkpoint import CheckpointError

    try:
        _refuse_vision(args)
        result, text = COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result is not None:  # None: a non-main rank of a distributed run
        if getattr(args, "json", False):
            print(json.dumps(result, indent=1))
        elif text:
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
