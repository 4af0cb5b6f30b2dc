"""Adaptive self-speculative decoding against plain decoding, on a real elastified model.

Greedy, batch 1, ``--new-tokens`` (default 64) after each of ``--prompts`` held-out prompts of
the checkpoint's corpus, every variant once per prompt and round, interleaved, median over
rounds of the summed time: plain XL (``generate``), the nested drafter (S by default) at a fixed
draft length with a shared cache, and ``--adaptive``. The adaptive rule's drafting costs are
measured once per model shape and machine and kept in the cache folder
(``$MATFORMER_CACHE/draft_costs.json``); the first call (which measures, unless kept before) is
timed apart. Speculative output is checked to equal plain greedy output token for token.

    .venv/bin/python benchmarks/adaptive_speculative.py --checkpoint runs/smollm2-elastic
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from matformer.checkpoint import read_metadata
from matformer.data import validation_batches
from matformer.families import load_checkpoint
from matformer.generate import generate
from matformer.runner import RunnerPool
from matformer.speculative import SpecStats, speculative_generate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--draft", default="S")
    p.add_argument("--draft-len", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    model, tok = load_checkpoint(args.checkpoint)
    model.eval()
    batches, _ = validation_batches(tok, read_metadata(args.checkpoint), model.config.max_seq_len,
                                    batch_size=1, max_batches=args.prompts,
                                    seq_len=args.prompt_len)
    prompts = [x[:, : args.prompt_len] for x, _ in batches]
    pool, n = RunnerPool(model), args.new_tokens
    stats: dict[str, SpecStats] = {}

    def spec(name: str, **kw: object):
        def run(x: torch.Tensor) -> torch.Tensor:
            stats[name] = SpecStats()
            return speculative_generate(model, x, n, draft=args.draft, shared_cache=True,
                                        temperature=0, runners=pool, stats=stats[name],
                                        **kw)[0]
        return run

    fns = {"plain XL": lambda x: generate(model, x, n, temperature=0, runners=pool),
           f"{args.draft}->XL k={args.draft_len}": spec("fixed", draft_len=args.draft_len),
           f"{args.draft}->XL adaptive": spec("adaptive", adaptive=True)}
    t0 = time.perf_counter()
    first = fns[f"{args.draft}->XL adaptive"](prompts[0])  # measures the costs unless kept
    first_s = time.perf_counter() - t0
    want = {i: fns["plain XL"](x) for i, x in enumerate(prompts)}
    assert torch.equal(first, want[0])
    times = {k: [] for k in fns}
    accept = {k: [] for k in fns}
    for r in range(args.repeats):
        order = list(fns)[r % len(fns):] + list(fns)[: r % len(fns)]
        total = dict.fromkeys(fns, 0.0)
        for i, x in enumerate(prompts):
            for k in order:
                t = time.perf_counter()
                out = fns[k](x)
                total[k] += time.perf_counter() - t
                assert torch.equal(out, want[i]), k  # greedy: the target's own output
                s = stats.get("adaptive" if "adaptive" in k else "fixed")
                if "->" in k and s is not None:
                    accept[k].append((s.acceptance_rate, statistics.mean(s.draft_lens or [0])))
        for k, v in total.items():
            times[k].append(v)
    base = statistics.median(times["plain XL"])
    print(f"# {args.checkpoint}: greedy, {len(prompts)} prompts x {args.prompt_len} tokens, "
          f"{n} new tokens each; torch {torch.__version__}, {args.threads} thread(s); median of "
          f"{args.repeats} interleaved rounds\n")
    print("| variant | tokens/s | vs plain | acceptance | mean draft length |")
    print("|---|---:|---:|---:|---:|")
    for k, v in times.items():
        med = statistics.median(v)
        acc = (f"{statistics.mean(a for a, _ in accept[k]):.0%} | "
               f"{statistics.mean(d for _, d in accept[k]):.2f}") if accept[k] else "- | -"
        print(f"| {k} | {n * len(prompts) / med:.1f} | {base / med:.2f}x | {acc} |")
    print(f"\nfirst adaptive call (one prompt; measures and keeps the costs unless kept "
          f"before): {first_s:.2f}s, against {base / len(prompts):.2f}s for a plain one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
