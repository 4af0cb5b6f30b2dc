"""The ``matformer`` command line: the parser, the dispatch, and ``main``.

The commands live in one module per group: :mod:`.lm` (train, eval, consistency),
:mod:`.generate`, :mod:`.submodels` (mixnmatch, extract, export-hf, import-hf), :mod:`.gguf`,
:mod:`.serve`, :mod:`.byom`, :mod:`.reproduce` and :mod:`.vision` (``matformer vision ...``).
Every command returns ``(result, text)``; :func:`main` prints one of them. Only the
command-line modules print; the library logs.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import sys
from collections.abc import Collection

import torch

from . import byom as cli_byom
from . import generate as cli_generate
from . import gguf as cli_gguf
from . import lm as cli_lm
from . import reproduce as cli_reproduce
from . import serve as cli_serve
from . import submodels as cli_submodels
from .args import POSITIVE_INT, HelpFormatter, Parser
from .common import EXAMPLES, Result

log = logging.getLogger("matformer.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="matformer", formatter_class=HelpFormatter,
        description="Nested Transformers for elastic inference: train one model, run any of "
        "its submodels (a width per layer).", epilog=EXAMPLES)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and the traceback of an error")
    parser.add_argument("--threads", type=POSITIVE_INT, help="CPU threads for torch, for "
                        "every command, latency measurements included (default: all cores; 1 "
                        "is often faster on a machine busy with other jobs)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (cli_lm.add_train, cli_lm.add_eval, cli_generate.add_generate, cli_lm.add_consistency,
                cli_submodels.add_mixnmatch, cli_submodels.add_extract,
                cli_submodels.add_export_hf, cli_submodels.add_import_hf, cli_serve.add_serve,
                cli_gguf.add_export_gguf, cli_byom.add_parsers, cli_reproduce.add_reproduce,
                cli_reproduce.add_sizes):
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
    if args.command in ("eval", "generate", "consistency", "mixnmatch", "export-hf",
                        "export-gguf", "sizes"):
        from ..checkpoint import CheckpointError
        from ..families import model_kind

        try:
            kind = model_kind(args.checkpoint)
        except CheckpointError:  # not a checkpoint: the command itself reports it (or, with
            return              # `mixnmatch --sweep`, does not need it)
        if kind == "vit":
            raise ValueError(f"{args.checkpoint} is a vision (MatViT) checkpoint: use "
                             "`matformer vision eval|retrieve|mixnmatch` for it")


COMMANDS = {"train": cli_lm.train, "eval": cli_lm.evaluate, "generate": cli_generate.generate,
            "consistency": cli_lm.consistency, "mixnmatch": cli_submodels.mixnmatch,
            "extract": cli_submodels.extract, "export-hf": cli_submodels.export_hf,
            "import-hf": cli_submodels.import_hf, "vision": _vision, "serve": cli_serve.serve,
            "export-gguf": cli_gguf.export_gguf, **cli_byom.COMMANDS,
            "reproduce": cli_reproduce.reproduce, "sizes": cli_reproduce.sizes}


#: A hint after the system's words for the OS errors people meet most.
_OS_HINTS = {errno.ENOSPC: "the disk is full: free some space and run again",
             errno.EDQUOT: "the disk quota is exhausted",
             errno.EACCES: "choose a path you may write to, or change its permissions",
             errno.EROFS: "choose a path on a writable file system"}

#: Errors caused by the input or the environment: one line on stderr and exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError)

_PEER_FAILED = "stopped because another process of this run failed (see its error)"


#: The library's errors advise in its own terms (parameter names); on the command line the same
#: advice names the flag, where the command has that flag (else the library's words stay).
#: Only the command line speaks of flags.
FLAG_WORDS = {
    "overwrite=True": "--force",
    "resume=True": "--resume",
    "nested=False": "--any-width",
    "skip_unreadable=True": "--skip-unreadable",
    "data=SPEC": "--data SPEC",
    "pad=True": "drop --no-pad",
    "(lr)": "(--lr)",
    "(weight_decay)": "(--weight-decay)",
    "(seq_len)": "(--seq-len)",
}


def describe_error(e: BaseException, flags: Collection[str] | None = None) -> str:
    """One line for an error that reached the command line: what failed and on what, with the
    library's advice said in flags (:data:`FLAG_WORDS`), only those among ``flags`` (the
    command's own; None: every flag)."""
    text = _describe(e)
    for words, said in FLAG_WORDS.items():
        flag = re.search(r"--[a-z-]+", said).group()  # type: ignore[union-attr]
        if flags is None or flag in flags:
            text = text.replace(words, said)
    return text


def command_flags(parser: argparse.ArgumentParser, command: str | None = None) -> set[str]:
    """Every option string of ``parser`` and of its subcommand ``command`` (all of them when
    None), down through nested subcommands (``vision train``)."""
    flags = set(parser._option_string_actions)
    subs = parser._subparsers._group_actions if parser._subparsers else ()
    for action in subs:
        for name, child in action.choices.items():
            if command is None or name == command:
                flags |= command_flags(child)
    return flags


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        text = e.strerror
        if e.filename is not None:
            text = f"{e.filename}: {text}"
            if e.filename2 is not None:
                text = f"{e.filename} -> {e.filename2}: {e.strerror}"
        hint = _OS_HINTS.get(e.errno or 0)
        return f"{text} ({hint})" if hint else text
    if isinstance(e, json.JSONDecodeError):
        return f"a file this command read is not valid JSON ({e})"
    if isinstance(e, KeyError):
        what = repr(e.args[0]) if e.args else "an entry"
        return (f"missing entry {what} in a file this command read (is the file complete and "
                "written by matformer?)")
    return str(e) or type(e).__name__


def _peer_failed(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because another rank of the run stopped."""
    if isinstance(e, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError | OSError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def _check_out(args: argparse.Namespace) -> None:
    """Every ``--out`` but export-gguf's names a directory: an existing file there is an error,
    not replaced."""
    out = getattr(args, "out", None)
    if getattr(args, "out_is_file", False):  # export-gguf writes one file
        return
    if out is not None and (out.exists() or out.is_symlink()) and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file; --out names a directory")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``matformer`` console script.

    Returns (never raises SystemExit) 0 on success and after ``--help``, 2 for an error in the
    input or the environment (a bad flag, a missing or unreadable file, a full disk): one
    ``error: ...`` line on stderr (argparse's usage too, for a flag), its traceback
    only with ``-v`` (logged at debug level). Under torchrun no rank shows a traceback when
    one fails: the failing rank prints its error, and a rank whose collective broke because
    of it says so and returns 1.
    """
    torch.set_flush_denormal(True)  # fp32 denormals make CPU matmuls ~150x slower
    parser = build_parser()
    try:  # argparse prints usage errors (flag and allowed range) itself, and --help
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from ..checkpoint import CheckpointError

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    who = f"rank {rank}: " if world > 1 else ""
    try:
        _check_out(args)
        if getattr(args, "check_args", None) is not None:
            args.check_args(args)  # cross-flag rules of the command (set by its add_* function)
        _refuse_vision(args)
        result, text = COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if world > 1 and _peer_failed(e):
            log.debug("traceback", exc_info=True)
            print(f"error: {who}{_PEER_FAILED}", file=sys.stderr)
            return 1
        if not isinstance(e, (*USER_ERRORS, CheckpointError)):
            raise  # a bug: its traceback is what a report needs
        log.debug("traceback", exc_info=True)
        flags = command_flags(parser, args.command)
        print(f"error: {who}{describe_error(e, flags)}", file=sys.stderr)
        return 2
    if result is not None:  # None: a non-main rank of a distributed run
        if getattr(args, "json", False):
            print(json.dumps(result, indent=1))
        elif text:
            print(text)
    return 0


def entry() -> None:
    """The console script and ``python -m matformer``: :func:`main`, then exit with its code.

    A torchrun worker (``WORLD_SIZE`` > 1) whose work is done (process group torn down, files
    written and flushed) leaves without interpreter finalization. Objects that outlive the
    process group (FSDP2 and DDP keep references to it and to collective work) would otherwise
    be destroyed while the interpreter shuts down, where gloo can abort ("terminate called
    without an active exception", SIGABRT) and turn a finished run into a failed one.
    """
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
