"""``matformer train | eval | consistency``: language-model commands (``generate`` has its own
module).

Each command returns ``(result, text)`` (see :mod:`matformer.cli.common`)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from .args import (
    POSITIVE,
    POSITIVE_INT,
    RATIOS,
    Number,
    names,
    one_submodel,
)
from .common import (
    EXAMPLES,
    Result,
    add_command,
    add_eval_data,
    add_extra_widths,
    add_submodel,
    add_training_args,
    check_lm_train,
    checkpoint_batches,
    chosen_submodel,
    extra_widths,
    lm_model_config,
    load_checkpoint,
    train_config,
    with_skipped_attention,
)


def add_train(sub: argparse._SubParsersAction) -> None:
    from ..config import PRESETS
    from ..corpora import CORPORA
    from ..tokenizer import MIN_BPE_VOCAB_SIZE

    p = add_command(
        sub, "train", "train a nested LM (or a dense baseline)", EXAMPLES,
        description="Train a MatFormer LM. Modes: 'sample' draws one granularity per step "
        "(the paper's recipe), 'joint' trains all granularities on every batch, 'baseline' "
        "trains an ordinary dense model at one granularity's width.\n\nToken budgets: the paper "
        "gives a MatFormer 4X tokens when each of its 4 baselines gets X; use --tokens for that.")
    p.add_argument("--out", required=True, type=Path, help="run directory (created)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint, with its saved "
                   "settings (flags other than --parallel, --device and --no-progress are "
                   "ignored, with a warning)")
    m = p.add_argument_group("model")
    m.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    m.add_argument("--ratios", type=RATIOS, help="granularities as fractions of d_ff, e.g. "
                   "0.125,0.25,0.5,1 (default: the paper's S/M/L/XL)")
    m.add_argument("--names", type=names, help="granularity names, comma separated (default "
                   "S,M,L,XL; g0,g1,... with --ratios)")
    m.add_argument("--activation", choices=("swiglu", "gelu", "relu2"))
    m.add_argument("--n-kv-head", type=POSITIVE_INT,
                   help="key/value heads (grouped-query attention; must divide the heads)")
    m.add_argument("--nest-heads", action="store_true", help="nest attention heads too")
    m.add_argument("--tokenizer", default="bpe", choices=("bpe", "byte"))
    m.add_argument("--vocab-size", type=Number(int, low=MIN_BPE_VOCAB_SIZE), default=4096,
                   help="BPE vocabulary size (--tokenizer bpe)")
    d = p.add_argument_group("data")
    d.add_argument("--data", default="shakespeare",
                   help=f"embedded corpus {CORPORA}, a text file, a directory or a glob")
    d.add_argument("--val-fraction", type=Number(float, low=0, high=0.5, low_open=True),
                   default=0.1, help="tail of every document held out for validation")
    t = add_training_args(p, steps=600, batch_size=16, weight_decay=0.1, eval_interval=100,
                          ckpt_interval=100, precision="bf16", check=check_lm_train)
    t.add_argument("--tokens", type=POSITIVE, help="token budget, e.g. 2e6; sets the steps "
                   "(instead of --steps) to tokens / (batch size x sequence length)")
    t.add_argument("--grad-accum", type=POSITIVE_INT, default=1,
                   help="micro-batches per step (must divide --batch-size)")
    t.add_argument("--seq-len", type=POSITIVE_INT, help="context of training windows (default: "
                   "the model's max_seq_len, which is also the maximum)")
    t.add_argument("--eval-batches", type=POSITIVE_INT, default=20,
                   help="validation batches at every evaluation")
    t.add_argument("--distill", type=Number(float, low=0, high=1), default=0.0, metavar="W",
                   help="self-distillation (sample/joint): smaller submodels minimise (1-W) CE "
                   "+ W KL(full || submodel) against the full model's detached predictions on "
                   "the same batch (default 0: off)")


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "eval", "validation loss/perplexity of every granularity or widths", EXAMPLES)
    p.add_argument("checkpoint", type=Path, help="checkpoint or run directory")
    add_submodel(p, "only this granularity (default: all)")
    add_eval_data(p, batches=None)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(check_args=one_submodel)


def add_consistency(sub: argparse._SubParsersAction) -> None:
    examples = """\
examples:
  matformer consistency runs/demo                      # S/M/L vs XL on validation prefixes
  matformer consistency runs/demo --widths 128,128,256,256,512,1024 --json
  matformer consistency runs/demo --baselines runs/base-S runs/base-M runs/base-L runs/base-XL
"""
    p = add_command(
        sub, "consistency", "how often submodels agree with the full model (hard %%, soft KL)",
        examples,
        description="Consistency (paper sec. 3.4): hard = %% of validation prefixes where a "
        "submodel's greedy next token equals the full model's; soft = mean KL(full || "
        "submodel) of the next-token distributions. With --baselines, the same numbers for "
        "independently trained dense models against the last of them (their XL), side by side.")
    p.add_argument("checkpoint", type=Path, help="checkpoint or run directory")
    add_extra_widths(p, "also measure these per-layer FFN widths (repeatable)")
    p.add_argument("--baselines", nargs="+", type=Path, metavar="CKPT",
                   help="dense baselines, one per granularity; the last is their reference")
    add_eval_data(p, batches=20)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


# --------------------------------------------------------------------------- commands
def _new_run(args: argparse.Namespace, env: Any) -> tuple[Any, Any, Any]:
    """A new run's model, tokenizer (trained by one rank, read by all) and TrainConfig; the run
    directory is checked on every rank before rank 0 marks it as a run."""
    from .. import distributed as dist
    from ..corpora import absolute_spec, load_corpus
    from ..data import split_text
    from ..model import MatFormerLM
    from ..runs import RunDir
    from ..tokenizer import Tokenizer
    from ..train import TrainConfig

    run = RunDir(args.out)
    run.check_new()  # never overwrite what is not a fresh run of ours
    dist.barrier()  # every rank has checked before rank 0 writes the first file
    args.data = absolute_spec(args.data)  # resumes and evals read the same files
    tokenizer_file = args.out / "tokenizer.json"
    if env.is_main:  # one rank trains the tokenizer, the others read it
        docs = load_corpus(args.data)
        train_text = [split_text(doc, args.val_fraction)[0] for doc in docs]
        tokenizer = (Tokenizer.train_bpe(train_text, args.vocab_size,
                                         show_progress=None if not args.no_progress else False)
                     if args.tokenizer == "bpe" else Tokenizer.byte_level())
        run.mark()  # the run's first file: its folder is now a run
        tokenizer.save(tokenizer_file)
    dist.barrier()
    tokenizer = Tokenizer.load(tokenizer_file)
    mcfg = lm_model_config(args, tokenizer.vocab_size)
    seq_len = args.seq_len or mcfg.max_seq_len
    steps = args.steps
    if args.tokens:
        steps = max(1, math.ceil(args.tokens / (args.batch_size * seq_len)))
    cfg = train_config(args, TrainConfig, steps=steps, grad_accum=args.grad_accum,
                       seq_len=args.seq_len, eval_batches=args.eval_batches,
                       distill=args.distill)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    return MatFormerLM(mcfg), tokenizer, cfg


def train(args: argparse.Namespace) -> Result:
    from .. import checkpoint as ckpt
    from .. import distributed as dist
    from ..data import prepare_data
    from ..runs import RunDir
    from ..task import LMTask
    from ..train import TrainConfig, run

    with dist.session(args.device) as env:
        say = print if env.is_main else (lambda *a, **k: None)
        if args.resume:
            cfg = RunDir(args.out).read_train_config(TrainConfig)
            if args.parallel:
                cfg = dataclasses.replace(cfg, parallel=args.parallel)
            model, tokenizer = load_checkpoint(args.out)
            say(f"resuming {ckpt.resolve(args.out)} with its saved settings on "
                f"{env.world_size} process(es)")
        else:
            model, tokenizer, cfg = _new_run(args, env)
        if env.is_main:  # tokenise once into the shared cache before the other ranks read it
            data = prepare_data(cfg.data, tokenizer, val_fraction=cfg.val_fraction)
        dist.barrier()
        if not env.is_main:
            data = prepare_data(cfg.data, tokenizer, val_fraction=cfg.val_fraction)
        mc = model.config
        task = LMTask(data, tokenizer, cfg.seq_len or mc.max_seq_len)
        grans = ", ".join(f"{n}={mc.ffn_widths(n)[0]}" for n in mc.names)
        say(f"model: {model.num_params() / 1e6:.2f}M params "
            f"({mc.num_params(embedding=False) / 1e6:.2f}M non-embedding); FFN widths {grans}")
        say(f"data: {cfg.data}: {len(data.train):,} train / {len(data.val):,} val tokens; "
            f"{cfg.steps} steps x {cfg.batch_size} x {task.seq_len} tokens, mode={cfg.mode}"
            + (f", {cfg.parallel} on {env.world_size} ranks" if env.distributed else ""))
        trainer, _, final, elapsed = run(model, task, cfg, args.out, env, resume=args.resume,
                                         progress=not args.no_progress)
    if not env.is_main:
        return None, ""
    latest = (args.out / "latest").read_text().strip()
    result = {"out": str(args.out), "steps": trainer.step, "seconds": elapsed,
              "val_loss": final, "checkpoint": latest}
    return result, (_loss_table(final, data, tokenizer.vocab_size)
                    + f"\ntrained {trainer.step} steps in {elapsed / 60:.1f} min; checkpoint: "
                    f"{args.out / 'latest'} -> {latest}")


def _loss_table(losses: dict[str, float], data: Any, vocab_size: int) -> str:
    from ..data import unigram_entropy
    from ..metrics import perplexity

    lines = [f"{'granularity':<12}{'val loss':>10}{'ppl':>10}"]
    lines += [f"{name:<12}{loss:>10.4f}{perplexity(loss):>10.2f}" for name, loss in losses.items()]
    entropy = unigram_entropy(data.val, vocab_size)
    return "\n".join([*lines, f"(unigram entropy of the validation tokens: {entropy:.4f})"])


def evaluate(args: argparse.Namespace) -> Result:
    from .. import checkpoint as ckpt
    from ..metrics import evaluate_loss, perplexity
    from ..submodels.extract import heads_record

    model, tokenizer = load_checkpoint(args.checkpoint)
    batches, info = checkpoint_batches(args, model, tokenizer)
    cfg = model.config
    one = chosen_submodel(args, model) if args.widths or args.granularity else None
    targets = ([one] if one is not None else
               [with_skipped_attention(args, cfg, s) for s in cfg.granularities()])
    rows = []
    for sub in targets:
        loss = evaluate_loss(model, batches, widths=sub, precision=args.precision)
        rows.append({"name": sub.name or "custom", "widths": list(sub.widths),
                     "params": cfg.num_params(sub),
                     "non_embedding_params": cfg.num_params(sub, embedding=False),
                     "val_loss": loss, "perplexity": perplexity(loss)})
        if heads_record(model, sub) is not None:
            rows[-1]["heads"] = list(sub.heads)
    result = {"checkpoint": str(ckpt.resolve(args.checkpoint)), **info, "results": rows}
    lines = [f"{result['checkpoint']} on {info['data']} ({result['val_tokens']:,} validation "
             f"tokens in windows of {info['seq_len']})",
             f"{'submodel':<10}{'FFN widths':<28}{'non-emb params':>15}{'val loss':>10}{'ppl':>9}"]
    for r in rows:
        w = r["widths"]
        ws = str(w[0]) + " (all layers)" if len(set(w)) == 1 else ",".join(map(str, w))
        lines.append(f"{r['name']:<10}{ws:<28}{r['non_embedding_params'] / 1e6:>14.2f}M"
                     f"{r['val_loss']:>10.4f}{r['perplexity']:>9.2f}")
    if args.skip_attention:
        lines.append(f"(attention skipped in layers {args.skip_attention})")
    lines.append(f"(unigram entropy of the validation tokens: {result['unigram_entropy']:.4f} "
                 "nats)")
    return result, "\n".join(lines)


def consistency(args: argparse.Namespace) -> Result:
    from .. import checkpoint as ckpt
    from ..metrics import evaluate_consistency, granularity_consistency

    model, tokenizer = load_checkpoint(args.checkpoint)
    cfg = model.config
    extra = dict(zip(args.widths, extra_widths(args, cfg), strict=True))
    bases = [load_checkpoint(b) for b in args.baselines or []]
    if len(bases) == 1:
        raise ValueError("--baselines needs at least two checkpoints (the last is the reference)")
    if any(tok != tokenizer for _, tok in bases):
        raise ValueError("every baseline must use the checkpoint's tokenizer")
    batches, info = checkpoint_batches(args, model, tokenizer)
    rows = granularity_consistency(model, batches, extra=extra, precision=args.precision)
    for name, r in rows.items():
        sub = cfg.submodel(extra.get(name, name if name in cfg.names else None))
        r.update(widths=list(sub.widths), non_embedding_params=cfg.num_params(sub, embedding=False))
    base_rows: dict[str, dict[str, Any]] = {}
    if bases:
        names = [b.config.names[-1] for b, _ in bases]
        if len(set(names)) != len(names):
            names = [f"{n}#{i}" for i, n in enumerate(names)]
        base_rows = evaluate_consistency({n: (b, None) for n, (b, _) in zip(names, bases,
                                                                           strict=True)},
                                         (bases[-1][0], None), batches, precision=args.precision)
        for n, (b, _) in zip(names, bases, strict=True):
            base_rows[n]["non_embedding_params"] = b.config.num_params(embedding=False)
    result = {"checkpoint": str(ckpt.resolve(args.checkpoint)), "data": info["data"],
              "prefixes": next(iter(rows.values()))["tokens"], "matformer": rows,
              "baselines": base_rows or None}
    lines = [f"{result['checkpoint']} on {info['data']}: {result['prefixes']:,} validation "
             "prefixes; hard = greedy next-token agreement with XL, soft = KL(XL || submodel) "
             "in nats"]
    head = f"{'submodel':<10}{'non-emb':>9}{'hard':>9}{'soft KL':>9}"
    lines.append(head + (f"   | {'baseline':<10}{'non-emb':>9}{'hard':>9}{'soft KL':>9}"
                         if bases else ""))
    for name in [*rows, *(n for n in base_rows if n not in rows)]:
        r, b = rows.get(name), base_rows.get(name)
        left = (f"{name:<10}{r['non_embedding_params'] / 1e6:>8.2f}M{r['hard']:>9.2%}"
                f"{r['soft_kl']:>9.4f}" if r else " " * 37)
        right = (f"   | {name:<10}{b['non_embedding_params'] / 1e6:>8.2f}M{b['hard']:>9.2%}"
                 f"{b['soft_kl']:>9.4f}" if b else "")
        lines.append(left + right)
    return result, "\n".join(lines)
