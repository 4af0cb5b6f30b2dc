"""The ``matformer`` command line: train, eval, generate.

Only this module prints; the library logs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

EXAMPLES = """\
examples:
  matformer train --preset demo --data shakespeare --out runs/demo      # nested LM, ~10 min CPU
  matformer train --preset demo --mode baseline --granularity S --out runs/base-S
  matformer train --out runs/demo --resume                             # continue a killed run
  matformer eval runs/demo                                             # S/M/L/XL loss table
  matformer eval runs/demo --widths 128,128,256,256,512,1024 --json
  matformer generate runs/demo --prompt "ROMEO." --granularity S
  matformer vision train --out runs/vit                                # MatViT on 8x8 digits
"""


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers separated by commas") from e


def _add_train(sub: argparse._SubParsersAction) -> None:
    from .config import PRESETS
    from .data import CORPORA
    from .train import MODES

    p = sub.add_parser(
        "train", help="train a nested LM (or a dense baseline)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a MatFormer LM. Modes: 'sample' draws one granularity per step "
        "(the paper's recipe), 'joint' trains all granularities on every batch, 'baseline' "
        "trains an ordinary dense model at one granularity's width.\n\nToken budgets: the paper "
        "gives a MatFormer 4X tokens when each of its 4 baselines gets X; use --tokens for that.",
        epilog=EXAMPLES)
    p.add_argument("--out", required=True, type=Path, help="run directory (created)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint, with its saved "
                   "settings (other flags are ignored)")
    m = p.add_argument_group("model")
    m.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    m.add_argument("--ratios", type=_floats, help="granularities as fractions of d_ff, e.g. "
                   "0.125,0.25,0.5,1 (default: the paper's S/M/L/XL)")
    m.add_argument("--names", help="granularity names, comma separated (default S,M,L,XL)")
    m.add_argument("--activation", choices=("swiglu", "gelu", "relu2"))
    m.add_argument("--n-kv-head", type=int, help="key/value heads (grouped-query attention)")
    m.add_argument("--nest-heads", action="store_true", help="nest attention heads too")
    m.add_argument("--tokenizer", default="bpe", choices=("bpe", "byte"))
    m.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    d = p.add_argument_group("data")
    d.add_argument("--data", default="shakespeare",
                   help=f"embedded corpus {CORPORA}, a text file, a directory or a glob")
    d.add_argument("--val-fraction", type=float, default=0.1)
    t = p.add_argument_group("training")
    t.add_argument("--mode", default="sample", choices=MODES)
    t.add_argument("--granularity", default="XL", help="baseline mode: which width to train")
    t.add_argument("--steps", type=int, default=600)
    t.add_argument("--tokens", type=float, help="token budget; sets --steps")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--seq-len", type=int)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--warmup-steps", type=int, default=50)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--probs", type=_floats, help="sample mode: per-granularity probabilities")
    t.add_argument("--loss-weights", type=_floats, help="joint mode: per-granularity weights")
    t.add_argument("--eval-interval", type=int, default=100)
    t.add_argument("--eval-batches", type=int, default=20)
    t.add_argument("--ckpt-interval", type=int, default=100)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    t.add_argument("--parallel", choices=("none", "ddp", "fsdp"),
                   help="data parallelism when launched by torchrun with several processes "
                   "(default ddp; may be changed on --resume, as may the number of processes)")
    t.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: CUDA (NCCL) when available, else CPU (gloo)")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="validation loss/perplexity of every granularity or widths",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="checkpoint or run directory")
    p.add_argument("--granularity", help="only this granularity (default: all)")
    p.add_argument("--widths", help="per-layer FFN widths: one int, or one per layer")
    p.add_argument("--data", help="corpus (default: the one the checkpoint was trained on)")
    p.add_argument("--batches", type=int, help="limit validation batches (default: all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precision", default="fp32", choices=("bf16", "fp32"))
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    examples = """\
examples:
  matformer generate runs/demo --prompt "ROMEO." --granularity S --stream
  matformer generate runs/demo --prompt "ROMEO." --prompt "JULIET." --temperature 0  # a batch
  matformer generate runs/demo --prompt "ROMEO." --draft S --shared-cache --stats  # S drafts XL
  matformer generate runs/demo --granularity L --draft M --adaptive --temperature 0.8
  matformer generate runs/demo --draft-model runs/base-S --stats       # external drafter
"""
    p = sub.add_parser(
        "generate", help="sample text from any submodel (KV cache; speculative with --draft)",
        description="Generate with a KV cache from any submodel. With --draft, a smaller "
        "submodel of the same weights drafts tokens that the target (--granularity/--widths, "
        "default the full model) verifies: the output follows the target's distribution "
        "(token for token at --temperature 0).",
        epilog=examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="checkpoint or run directory")
    p.add_argument("--prompt", action="append",
                   help="prompt text; repeat for a batch (left-padded; default: a newline)")
    p.add_argument("--granularity", help="submodel by name (default: the full model)")
    p.add_argument("--widths", help="per-layer FFN widths: one int, or one per layer")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--no-cache", action="store_true",
                   help="the slow reference decoder (re-runs the whole context every token)")
    p.add_argument("--stats", action="store_true",
                   help="print tokens/s (and, speculative, acceptance) to stderr")
    p.add_argument("--json", action="store_true")
    s = p.add_argument_group("speculative decoding")
    s.add_argument("--draft", help="drafter: a granularity name or per-layer widths of the "
                   "same weights (or of --draft-model)")
    s.add_argument("--draft-model", type=Path,
                   help="a separately trained drafter checkpoint with the same tokenizer")
    s.add_argument("--shared-cache", action="store_true",
                   help="one KV cache for drafter and target (the target overwrites the draft's)")
    s.add_argument("--draft-len", type=int, default=4, help="tokens drafted per round")
    s.add_argument("--adaptive", action="store_true",
                   help="grow/shrink the draft length with the acceptance")


def _add_consistency(sub: argparse._SubParsersAction) -> None:
    examples = """\
examples:
  matformer consistency runs/demo                      # S/M/L vs XL on validation prefixes
  matformer consistency runs/demo --widths 128,128,256,256,512,1024 --json
  matformer consistency runs/demo --baselines runs/base-S runs/base-M runs/base-L runs/base-XL
"""
    p = sub.add_parser(
        "consistency", help="how often submodels agree with the full model (hard %%, soft KL)",
        description="Consistency (paper sec. 3.4): hard = %% of validation prefixes where a "
        "submodel's greedy next token equals the full model's; soft = mean KL(full || "
        "submodel) of the next-token distributions. With --baselines, the same numbers for "
        "independently trained dense models against the last of them (their XL), side by side.",
        epilog=examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="checkpoint or run directory")
    p.add_argument("--widths", action="append", default=[],
                   help="also measure these per-layer FFN widths (repeatable)")
    p.add_argument("--baselines", nargs="+", type=Path, metavar="CKPT",
                   help="dense baselines, one per granularity; the last is their reference")
    p.add_argument("--data", help="corpus (default: the one the checkpoint was trained on)")
    p.add_argument("--batches", type=int, default=20, help="validation batches (default 20)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precision", default="fp32", choices=("bf16", "fp32"))
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


MIXNMATCH_EXAMPLES = """\
examples:
  matformer mixnmatch runs/demo                         # sweep -> runs/demo/mixnmatch/
  matformer mixnmatch runs/demo --patterns rule,decreasing,random --batches 10 --threads 1
  matformer mixnmatch runs/demo --baselines runs/base-S runs/base-XL
  matformer mixnmatch runs/demo --sweep runs/demo/mixnmatch --max-params 3e6   # pick, no sweep
  matformer extract runs/demo --granularity M --out runs/demo-M
  matformer extract runs/demo --widths 256,256,256,256,512,512 --out runs/demo-mix
  matformer extract runs/demo --max-latency-ms 8 --sweep runs/demo/mixnmatch --out runs/fast
  matformer export-hf runs/demo-mix --out hf/demo-mix --check
  matformer export-hf runs/demo --granularity S --out hf/demo-S
  matformer import-hf hf/demo-S --out runs/from-hf
"""


def _add_budgets(p: argparse.ArgumentParser) -> None:
    b = p.add_argument_group("budget (pick the lowest-loss submodel that fits all given limits)")
    b.add_argument("--max-params", type=float, help="total parameters")
    b.add_argument("--max-flops", type=float, help="forward FLOPs per token")
    b.add_argument("--max-latency-ms", type=float, help="measured prefill latency (ms)")
    b.add_argument("--max-decode-ms", type=float, help="measured decode-step latency (ms)")
    b.add_argument("--sweep", type=Path, help="a stored mixnmatch.json (or its directory) to "
                   "pick from; default: evaluate the candidates that fit, now")


def _add_submodel(p: argparse.ArgumentParser) -> None:
    p.add_argument("--granularity", help="a uniform granularity by name (S, M, ...)")
    p.add_argument("--widths", help="per-layer FFN widths: one int, or one per layer")
    p.add_argument("--any-width", action="store_true",
                   help="allow widths outside the trained nested set (untrained submodels)")


def _add_eval_data(p: argparse.ArgumentParser, batches: int | None) -> None:
    p.add_argument("--data", help="corpus (default: the one the checkpoint was trained on)")
    p.add_argument("--batches", type=int, default=batches, help="validation batches "
                   f"(default: {batches or 'all'})")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precision", default="fp32", choices=("bf16", "fp32"))
    p.add_argument("--repeats", type=int, default=7, help="latency: timed rounds (median)")
    p.add_argument("--prefill-len", type=int, default=128, help="latency: prompt tokens")
    p.add_argument("--threads", type=int, help="latency: torch threads while timing "
                   "(1 is steadier on a shared CPU; default: torch's setting)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_mixnmatch(sub: argparse._SubParsersAction) -> None:
    from .mixnmatch import PATTERNS

    p = sub.add_parser("mixnmatch", help="sweep Mix'n'Match submodels: loss, size, latency",
                       epilog=MIXNMATCH_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Evaluate per-layer-width submodels picked by the paper's "
                       "rule (non-decreasing with depth, least slope; one per reachable size) "
                       "on held-out data, measure their latency here, write mixnmatch.json, "
                       "mixnmatch.png and mixnmatch.md, and optionally pick one for a budget.")
    p.add_argument("checkpoint", type=Path, help="checkpoint or run directory")
    p.add_argument("--out", type=Path, help="output directory (default: CHECKPOINT/mixnmatch)")
    p.add_argument("--patterns", default="rule", help="comma-separated, from "
                   f"{','.join(PATTERNS)} (default: rule; the others are ablations)")
    p.add_argument("--widths", action="append", default=[],
                   help="an extra candidate (repeatable): one int or one per layer")
    p.add_argument("--any-width", action="store_true", help="allow untrained widths")
    p.add_argument("--baselines", nargs="+", type=Path, default=[],
                   help="independently trained dense checkpoints to overlay")
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    p.add_argument("--seed", type=int, default=0, help="seed of the random pattern")
    _add_eval_data(p, batches=None)
    _add_budgets(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_extract(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="save any submodel as a standalone dense checkpoint",
                       epilog=MIXNMATCH_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, required=True, help="new checkpoint directory")
    p.add_argument("--name", help="granularity name stored in the config (default: derived)")
    _add_submodel(p)
    _add_budgets(p)
    _add_eval_data(p, batches=20)
    p.add_argument("--json", action="store_true")


def _add_export_hf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-hf", help="write a Hugging Face transformers folder",
                       epilog=MIXNMATCH_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Export a checkpoint (or one of its submodels) as a folder "
                       "that stock transformers loads with AutoModelForCausalLM/AutoTokenizer "
                       "(no trust_remote_code). swiglu -> Llama, gelu/relu2 -> Arcee. Per-layer "
                       "widths are zero-padded to the widest layer: exact, but no faster than it.")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, required=True)
    _add_submodel(p)
    p.add_argument("--no-pad", action="store_true",
                   help="refuse per-layer widths instead of zero-padding them")
    p.add_argument("--check", action="store_true",
                   help="load the folder with transformers and compare logits with ours")
    p.add_argument("--json", action="store_true")


def _add_import_hf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-hf", help="convert a Llama/Arcee transformers folder to ours",
                       epilog=MIXNMATCH_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--out", type=Path, required=True, help="new checkpoint directory")
    p.add_argument("--data", help="record this corpus so `matformer eval` needs no --data")
    p.add_argument("--json", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="matformer", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Nested Transformers for elastic inference: train one model, run any of "
        "its submodels (a width per layer).", epilog=EXAMPLES)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_eval(sub)
    _add_generate(sub)
    _add_consistency(sub)
    _add_mixnmatch(sub)
    _add_extract(sub)
    _add_export_hf(sub)
    _add_import_hf(sub)
    _add_vision(sub)
    return parser


# --------------------------------------------------------------------------- commands
def _train(args: argparse.Namespace) -> int:
    from . import checkpoint as ckpt
    from . import distributed as dist
    from .config import preset
    from .data import load_corpus, prepare_data
    from .model import MatFormerLM
    from .tokenizer import Tokenizer
    from .train import TRAIN_CONFIG, LMTask, TrainConfig, Trainer

    env = dist.setup(args.device)
    say = print if env.is_main else (lambda *a, **k: None)
    if args.resume:
        cfg = TrainConfig.from_dict(json.loads((args.out / TRAIN_CONFIG).read_text()))
        if args.parallel:
            cfg = dataclasses.replace(cfg, parallel=args.parallel)
        model, tokenizer = ckpt.load_checkpoint(args.out)
        say(f"resuming {ckpt.resolve(args.out)} with its saved settings on {env.world_size} "
            f"process(es)")
    else:
        if (args.out / ckpt.LATEST).exists():
            say(f"error: {args.out} already holds a run; pass --resume to continue it or "
                "choose another --out", file=sys.stderr)
            return 2
        tokenizer_file = args.out / "tokenizer.json"
        if env.is_main:  # one rank trains the tokenizer, the others read it
            docs = load_corpus(args.data)
            train_text = [doc[: int(len(doc) * (1 - args.val_fraction))] for doc in docs]
            tokenizer = (Tokenizer.train_bpe(train_text, args.vocab_size)
                         if args.tokenizer == "bpe" else Tokenizer.byte_level())
            tokenizer.save(tokenizer_file)
        dist.barrier()
        tokenizer = Tokenizer.load(tokenizer_file)
        mcfg = preset(args.preset, vocab_size=tokenizer.vocab_size, **_model_overrides(args))
        if args.mode == "baseline":
            mcfg = mcfg.dense(args.granularity)
        seq_len = args.seq_len or mcfg.max_seq_len
        steps = args.steps
        if args.tokens:
            steps = max(1, math.ceil(args.tokens / (args.batch_size * seq_len)))
        cfg = TrainConfig(
            mode=args.mode, data=args.data, val_fraction=args.val_fraction, steps=steps,
            batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len,
            lr=args.lr, warmup_steps=min(args.warmup_steps, max(1, steps // 10)),
            weight_decay=args.weight_decay, grad_clip=args.grad_clip, probs=args.probs,
            loss_weights=args.loss_weights, eval_interval=args.eval_interval,
            eval_batches=args.eval_batches, ckpt_interval=args.ckpt_interval, seed=args.seed,
            precision=args.precision, parallel=args.parallel or "ddp")
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = MatFormerLM(mcfg)
    if env.is_main:  # tokenise once into the shared cache before the other ranks read it
        data = prepare_data(cfg.data, tokenizer, val_fraction=cfg.val_fraction)
    dist.barrier()
    if not env.is_main:
        data = prepare_data(cfg.data, tokenizer, val_fraction=cfg.val_fraction)
    mc = model.config
    task = LMTask(data, tokenizer, cfg.seq_len or mc.max_seq_len)
    wrapped = dist.wrap(model.to(env.device), cfg.parallel, env, cfg.precision)
    trainer = Trainer(wrapped, task, cfg, args.out, env=env, progress=not args.no_progress)
    if args.resume:
        trainer.resume()
    grans = ", ".join(f"{n}={mc.ffn_widths(n)[0]}" for n in mc.names)
    say(f"model: {model.num_params() / 1e6:.2f}M params "
        f"({mc.num_params(embedding=False) / 1e6:.2f}M non-embedding); FFN widths {grans}")
    say(f"data: {cfg.data}: {len(data.train):,} train / {len(data.val):,} val tokens; "
        f"{cfg.steps} steps x {cfg.batch_size} x {task.seq_len} tokens, mode={cfg.mode}"
        + (f", {cfg.parallel} on {env.world_size} ranks" if env.distributed else ""))
    t0 = time.perf_counter()
    final = trainer.fit()
    elapsed = time.perf_counter() - t0
    if env.is_main:
        _print_losses(final, data, tokenizer.vocab_size)
        say(f"trained {trainer.step} steps in {elapsed / 60:.1f} min; checkpoint: "
            f"{args.out / 'latest'} -> {(args.out / 'latest').read_text().strip()}")
    dist.teardown()
    return 0


def _model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if args.ratios:
        overrides["ratios"] = args.ratios
        overrides["names"] = (tuple(args.names.split(",")) if args.names
                              else tuple(f"g{i}" for i in range(len(args.ratios))))
    elif args.names:
        overrides["names"] = tuple(args.names.split(","))
    for key in ("activation", "n_kv_head"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.nest_heads:
        overrides["nest_heads"] = True
    return overrides


def _print_losses(losses: dict[str, float], data: Any, vocab_size: int) -> None:
    from .data import unigram_entropy
    from .metrics import perplexity

    print(f"{'granularity':<12}{'val loss':>10}{'ppl':>10}")
    for name, loss in losses.items():
        print(f"{name:<12}{loss:>10.4f}{perplexity(loss):>10.2f}")
    print(f"(unigram entropy of the validation tokens: {unigram_entropy(data.val, vocab_size):.4f})")


def _eval(args: argparse.Namespace) -> int:
    from . import checkpoint as ckpt
    from .config import parse_widths
    from .data import prepare_data, unigram_entropy
    from .metrics import evaluate_loss, perplexity

    model, tokenizer = ckpt.load_checkpoint(args.checkpoint)
    meta = ckpt.read_metadata(args.checkpoint)
    corpus = args.data or meta.get("data")
    if corpus is None:
        print("error: this checkpoint does not record its data; pass --data", file=sys.stderr)
        return 2
    data = prepare_data(corpus, tokenizer, val_fraction=meta.get("val_fraction", 0.1))
    cfg = model.config
    seq_len = meta.get("seq_len", cfg.max_seq_len)
    if args.widths:
        targets = {"custom": parse_widths(args.widths, cfg.n_layer)}
    elif args.granularity:
        targets = {args.granularity: cfg.ffn_widths(args.granularity)}
    else:
        targets = {name: cfg.ffn_widths(name) for name in cfg.names}
    batches = list(data.val_batches(args.batch_size, seq_len, args.batches))
    rows = []
    for name, widths in targets.items():
        heads = name if cfg.nest_heads and name in cfg.names else None
        loss = evaluate_loss(model, batches, widths=widths, heads=heads, precision=args.precision)
        rows.append({"name": name, "widths": list(model.resolve_widths(widths)),
                     "params": cfg.num_params(widths),
                     "non_embedding_params": cfg.num_params(widths, embedding=False),
                     "val_loss": loss, "perplexity": perplexity(loss)})
    result = {"checkpoint": str(ckpt.resolve(args.checkpoint)), "data": corpus,
              "val_tokens": sum(y.numel() for _, y in batches),
              "unigram_entropy": unigram_entropy(data.val, tokenizer.vocab_size), "results": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['checkpoint']} on {corpus} ({result['val_tokens']:,} validation tokens)")
    print(f"{'submodel':<10}{'FFN widths':<28}{'non-emb params':>15}{'val loss':>10}{'ppl':>9}")
    for r in rows:
        w = r["widths"]
        ws = str(w[0]) + " (all layers)" if len(set(w)) == 1 else ",".join(map(str, w))
        print(f"{r['name']:<10}{ws:<28}{r['non_embedding_params'] / 1e6:>14.2f}M"
              f"{r['val_loss']:>10.4f}{r['perplexity']:>9.2f}")
    print(f"(unigram entropy of the validation tokens: {result['unigram_entropy']:.4f} nats)")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from . import checkpoint as ckpt
    from .config import parse_widths
    from .generate import generate, generate_stream
    from .speculative import SpecStats, speculative_stream

    model, tokenizer = ckpt.load_checkpoint(args.checkpoint)
    cfg = model.config
    widths: Any = args.granularity
    if args.widths:
        widths = parse_widths(args.widths, cfg.n_layer)
    heads = args.granularity if cfg.nest_heads and args.granularity else None
    prompts = [tokenizer.encode(p) or [tokenizer.eos_id] for p in args.prompt or ["\n"]]
    gen = torch.Generator().manual_seed(args.seed)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    eos_id=tokenizer.eos_id, generator=gen)
    speculative = args.draft is not None or args.draft_model is not None
    if speculative and (len(prompts) > 1 or args.no_cache):
        raise ValueError("speculative decoding takes one --prompt and needs the KV cache")
    stats: SpecStats | None = None
    pieces: Any  # each piece: the new tokens of every row
    if speculative:
        draft_model = None
        if args.draft_model:
            draft_model, draft_tok = ckpt.load_checkpoint(args.draft_model)
            if draft_tok != tokenizer:
                raise ValueError(f"{args.draft_model} uses another tokenizer than the target")
        dcfg = (draft_model or model).config
        draft: Any = args.draft
        if draft is not None and draft not in dcfg.names:
            draft = parse_widths(draft, dcfg.n_layer)
        stats = SpecStats()
        pieces = ([t.tolist()] for t in speculative_stream(
            model, torch.tensor(prompts[0]), args.max_new_tokens, draft=draft, target=widths,
            target_heads=heads, draft_model=draft_model, shared_cache=args.shared_cache,
            draft_len=args.draft_len, adaptive=args.adaptive, stats=stats, **sampling))
    elif args.no_cache or (len(prompts) == 1 and
                           len(prompts[0]) + args.max_new_tokens - 1 > cfg.max_seq_len):
        # Longer than the context: the reference decoder slides its window (no cache).
        out = generate(model, torch.tensor(prompts), args.max_new_tokens, widths=widths,
                       heads=heads, use_cache=False, **sampling)
        pieces = [out[:, len(prompts[0]):].tolist()]
    else:
        pieces = ([[t] for t in step.tolist()] for step in generate_stream(
            model, prompts, args.max_new_tokens, widths=widths, heads=heads, **sampling))
    new: list[list[int]] = [[] for _ in prompts]
    streaming = args.stream and len(prompts) == 1 and not args.json
    shown = tokenizer.decode(prompts[0], skip_special_tokens=True) if streaming else ""
    print(shown, end="", flush=True)
    t0 = time.perf_counter()
    for piece in pieces:
        for row, tokens in zip(new, piece, strict=True):
            row.extend(tokens)
        if streaming:
            text = tokenizer.decode(prompts[0] + new[0], skip_special_tokens=True)
            print(text[len(shown):], end="", flush=True)
            shown = text
    elapsed = time.perf_counter() - t0
    texts = [tokenizer.decode(p + n, skip_special_tokens=True) for p, n in zip(prompts, new,
                                                                              strict=True)]
    n_new = sum(len(n) for n in new)
    info: dict[str, Any] = {"new_tokens": n_new, "seconds": elapsed,
                            "tokens_per_second": n_new / elapsed if elapsed else 0.0}
    if stats is not None:
        info.update(stats.as_dict())
    if args.json:
        print(json.dumps({"widths": list(model.resolve_widths(widths)), "text": texts[0],
                          "texts": texts, "stats": info}))
        return 0
    if streaming:
        print()
    else:
        print("\n\n".join(texts))
    if args.stats:
        line = f"{n_new} tokens in {elapsed:.2f}s ({info['tokens_per_second']:.1f} tokens/s)"
        if stats is not None:
            line += (f"; {stats.mode}: acceptance {stats.acceptance_rate:.1%}, "
                     f"{stats.tokens_per_target_forward:.2f} tokens per target forward, "
                     f"{stats.rounds} rounds")
        print(line, file=sys.stderr)
    return 0


def _consistency(args: argparse.Namespace) -> int:
    from . import checkpoint as ckpt
    from .config import parse_widths
    from .data import prepare_data
    from .metrics import Submodel, evaluate_consistency, granularity_consistency

    model, tokenizer = ckpt.load_checkpoint(args.checkpoint)
    meta = ckpt.read_metadata(args.checkpoint)
    corpus = args.data or meta.get("data")
    if corpus is None:
        print("error: this checkpoint does not record its data; pass --data", file=sys.stderr)
        return 2
    cfg = model.config
    extra = {w: parse_widths(w, cfg.n_layer) for w in args.widths}
    bases = [ckpt.load_checkpoint(b) for b in args.baselines or []]
    if len(bases) == 1:
        raise ValueError("--baselines needs at least two checkpoints (the last is the reference)")
    if any(tok != tokenizer for _, tok in bases):
        raise ValueError("every baseline must use the checkpoint's tokenizer")
    data = prepare_data(corpus, tokenizer, val_fraction=meta.get("val_fraction", 0.1))
    seq_len = meta.get("seq_len", cfg.max_seq_len)
    batches = list(data.val_batches(args.batch_size, seq_len, args.batches))
    rows = granularity_consistency(model, batches, extra=extra, precision=args.precision)
    for name, r in rows.items():
        w = model.resolve_widths(extra.get(name, name if name in cfg.names else None))
        r.update(widths=list(w), non_embedding_params=cfg.num_params(w, embedding=False))
    base_rows: dict[str, dict[str, Any]] = {}
    if bases:
        names = [b.config.names[-1] for b, _ in bases]
        if len(set(names)) != len(names):
            names = [f"{n}#{i}" for i, n in enumerate(names)]
        base_rows = evaluate_consistency({n: Submodel(b) for n, (b, _) in zip(names, bases,
                                                                             strict=True)},
                                         Submodel(bases[-1][0]), batches,
                                         precision=args.precision)
        for n, (b, _) in zip(names, bases, strict=True):
            base_rows[n]["non_embedding_params"] = b.config.num_params(embedding=False)
    result = {"checkpoint": str(ckpt.resolve(args.checkpoint)), "data": corpus,
              "prefixes": next(iter(rows.values()))["tokens"], "matformer": rows,
              "baselines": base_rows or None}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['checkpoint']} on {corpus}: {result['prefixes']:,} validation prefixes; "
          "hard = greedy next-token agreement with XL, soft = KL(XL || submodel) in nats")
    head = f"{'submodel':<10}{'non-emb':>9}{'hard':>9}{'soft KL':>9}"
    print(head + (f"   | {'baseline':<10}{'non-emb':>9}{'hard':>9}{'soft KL':>9}"
                  if bases else ""))
    for name in [*rows, *(n for n in base_rows if n not in rows)]:
        r, b = rows.get(name), base_rows.get(name)
        left = (f"{name:<10}{r['non_embedding_params'] / 1e6:>8.2f}M{r['hard']:>9.2%}"
                f"{r['soft_kl']:>9.4f}" if r else " " * 37)
        right = (f"   | {name:<10}{b['non_embedding_params'] / 1e6:>8.2f}M{b['hard']:>9.2%}"
                 f"{b['soft_kl']:>9.4f}" if b else "")
        print(left + right)
    return 0


def _budgets(args: argparse.Namespace) -> dict[str, float | None]:
    return {k: getattr(args, k) for k in ("max_params", "max_flops", "max_latency_ms",
                                          "max_decode_ms")}


def _submodel_widths(args: argparse.Namespace, model: Any) -> Any:
    from .config import parse_widths
    from .mixnmatch import check_widths

    if args.widths and args.granularity:
        raise ValueError("give --granularity or --widths, not both")
    if args.widths:
        return check_widths(model.config, parse_widths(args.widths, model.config.n_layer),
                            nested=not args.any_width)
    return args.granularity


def _sweep_kw(args: argparse.Namespace) -> dict[str, Any]:
    return {"precision": args.precision, "prefill_len": args.prefill_len,
            "repeats": args.repeats, "threads": args.threads, "progress": not args.no_progress}


def _print_row(r: dict[str, Any], prefix: str = "") -> None:
    lat = (f", prefill {r['prefill_ms']:.2f} ms, decode {r['decode_ms']:.3f} ms"
           if "prefill_ms" in r else "")
    print(f"{prefix}{r['name']}: widths {','.join(map(str, r['widths']))}; "
          f"{r['params'] / 1e6:.3f}M params ({r['non_embedding_params'] / 1e6:.3f}M "
          f"non-embedding), {r['flops_per_token'] / 1e6:.1f} MFLOPs/token{lat}; "
          f"val loss {r['val_loss']:.4f}")


def _mixnmatch(args: argparse.Namespace) -> int:
    from . import checkpoint as ckpt
    from . import mixnmatch as mm
    from .config import parse_widths
    from .report import load_sweep, markdown_table, write_report

    budgets = _budgets(args)
    if args.sweep:
        result = load_sweep(args.sweep)
    else:
        model, tokenizer = ckpt.load_checkpoint(args.checkpoint)
        cfg = model.config
        batches, info = mm.validation_batches(args.checkpoint, tokenizer, data=args.data,
                                              batch_size=args.batch_size,
                                              max_batches=args.batches)
        extra = [parse_widths(w, cfg.n_layer) for w in args.widths]
        cands = mm.candidates(cfg, [p.strip() for p in args.patterns.split(",") if p.strip()],
                              widths=extra, seed=args.seed, nested=not args.any_width)
        kw = {**_sweep_kw(args), "seq_len": info["seq_len"], "latency": not args.no_latency}
        baselines = []
        for path in args.baselines:
            bm, btok = ckpt.load_checkpoint(path)
            if btok != tokenizer:
                raise ValueError(f"baseline {path} uses a different tokenizer: losses would "
                                 "not be comparable")
            baselines.append((f"baseline {bm.config.names[0]} ({path.name})", bm))
        rows = mm.sweep(model, batches, cands, baselines=baselines, **kw)
        rows, base_rows = rows[: len(cands)], rows[len(cands):]
        result = {"checkpoint": str(ckpt.resolve(args.checkpoint)), **info,
                  "config": cfg.to_dict(), "patterns": args.patterns,
                  "latency": None if args.no_latency else {
                      "prefill_len": args.prefill_len, "repeats": args.repeats,
                      "threads": args.threads or torch.get_num_threads(),
                      "decode": "one token step" + (" with KV cache"
                                                    if mm.supports_cache(model) else
                                                    " (single-token forward, no cache)")},
                  "candidates": rows, "baselines": base_rows}
        out = args.out or args.checkpoint / "mixnmatch"
        result["files"] = {k: str(v) for k, v in write_report(result, out).items()}
    chosen = None
    if any(v is not None for v in budgets.values()):
        chosen = mm.select(result["candidates"], **budgets)
    if args.json:
        print(json.dumps({**result, "selected": chosen}, indent=1))
        return 0
    if not args.sweep:
        print(markdown_table(result["candidates"] + result.get("baselines", [])), end="")
        n = len(result["candidates"])
        print(f"{n} submodels on {result['val_tokens']:,} validation tokens of "
              f"{result['data']}; wrote {', '.join(result['files'].values())}")
    if chosen is not None:
        _print_row(chosen, "best under the budget: ")
    return 0


def _extract(args: argparse.Namespace) -> int:
    from . import checkpoint as ckpt
    from . import mixnmatch as mm
    from .report import load_sweep

    model, tokenizer = ckpt.load_checkpoint(args.checkpoint)
    budgets = _budgets(args)
    chosen = None
    if any(v is not None for v in budgets.values()):
        if args.widths or args.granularity:
            raise ValueError("give a submodel (--granularity/--widths) or a budget, not both")
        if args.sweep:
            chosen = mm.select(load_sweep(args.sweep)["candidates"], **budgets)
        else:
            batches, info = mm.validation_batches(args.checkpoint, tokenizer, data=args.data,
                                                  batch_size=args.batch_size,
                                                  max_batches=args.batches)
            chosen = mm.choose(model, batches, mm.candidates(model.config), budgets,
                               seq_len=info["seq_len"], **_sweep_kw(args))
        widths = tuple(chosen["widths"])
    else:
        widths = _submodel_widths(args, model)
        if widths is None:
            raise ValueError("choose a submodel: --granularity, --widths or a budget "
                             "(--max-params / --max-flops / --max-latency-ms)")
    path = mm.save_extracted(args.out, model, tokenizer, widths, source=args.checkpoint,
                             name=args.name)
    sub = ckpt.load_checkpoint(path)[0]
    size = (path / ckpt.WEIGHTS).stat().st_size
    full = (ckpt.resolve(args.checkpoint) / ckpt.WEIGHTS).stat().st_size
    res = {"out": str(path), "name": sub.config.names[0], "widths": list(sub.config.ffn_dims),
           "params": sub.num_params(), "weights_bytes": size, "source_weights_bytes": full,
           "selected": chosen}
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    if chosen is not None:
        _print_row(chosen, "best under the budget: ")
    print(f"extracted {res['name']} (FFN widths {','.join(map(str, res['widths']))}, "
          f"{res['params'] / 1e6:.3f}M params) to {path}; weights {size / 1e6:.2f} MB vs "
          f"{full / 1e6:.2f} MB for the source")
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    from . import checkpoint as ckpt
    from .hf import export_hf

    model, tokenizer = ckpt.load_checkpoint(args.checkpoint)
    info = export_hf(model, tokenizer, args.out, widths=_submodel_widths(args, model),
                     pad=not args.no_pad)
    if args.check:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(args.out)).eval()
        x = torch.randint(0, model.config.vocab_size,
                          (2, min(32, model.config.max_seq_len)),
                          generator=torch.Generator().manual_seed(0))
        widths = _submodel_widths(args, model)
        with torch.no_grad():
            diff = (hf(x).logits - model(x, widths=widths)).abs().max().item()
        info["check_max_abs_logit_diff"] = diff
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"exported {info['architecture']} ({info['params'] / 1e6:.3f}M params) to "
          f"{info['out']}: {info['note']}")
    if info["padded"]:
        print(f"note: the folder holds {info['exported_params'] / 1e6:.3f}M parameters, "
              "zero padding included; load it with AutoModelForCausalLM.from_pretrained")
    if "check_max_abs_logit_diff" in info:
        print(f"check: transformers logits vs ours, max abs diff "
              f"{info['check_max_abs_logit_diff']:.2e}")
    return 0


def _import_hf(args: argparse.Namespace) -> int:
    from . import checkpoint as ckpt
    from .hf import import_hf

    model, tokenizer = import_hf(args.folder, name=args.folder.name)
    meta: dict[str, Any] = {"origin": {"hf_folder": str(args.folder)}}
    if args.data:
        meta["data"] = args.data
    path = ckpt.save_checkpoint(args.out, model, tokenizer, metadata=meta)
    res = {"out": str(path), "params": model.num_params(),
           "widths": list(model.config.ffn_dims)}
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"imported {args.folder} ({res['params'] / 1e6:.3f}M params, FFN widths "
              f"{','.join(map(str, res['widths']))}) to {path}")
    return 0


def _add_vision(sub: argparse._SubParsersAction) -> None:
    from .vision_cli import add_parser

    add_parser(sub)


def _vision(args: argparse.Namespace) -> int:
    """``matformer vision ...``: the commands live in vision_cli and return (result, text)."""
    from .vision_cli import run

    result, text = run(args)
    if result is not None:  # None: a non-main rank of a distributed run
        print(json.dumps(result, indent=1) if args.json else text)
    return 0


def _refuse_vision(args: argparse.Namespace) -> None:
    """Language-model commands given a MatViT checkpoint: say which commands fit it."""
    if args.command in ("eval", "generate", "consistency", "mixnmatch", "export-hf"):
        from .checkpoint import model_kind

        if model_kind(args.checkpoint) == "vit":
            raise ValueError(f"{args.checkpoint} is a vision (MatViT) checkpoint: use "
                             "`matformer vision eval|retrieve|mixnmatch` for it")


COMMANDS = {"train": _train, "eval": _eval, "generate": _generate, "consistency": _consistency}
COMMANDS |= {"vision": _vision}
COMMANDS |= {"mixnmatch": _mixnmatch, "extract": _extract, "export-hf": _export_hf,
             "import-hf": _import_hf}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``matformer`` console script."""
    torch.set_flush_denormal(True)  # fp32 denormals make CPU matmuls ~150x slower
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .checkpoint import CheckpointError

    try:
        _refuse_vision(args)
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
