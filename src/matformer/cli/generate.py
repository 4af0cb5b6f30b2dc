"""``matformer generate``: text from any submodel (KV cache, lean decode path, speculative
decoding with a nested drafter, drafter search). Returns ``(result, text)`` like every command;
with ``--stream`` it also prints the text as it grows."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .args import (
    DRAFT_LEN,
    MAX_DRAFT_LEN,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    SEED,
    Number,
    check_generate,
)
from .common import (
    Result,
    add_command,
    add_submodel,
    chosen_submodel,
    load_checkpoint,
)

#: ``generate --dtype`` choices: the dtype weights are cast to (int8: weight-only int8 copies
#: made by the decoding pool, the model itself stays fp32).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "int8": torch.float32}


def add_generate(sub: argparse._SubParsersAction) -> None:
    examples = """\
examples:
  matformer generate runs/demo --prompt "ROMEO." --granularity S --stream
  matformer generate runs/demo --prompt "ROMEO." --prompt "JULIET." --temperature 0  # a batch
  matformer generate runs/demo --prompt "ROMEO." --draft S --shared-cache --stats  # S drafts XL
  matformer generate runs/demo --granularity L --draft M --adaptive --temperature 0.8
  matformer generate runs/demo --draft-model runs/base-S --stats       # external drafter
  matformer generate runs/demo --draft auto --draft-table --adaptive --stats  # search a drafter
  matformer generate runs/demo --dtype bf16 --compile --stats   # bf16 weights + cache, compiled
  matformer generate runs/smollm2 --chat --prompt "What is the capital of France?" --temperature 0
"""
    p = add_command(
        sub, "generate", "sample text from any submodel (KV cache; speculative with --draft)",
        examples,
        description="Generate with a KV cache from any submodel. With --draft, a smaller "
        "submodel of the same weights drafts tokens that the target (--granularity/--widths, "
        "default the full model) verifies: the output follows the target's distribution "
        "(token for token at --temperature 0).")
    p.add_argument("checkpoint", type=Path, help="checkpoint or run directory")
    p.add_argument("--prompt", action="append",
                   help="prompt text; repeat for a batch (left-padded; default: a newline)")
    p.add_argument("--chat", action="store_true",
                   help="each --prompt is a user message, rendered with the model's own chat "
                   "template (an imported instruct model's); generation ends at its end-of-turn "
                   "token")
    add_submodel(p, "submodel by name (default: the full model)")
    p.add_argument("--max-new-tokens", type=NON_NEGATIVE_INT, default=200,
                   help="tokens to generate")
    p.add_argument("--temperature", type=NON_NEGATIVE, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=POSITIVE_INT, help="sample among the k likeliest tokens")
    p.add_argument("--top-p", type=Number(float, low=0, high=1, low_open=True),
                   help="nucleus sampling: the smallest set of tokens with this probability")
    p.add_argument("--seed", type=SEED, default=0, help="sampling seed")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--no-cache", action="store_true",
                   help="the slow reference decoder (re-runs the whole context every token)")
    p.add_argument("--stats", action="store_true",
                   help="print tokens/s (and, speculative, acceptance) to stderr")
    p.add_argument("--json", action="store_true")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES),
                   help="weights and KV cache precision; int8: weight-only int8 matrices "
                   "(per-row scales, as llama.cpp's q8_0), bf16 activations and cache: the "
                   "fastest on a CPU (docs/benchmarks.md), unpadded batches")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode forward, a few graphs per submodel: "
                   "faster decoding once compiled at the demo shape (none at SmolLM2-135M, "
                   "where matrix products are the step: docs/benchmarks.md; 10-70 s per graph "
                   "the first time, less later from inductor's disk cache); default: on "
                   "with CUDA, off on CPU")
    p.add_argument("--compile-regional", action="store_true",
                   help="torch.compile one layer and reuse its graph for every layer: seconds "
                   "to compile even for deep models (SmolLM2-135M: 11 s cold, 5 s from "
                   "inductor's disk cache, against 69 s for the whole-model graph)")
    s = p.add_argument_group("speculative decoding")
    s.add_argument("--draft", help="drafter: a granularity name or per-layer widths of the "
                   "same weights (or of --draft-model); 'auto' searches uniform and "
                   "Mix'n'Match drafters for the highest expected speed on held-out prompts")
    s.add_argument("--draft-table", action="store_true",
                   help="with --draft auto: print the searched table to stderr")
    s.add_argument("--draft-model", type=Path,
                   help="a separately trained drafter checkpoint with the same tokenizer")
    s.add_argument("--shared-cache", action="store_true",
                   help="one KV cache for drafter and target (the target overwrites the draft's)")
    s.add_argument("--draft-len", type=POSITIVE_INT,
                   help=f"tokens drafted per round (default: {DRAFT_LEN})")
    s.add_argument("--adaptive", action="store_true",
                   help="choose each round's draft length (0 = plain decoding) from measured "
                   "costs and the running acceptance")
    s.add_argument("--max-draft-len", type=POSITIVE_INT,
                   help=f"longest draft of --adaptive and --draft auto (default: "
                   f"{MAX_DRAFT_LEN})")
    p.set_defaults(check_args=check_generate)


def generate(args: argparse.Namespace) -> Result:
    from ..runner import RunnerPool

    model, tokenizer = load_checkpoint(args.checkpoint)
    model = model.to(DTYPES[args.dtype]).eval()
    sub = chosen_submodel(args, model) or model.config.submodel()
    prompts, eos_id = _prompts(args, tokenizer)
    if args.dtype == "int8" and (args.no_cache or len({len(p) for p in prompts}) > 1):
        raise ValueError("--dtype int8 decodes through the KV cache, prompts of one length: "
                         "drop --no-cache, or give prompts that encode to the same length")
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    eos_id=eos_id, generator=torch.Generator().manual_seed(args.seed))
    runners = RunnerPool(model, compile="regional" if args.compile_regional else args.compile,
                         weights="int8" if args.dtype == "int8" else "model")
    runners.get(sub)  # before the clock: the runner's views (and int8 copies) are made once
    drafter = _drafter(args, model, tokenizer, sub, runners)  # before the clock
    t0 = time.perf_counter()  # every path is timed: the uncached one decodes right away
    pieces, stats = _pieces(args, model, tokenizer, prompts, sub, runners, sampling, drafter)
    streaming = args.stream and len(prompts) == 1 and not args.json
    new = _collect(pieces, prompts, tokenizer, streaming, [] if args.chat else prompts[0])
    elapsed = time.perf_counter() - t0
    texts = [tokenizer.decode(n if args.chat else p + n, skip_special_tokens=True)
             for p, n in zip(prompts, new, strict=True)]  # a chat: the answer alone
    n_new = sum(len(n) for n in new)
    info: dict[str, Any] = {"new_tokens": n_new, "seconds": elapsed,
                            "tokens_per_second": n_new / elapsed if elapsed else 0.0}
    if stats is not None:
        info.update(stats.as_dict())
    if runners.compile:
        info["compile_seconds"] = runners.compile_seconds
    result = {"widths": list(sub.widths), "text": texts[0], "texts": texts,
              "stats": info}
    if args.stats and not args.json:
        line = f"{n_new} tokens in {elapsed:.2f}s ({info['tokens_per_second']:.1f} tokens/s)"
        if stats is not None:
            line += (f"; {stats.mode}: acceptance {stats.acceptance_rate:.1%}, "
                     f"{stats.tokens_per_target_forward:.2f} tokens per target forward, "
                     f"{stats.rounds} rounds")
        print(line, file=sys.stderr)
    return result, "" if streaming else "\n\n".join(texts)


def _prompts(args: argparse.Namespace, tokenizer: Any) -> tuple[list[list[int]], int]:
    """The prompts' token ids and the id that ends generation: with ``--chat``, each prompt
    rendered as a user message by the model's own template, ending at its end-of-turn token."""
    texts, eos_id = args.prompt or ["\n"], tokenizer.eos_id
    if args.chat:
        if tokenizer.chat_template is None:
            raise ValueError(f"--chat: {args.checkpoint} has no chat template (a model trained "
                             "here is a plain text model; drop --chat)")
        texts = [tokenizer.render_chat([{"role": "user", "content": t}]) for t in texts]
        if tokenizer.eos_token is not None:  # the end of a turn, e.g. <|im_end|>
            eos_id = tokenizer.backend.token_to_id(tokenizer.eos_token)
    return [tokenizer.encode(p) or [tokenizer.eos_id] for p in texts], eos_id


def _drafter(args: argparse.Namespace, model: Any, tokenizer: Any, target: Any,
             runners: Any) -> tuple[Any, int]:
    """(draft, draft length) as given, or found by ``--draft auto``'s search."""
    if args.draft != "auto":
        return args.draft, args.draft_len
    if args.draft_model:
        raise ValueError("--draft auto searches submodels of the same weights; "
                         "drop --draft-model")
    return _auto_drafter(args, model, tokenizer, target, runners)


def _pieces(args: argparse.Namespace, model: Any, tokenizer: Any, prompts: list[list[int]],
            sub: Any, runners: Any, sampling: dict[str, Any],
            drafter: tuple[Any, int]) -> tuple[Any, Any]:
    """The new tokens as they come (each piece: the new tokens of every row) and, for
    speculative decoding, its statistics: speculative, uncached past the context, or cached."""
    from ..generate import fits_context, generate, generate_stream
    from ..speculative import SpecStats

    draft, draft_len = drafter
    if draft is not None or args.draft_model is not None:
        if len(prompts) > 1 or args.no_cache:
            raise ValueError("speculative decoding takes one --prompt and needs the KV cache")
        stats = SpecStats()
        return _speculative_pieces(args, model, tokenizer, prompts[0], draft, draft_len, sub,
                                   runners, stats, sampling), stats
    if args.no_cache or (len(prompts) == 1 and not fits_context(
            model.config.max_seq_len, len(prompts[0]), args.max_new_tokens)):
        # Longer than the context: the reference decoder slides its window (no cache).
        out = generate(model, torch.tensor(prompts), args.max_new_tokens, widths=sub,
                       use_cache=False, **sampling)
        return [out[:, len(prompts[0]):].tolist()], None
    return ([[t] for t in step.tolist()] for step in generate_stream(
        model, prompts, args.max_new_tokens, widths=sub, runners=runners, **sampling)), None


def _collect(pieces: Any, prompts: list[list[int]], tokenizer: Any, streaming: bool,
             head: list[int]) -> list[list[int]]:
    """Every row's new tokens; when ``streaming``, the text (after ``head``) printed as it
    grows."""
    new: list[list[int]] = [[] for _ in prompts]
    shown = tokenizer.decode(head, skip_special_tokens=True) if streaming else ""
    print(shown, end="", flush=True)
    for piece in pieces:
        for row, tokens in zip(new, piece, strict=True):
            row.extend(tokens)
        if streaming:
            text = tokenizer.decode(head + new[0], skip_special_tokens=True)
            print(text[len(shown):], end="", flush=True)
            shown = text
    if streaming:
        print()
    return new


def _speculative_pieces(args: argparse.Namespace, model: Any, tokenizer: Any, prompt: list[int],
                        draft: Any, draft_len: int, target: Any, runners: Any, stats: Any,
                        sampling: dict[str, Any]) -> Any:
    """The speculative branch of ``generate``: each round's tokens, as one-row pieces."""
    from ..speculative import speculative_stream
    from .args import parse_widths

    draft_model = None
    if args.draft_model:
        draft_model, draft_tok = load_checkpoint(args.draft_model)
        draft_model = draft_model.to(DTYPES[args.dtype])
        if draft_tok != tokenizer:
            raise ValueError(f"{args.draft_model} uses another tokenizer than the target")
    dcfg = (draft_model or model).config
    if isinstance(draft, str) and draft not in dcfg.names:
        if not all(v.strip().isdigit() for v in draft.split(",")):
            raise ValueError(f"--draft {draft!r} is not a granularity name of "
                             f"{args.draft_model or args.checkpoint} (it has "
                             f"{', '.join(dcfg.names)}) nor per-layer FFN widths "
                             "(integers separated by commas)")
        draft = parse_widths(draft, dcfg.n_layer)
    return ([t.tolist()] for t in speculative_stream(
        model, torch.tensor(prompt), args.max_new_tokens, draft=draft, target=target,
        draft_model=draft_model, shared_cache=args.shared_cache,
        draft_len=draft_len, adaptive=args.adaptive,
        max_draft_len=max(args.max_draft_len, draft_len), stats=stats, runners=runners,
        **sampling))


def _auto_drafter(args: argparse.Namespace, model: Any, tokenizer: Any, target: Any,
                  runners: Any) -> tuple[Any, int]:
    """``--draft auto``: search drafters on held-out prompts; (the best Submodel or None,
    draft length)."""
    from ..checkpoint import read_metadata
    from ..data import validation_batches
    from ..draft import search_drafter

    batches, _ = validation_batches(tokenizer, read_metadata(args.checkpoint),
                                    model.config.max_seq_len, batch_size=1, max_batches=4)
    prompts = [x[0, :32].to(next(model.parameters()).device) for x, _ in batches]
    new = min(32, model.config.max_seq_len - 33)
    rows = search_drafter(model, prompts, target=target, new_tokens=new, runners=runners,
                          max_draft_len=args.max_draft_len)
    if args.draft_table:
        print(f"{'drafter':<18}{'widths':<34}{'accept':>7}{'draft ms':>9}{'best k':>7}"
              f"{'tok/s':>9}{'vs plain':>9}", file=sys.stderr)
        for r in rows:
            print(f"{r.name:<18}{','.join(map(str, r.submodel.widths)):<34}{r.acceptance:>7.1%}"
                  f"{r.draft_ms:>9.2f}{r.best_k:>7}{r.tokens_per_s:>9.1f}{r.speedup:>8.2f}x",
                  file=sys.stderr)
    best = rows[0]
    if best.best_k == 0:
        print("--draft auto: no drafter is expected to beat plain decoding here; decoding "
              "without one", file=sys.stderr)
        return None, args.draft_len
    print(f"--draft auto: {best.name} ({','.join(map(str, best.submodel.widths))}), "
          f"k={best.best_k}, "
          f"expected {best.speedup:.2f}x plain", file=sys.stderr)
    return best.submodel, best.best_k
