"""Where self-speculative decoding pays: measured costs at a larger shape, measured acceptance.

Speculative decoding's speed-up depends on two things that can be measured apart:

- the per-token acceptance of a drafter, which needs trained weights: measured here on a trained
  checkpoint (greedy, along the XL's own continuations of held-out validation prompts);
- the costs (a drafter token; the target's forward over 1, 2 and k + 1 tokens), which do not
  depend on the weights' values: measured on the trained model's shape and on a larger preset
  with random weights (``--shape``, default ``paper-310m``: 16 layers, d_model 768).

For each shape the script prints plain decoding speed of every granularity against the FLOP ratio
(does a smaller submodel cost proportionally less?) and the expected speed of S, M and L
drafting for XL at the best draft length (``matformer.draft.rank_drafters``: expected tokens per
round ``(1 - a^(k+1)) / (1 - a)`` over the measured cost of the round). At the trained shape this
is a check of the cost model against ``benchmarks/generation.py``'s measured runs; at the larger
shape it is a projection, valid to the extent that its submodels would be as consistent with its
XL as the trained checkpoint's are (the paper finds consistency rises with scale, arXiv
2310.07707 sec. 4.1.1).

    .venv/bin/python benchmarks/speculative_projection.py --checkpoint runs/demo
    .venv/bin/python benchmarks/speculative_projection.py --checkpoint runs/demo --compile
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from matformer import checkpoint as ckpt
from matformer.config import preset
from matformer.data import validation_batches
from matformer.draft import drafter_acceptance, drafter_costs, rank_drafters
from matformer.families import load_checkpoint
from matformer.model import MatFormerLM
from matformer.runner import RunnerPool

DRAFTERS = ("S", "M", "L")


def costs_table(model: MatFormerLM, args: argparse.Namespace, acceptance: dict[str, float],
                title: str) -> None:
    cfg = model.config
    pool = RunnerPool(model, compile=args.compile)
    xl = cfg.ffn_widths(cfg.names[-1])
    drafters = {n: (cfg.ffn_widths(n), None) for n in DRAFTERS}
    context = args.prompt_len + args.new_tokens // 2
    t0 = time.perf_counter()
    costs = drafter_costs(model, xl, drafters, context=context, max_draft_len=args.max_draft_len,
                          runners=pool, reps=args.reps)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"\n## {title}: {cfg.n_layer} layers, d_model {cfg.d_model}, d_ff {cfg.d_ff}, vocab "
          f"{cfg.vocab_size} ({params:.0f}M parameters); costs measured in "
          f"{time.perf_counter() - t0:.0f}s{' (compiled)' if args.compile else ''}")
    xl_ms = 1e3 * costs["S"].verify[1]
    flops_xl = cfg.flops_per_token(xl, context)
    print("\n| decode step | ms | speed vs XL | FLOP ratio XL/this | speed / FLOP ratio |")
    print("|---|---:|---:|---:|---:|")
    print(f"| XL | {xl_ms:.2f} | 1.00x | 1.00 | 1.00 |")
    for n in DRAFTERS:
        ms = 1e3 * costs[n].draft_token
        flops = flops_xl / cfg.flops_per_token(drafters[n][0], context)
        print(f"| {n} | {ms:.2f} | {xl_ms / ms:.2f}x | {flops:.2f} | {xl_ms / ms / flops:.2f} |")
    verify = ", ".join(f"{k} tokens {1e3 * c:.2f} ms" for k, c in costs["S"].verify.items())
    print(f"\nXL verification forward: {verify}")
    rows = rank_drafters(acceptance, drafters, costs, args.max_draft_len)
    print("\n| drafter | acceptance | draft / XL token | best k | expected speed vs plain XL |"
          " k = 2 | k = 4 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rel = {k: v / r.per_k[0] for k, v in r.per_k.items()}
        print(f"| {r.name} | {r.acceptance:.1%} | {r.draft_ms / xl_ms:.2f} | {r.best_k} | "
              f"{r.speedup:.2f}x | {rel.get(2, 0):.2f}x | {rel.get(4, 0):.2f}x |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="runs/demo", help="trained run (for acceptance)")
    p.add_argument("--shape", default="paper-310m", help="preset whose costs are measured")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--max-draft-len", type=int, default=8)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--compile", action="store_true", help="measure compiled runners")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tokenizer = load_checkpoint(args.checkpoint)
    model.eval()
    batches, info = validation_batches(tokenizer, ckpt.read_metadata(args.checkpoint),
                                       model.config.max_seq_len, batch_size=1,
                                       max_batches=args.prompts)
    prompts = [x[0, : args.prompt_len] for x, _ in batches]
    cfg = model.config
    acceptance = drafter_acceptance(model, prompts, cfg.ffn_widths(cfg.names[-1]),
                                    {n: (cfg.ffn_widths(n), None) for n in DRAFTERS},
                                    new_tokens=args.new_tokens)
    print(f"# speculative decoding: costs measured, acceptance from "
          f"{ckpt.resolve(args.checkpoint)} ({info['data']} validation, {args.prompts} prompts x "
          f"{args.prompt_len} tokens, {args.new_tokens} greedy XL tokens each)")
    print(f"# {torch.__version__}, {args.threads} thread(s), batch 1, fp32; costs: median of "
          f"{args.reps} interleaved rounds at {args.prompt_len + args.new_tokens // 2} tokens "
          "of context")
    costs_table(model, args, acceptance, f"trained shape ({ckpt.resolve(args.checkpoint).name})")
    torch.manual_seed(0)
    big = MatFormerLM(preset(args.shape, vocab_size=cfg.vocab_size)).eval()
    costs_table(big, args, acceptance, f"{args.shape} (random weights; acceptance of the "
                "trained shape)")
    print(f"\n({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
