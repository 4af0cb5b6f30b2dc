"""Pieces shared by the command-line modules: the convention, argument groups and helpers.

The convention: every command takes the parsed arguments and returns ``(result, text)``, a
JSON-serialisable result and its human-readable rendering; :func:`matformer.cli.main.main` prints
one of them (``--json`` picks the result). Non-main ranks of a distributed run return
``(None, "")``. Only the command-line modules print; the library logs.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

from ..data import DEFAULT_EVAL_CONTEXT
from .args import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    WEIGHTS,
    Check,
    HelpFormatter,
    check_training,
)

#: What a command returns: (JSON-serialisable result or None, text for people).
Result = tuple[dict[str, Any] | None, str]

EXAMPLES = """\
examples:
  matformer train --preset demo --data shakespeare --out runs/demo      # nested LM, ~14 min CPU
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
                      precision: str, check: Check | None = None, lr: float = 3e-3,
                      warmup_steps: int = 50, lr_help: str = "peak learning rate (AdamW)"
                      ) -> argparse._ArgumentGroup:
    """The training-loop flags shared by ``matformer train`` and ``matformer vision train``
    (their cross-flag rules: :func:`check_training`, then the command's own ``check``)."""
    from ..recipe import MODES

    t = p.add_argument_group("training")
    t.add_argument("--mode", default="sample", choices=MODES,
                   help="sample: one granularity per step (the paper); joint: all of them on "
                   "every batch; baseline: a dense model at --granularity's width")
    t.add_argument("--granularity", help="baseline mode only: which granularity's width to "
                   "train (default: the largest, XL)")
    t.add_argument("--steps", type=POSITIVE_INT, help=f"optimizer steps (default: {steps})")
    t.add_argument("--batch-size", type=POSITIVE_INT, default=batch_size,
                   help="global batch (over all processes and micro-batches)")
    t.add_argument("--lr", type=POSITIVE, default=lr, help=lr_help)
    t.add_argument("--warmup-steps", type=NON_NEGATIVE_INT, default=warmup_steps,
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
    t.add_argument("--compile", action="store_true",
                   help="torch.compile forward + loss (one graph per granularity, compiled on "
                   "its first step); measure it with benchmarks/train_throughput.py --compile")
    t.add_argument("--parallel", choices=("none", "ddp", "fsdp"),
                   help="data parallelism when launched by torchrun with several processes "
                   "(default ddp; may be changed on --resume, as may the number of processes)")
    t.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: CUDA (NCCL) when available, else CPU (gloo)")
    p.set_defaults(check_args=functools.partial(check_training, parser=p, steps=steps,
                                                then=check))
    return t


def lm_model_config(args: argparse.Namespace, vocab_size: int) -> Any:
    """The ModelConfig of a new run from the model flags (the baseline's dense one in
    ``--mode baseline``)."""
    from ..config import preset

    mcfg = preset(args.preset, vocab_size=vocab_size,
                  **model_overrides(args, ("activation", "n_kv_head")))
    return mcfg.dense(args.granularity) if args.mode == "baseline" else mcfg


def check_lm_train(args: argparse.Namespace) -> None:
    """``matformer train``'s own rules (after :func:`check_training`), checked before the
    tokenizer is trained: the model flags give a valid model, and the windows fit its
    context."""
    from ..tokenizer import MIN_BPE_VOCAB_SIZE

    mcfg = lm_model_config(args, MIN_BPE_VOCAB_SIZE)  # the real vocabulary comes later
    if args.seq_len is not None and args.seq_len > mcfg.max_seq_len:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the context of --preset "
                         f"{args.preset} (max_seq_len={mcfg.max_seq_len})")


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
    p.add_argument("--seq-len", type=POSITIVE_INT, help="tokens per validation window (default: "
                   "the context the checkpoint was trained at; for one that records none, such "
                   f"as an imported model, its context capped at {DEFAULT_EVAL_CONTEXT})")
    p.add_argument("--precision", default="fp32", choices=("bf16", "fp32"))


def add_latency(p: argparse.ArgumentParser, *, prefill: bool) -> None:
    """Latency-measurement flags (threads: the global ``matformer --threads``)."""
    p.add_argument("--repeats", type=POSITIVE_INT, default=7,
                   help="latency: timed rounds, interleaved over submodels (median)")
    if prefill:
        p.add_argument("--prefill-len", type=POSITIVE_INT, default=128,
                       help="latency: prompt tokens")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_budgets(p: argparse.ArgumentParser, *, per: str = "token",
                latency: str = "measured prefill latency (ms)", decode: bool = False,
                params: str = "total parameters, e.g. 3e6") -> argparse._ArgumentGroup:
    """The budget flags of every command that picks a submodel (declared once): parameters,
    FLOPs per ``per``, measured latency and, with ``decode``, decode-step latency."""
    b = p.add_argument_group("budget (the best submodel within every given limit)")
    b.add_argument("--max-params", type=POSITIVE, help=params)
    b.add_argument("--max-flops", type=POSITIVE, help=f"forward FLOPs per {per}")
    b.add_argument("--max-latency-ms", type=POSITIVE, help=latency)
    if decode:
        b.add_argument("--max-decode-ms", type=POSITIVE,
                       help="measured decode-step latency (ms)")
    return b


def add_submodel(p: argparse.ArgumentParser,
                 granularity: str = "a uniform granularity by name (S, M, ...)") -> None:
    """The flags that choose one submodel, declared once: ``--granularity`` or ``--widths``
    (checked against the nested set unless ``--any-width``), and ``--skip-attention``."""
    p.add_argument("--granularity", help=granularity)
    p.add_argument("--widths", help="per-layer FFN widths: one int, or one per layer")
    add_any_width(p)
    add_skip_attention(p)


def add_extra_widths(p: argparse.ArgumentParser, help: str = "an extra submodel (repeatable): "
                     "one FFN width for every layer, or one per layer") -> None:
    """``--widths`` given any number of times, with ``--any-width`` (see :func:`extra_widths`)."""
    p.add_argument("--widths", action="append", default=[], metavar="W", help=help)
    add_any_width(p)


def extra_widths(args: argparse.Namespace, cfg: Any) -> list[tuple[int, ...]]:
    """The ``--widths`` of :func:`add_extra_widths`, parsed and checked against the trained
    nested set unless ``--any-width``."""
    from ..submodels.candidates import check_widths
    from .args import parse_widths

    return [check_widths(cfg, parse_widths(w, cfg.n_layer), nested=not args.any_width)
            for w in args.widths]


def add_any_width(p: argparse.ArgumentParser) -> None:
    """``--any-width``: one rule for every command that takes ``--widths``: only widths of the
    trained nested set run unless it is given."""
    p.add_argument("--any-width", action="store_true",
                   help="allow widths outside the trained nested set (untrained submodels)")


def add_skip_attention(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-attention", metavar="LAYERS",
                   help="layer indices whose attention the submodel skips, e.g. 3,4 (depth "
                   "elasticity; untrained, so measure what it costs)")


def chosen_submodel(args: argparse.Namespace, model: Any, default: Any = None) -> Any:
    """The :class:`~matformer.config.Submodel` that :func:`add_submodel`'s flags name:
    ``--granularity`` (its heads too when heads are nested) or ``--widths`` (checked against
    the trained nested set unless ``--any-width``), else ``default`` (a spec; None: the full
    model), with ``--skip-attention``'s layers at 0 heads. None when no flag and no
    ``default`` name one."""
    from ..submodels.candidates import check_widths
    from .args import parse_widths

    cfg = model.config
    if args.widths and args.granularity:
        raise ValueError("give --granularity or --widths, not both")
    if args.widths:
        spec = check_widths(cfg, parse_widths(args.widths, cfg.n_layer), nested=not args.any_width)
    elif args.granularity:
        spec = args.granularity
    elif default is None and not getattr(args, "skip_attention", None):
        return None
    else:
        spec = default
    return with_skipped_attention(args, cfg, cfg.submodel(spec))


def with_skipped_attention(args: argparse.Namespace, cfg: Any, sub: Any) -> Any:
    """``sub`` with 0 heads at the layers ``--skip-attention`` names (unchanged without it)."""
    if not getattr(args, "skip_attention", None):
        return sub
    from ..config import Submodel
    from .args import parse_layers

    skip = parse_layers(args.skip_attention, cfg.n_layer)
    heads = tuple(0 if i in skip else h for i, h in enumerate(sub.heads))
    return cfg.submodel(Submodel(sub.widths, heads, sub.name))


def load_checkpoint(path: Any) -> tuple[Any, Any]:
    """The model and tokenizer of a checkpoint (see :func:`matformer.families.load_checkpoint`);
    a tokenizer with more tokens than the model has embeddings is refused here, before text
    the model cannot embed reaches it."""
    from ..checkpoint import CheckpointError, resolve
    from ..families import load_checkpoint as load

    model, tokenizer = load(path)
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(
            f"{resolve(path)}: its tokenizer has {tokenizer.vocab_size} tokens but the model "
            f"only {model.config.vocab_size} embeddings; the tokenizer.json does not belong to "
            "this model")
    return model, tokenizer


def checkpoint_batches(args: argparse.Namespace, model: Any, tokenizer: Any
                       ) -> tuple[list[Any], dict[str, Any]]:
    """The validation batches of ``args.checkpoint`` (its recorded corpus unless --data)."""
    from ..checkpoint import read_metadata
    from ..data import validation_batches

    return validation_batches(tokenizer, read_metadata(args.checkpoint),
                              model.config.max_seq_len, data=args.data,
                              batch_size=args.batch_size, max_batches=args.batches,
                              seq_len=args.seq_len)


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
        parallel=args.parallel or "ddp", compile=args.compile, **extra)
