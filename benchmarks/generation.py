"""Generation speed: cached vs uncached decoding, and speculative vs plain XL decoding.

Measured side by side in one process, batch size 1 unless noted, greedy (so every variant
emits exactly the same tokens and only the speed differs), fp32:

- ``uncached XL``: the reference decoder, a full forward over the whole context per token;
- ``cached XL`` / ``cached S``: prefill once, then one single-token forward per token;
- ``cached XL, batch B``: B left-padded prompts decoded together (tokens/s over all rows);
- ``spec S->XL two caches`` / ``shared cache`` / ``external``: speculative decoding with the S
  submodel drafting ``--draft-len`` tokens per round (and the shared-cache one with the adaptive
  draft length too); ``external`` drafts with a separate model: ``--external CKPT`` (an
  independently trained baseline) or, by default, S extracted into a standalone dense model,
  which predicts exactly what the nested S does and so shows only the cost of a second model;
- ``spec external drafter->baseline XL`` (with ``--external-target``): the pair of independently
  trained baselines, for the acceptance the paper compares against;
- ``spec ... T=1``: stochastic speculative decoding (rejection sampling) for its acceptance rate.

Every variant runs on the same prompts (validation windows of the checkpoint's corpus); for each
prompt of each round (``--repeats``) all variants run back to back, the starting variant
rotating, so a busy shared CPU slows all alike. Reported per variant: tokens/s; speed-up over
cached XL (ratio of totals, and the median of per-prompt ratios of runs seconds apart, which
resists bursts of load from other jobs); for speculative decoding the acceptance rate and new
tokens per target forward (plain decoding: 1.0), the speed-up in target passes, which does not
depend on the hardware. Last, the median cost of single cached forwards (drafter token, XL token,
XL verification of k + 1 tokens), from which the speculative speed-up can be predicted.

    .venv/bin/python benchmarks/generation.py --checkpoint runs/demo       # ~3 min on 2 cores
    .venv/bin/python benchmarks/generation.py --checkpoint runs/demo \
        --external runs/base-S --external-target runs/base-XL
    .venv/bin/python benchmarks/generation.py --random --new-tokens 32     # no checkpoint needed
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from matformer import checkpoint as ckpt
from matformer.cache import KVCache
from matformer.config import preset
from matformer.generate import generate, left_pad
from matformer.metrics import validation_batches
from matformer.model import MatFormerLM
from matformer.speculative import SpecStats, speculative_generate
from matformer.submodels.candidates import extract


@dataclass
class Variant:
    label: str
    run: Callable[[list[int]], tuple[int, SpecStats | None]]  # prompt -> (new tokens, stats)
    seconds: float = 0.0
    tokens: int = 0
    stats: list[SpecStats] = field(default_factory=list)
    tps: list[float] = field(default_factory=list)  # tokens/s of each (round, prompt) run

    def summary(self, base: Variant) -> dict[str, Any]:
        tps = self.tokens / self.seconds if self.seconds else 0.0
        paired = statistics.median(a / b for a, b in zip(self.tps, base.tps, strict=True))
        out: dict[str, Any] = {"variant": self.label, "tokens": self.tokens,
                               "seconds": round(self.seconds, 3), "tokens_per_s": tps,
                               "speedup_vs_cached_xl": tps * base.seconds / base.tokens,
                               "paired_speedup_median": paired}
        if self.stats:
            drafted = sum(s.drafted for s in self.stats)
            out["acceptance_rate"] = sum(s.accepted for s in self.stats) / max(drafted, 1)
            out["tokens_per_target_forward"] = (sum(s.new_tokens for s in self.stats)
                                                / sum(s.target_forwards for s in self.stats))
            lens = [k for s in self.stats for k in s.draft_lens]
            out["mean_draft_len"] = sum(lens) / max(len(lens), 1)
        return out


def load(args: argparse.Namespace) -> tuple[MatFormerLM, list[list[int]], str]:
    """The model and ``--prompts`` prompts of ``--prompt-len`` tokens."""
    if args.random or not Path(args.checkpoint).exists():
        if not args.random:
            print(f"note: {args.checkpoint} not found; using a random-init demo model "
                  "(speeds are meaningful, acceptance rates are not)", file=sys.stderr)
        torch.manual_seed(0)
        model = MatFormerLM(preset("demo", vocab_size=4096))
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, 4096, (args.prompts, args.prompt_len), generator=g).tolist()
        return model, prompts, "random-init demo preset"
    model, tokenizer = ckpt.load_checkpoint(args.checkpoint)
    batches, info = validation_batches(args.checkpoint, tokenizer, batch_size=1,
                                       max_batches=args.prompts)
    prompts = [x[0, : args.prompt_len].tolist() for x, _ in batches]
    return model, prompts, f"{ckpt.resolve(args.checkpoint)} ({info['data']} validation)"


def variants(model: MatFormerLM, args: argparse.Namespace, n: int) -> list[Variant]:
    ext_model = (ckpt.load_checkpoint(args.external)[0] if args.external
                 else extract(model, args.draft))
    ext_label = "external drafter" if args.external else f"external ({args.draft} extracted copy)"
    ext_model.eval()

    def plain(widths: Any, use_cache: bool) -> Callable[[list[int]], tuple[int, None]]:
        def run(prompt: list[int]) -> tuple[int, None]:
            out = generate(model, torch.tensor([prompt]), n, widths=widths, temperature=0,
                           use_cache=use_cache)
            return out.shape[1] - len(prompt), None
        return run

    def batched(prompts_b: list[list[int]]) -> Callable[[list[int]], tuple[int, None]]:
        ids, lengths = left_pad(prompts_b)

        def run(_: list[int]) -> tuple[int, None]:
            generate(model, ids, n, temperature=0, prompt_lengths=lengths)
            return n * len(prompts_b), None
        return run

    def spec(temperature: float = 0.0, target_model: MatFormerLM = model, **kw: Any
             ) -> Callable[[list[int]], tuple[int, SpecStats]]:
        g = torch.Generator().manual_seed(0)

        def run(prompt: list[int]) -> tuple[int, SpecStats]:
            _, stats = speculative_generate(target_model, torch.tensor(prompt), n,
                                            temperature=temperature, generator=g, **kw)
            return stats.new_tokens, stats
        return run

    d, k = args.draft, args.draft_len
    out = [
        Variant("uncached XL", plain(None, False)),
        Variant("cached XL", plain(None, True)),
        Variant(f"cached {d}", plain(d, True)),
        Variant(f"spec {d}->XL two caches, k={k}", spec(draft=d, draft_len=k)),
        Variant(f"spec {d}->XL shared cache, k={k}", spec(draft=d, draft_len=k, shared_cache=True)),
        Variant(f"spec {d}->XL shared cache, k=2", spec(draft=d, draft_len=2, shared_cache=True)),
        Variant(f"spec {d}->XL shared cache, adaptive k",
                spec(draft=d, draft_len=k, shared_cache=True, adaptive=True)),
        Variant(f"spec {ext_label}->XL, k={k}",
                spec(draft_model=ext_model, draft_len=k)),
        Variant(f"spec {d}->XL shared cache, k={k}, T=1",
                spec(temperature=1.0, draft=d, draft_len=k, shared_cache=True)),
    ]
    if args.external_target:  # the baselines' own pair: baseline S drafts for baseline XL
        base_xl = ckpt.load_checkpoint(args.external_target)[0].eval()
        out.insert(-1, Variant(f"spec external drafter->baseline XL, k={k}",
                               spec(target_model=base_xl, draft_model=ext_model, draft_len=k)))
    if args.batch > 1:
        out.insert(2, Variant(f"cached XL, batch {args.batch}", batched(args.batch_prompts)))
    return out


@torch.no_grad()
def forward_costs(model: MatFormerLM, draft: str, context: int, ks: tuple[int, ...],
                  reps: int = 40) -> dict[str, float]:
    """Median ms of one cached forward: a 1-token step of the drafter and of XL, and an XL
    verification of k + 1 tokens, all at ``context`` tokens of cache (calls interleaved)."""
    cache = KVCache.for_model(model, 1, context + max(ks) + 1)
    model(torch.zeros(1, context, dtype=torch.long), cache=cache)
    calls = {f"{draft} 1 token": (draft, 1), "XL 1 token": (None, 1)}
    calls |= {f"XL {k + 1} tokens": (None, k + 1) for k in ks}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(reps):
        for name, (widths, t) in calls.items():
            x = torch.zeros(1, t, dtype=torch.long)
            t0 = time.perf_counter()
            model(x, widths=widths, cache=cache, start_pos=context)
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="runs/demo")
    p.add_argument("--random", action="store_true", help="random-init demo model")
    p.add_argument("--external", help="independently trained drafter checkpoint")
    p.add_argument("--external-target", help="its independently trained target (baseline XL)")
    p.add_argument("--draft", default="S")
    p.add_argument("--draft-len", type=int, default=4)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="rows of the batched variant")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    model, prompts, source = load(args)
    model.eval()
    args.batch_prompts = [(prompts * args.batch)[i][: args.prompt_len - 3 * (i % 2)]
                          for i in range(args.batch)]  # ragged: left padding is exercised
    vs = variants(model, args, args.new_tokens)
    with torch.no_grad():  # warm-up: one short run of each variant
        for v in vs:
            v.run(prompts[0][:8])
    t_start = time.perf_counter()
    for r in range(args.repeats):
        for i, prompt in enumerate(prompts):  # every variant on this prompt, seconds apart
            j = (r * len(prompts) + i) % len(vs)
            for v in vs[j:] + vs[:j]:  # rotate the starting variant
                t0 = time.perf_counter()
                tokens, stats = v.run(prompt)
                dt_run = time.perf_counter() - t0
                v.seconds += dt_run
                v.tokens += tokens
                v.tps.append(tokens / dt_run)
                if stats is not None:
                    v.stats.append(stats)
    base = next(v for v in vs if v.label == "cached XL")
    rows = [v.summary(base) for v in vs]
    print(f"# generation benchmark: {source}")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), fp32, greedy unless T=1; {len(prompts)} prompts x "
          f"{args.prompt_len} tokens, {args.new_tokens} new tokens, {args.repeats} rounds, "
          f"{time.perf_counter() - t_start:.0f}s")
    print(f"| {'variant':<46} | tokens/s | vs cached XL | paired median | acceptance "
          "| tokens/target fwd |")
    print(f"|{'-' * 48}|---------:|-------------:|--------------:|-----------:"
          "|------------------:|")
    for row in rows:
        acc = f"{row['acceptance_rate']:.1%}" if "acceptance_rate" in row else "-"
        tpf = (f"{row['tokens_per_target_forward']:.2f}" if "tokens_per_target_forward" in row
               else "1.00" if "XL" in row["variant"] and "uncached" not in row["variant"]
               else "-")
        print(f"| {row['variant']:<46} | {row['tokens_per_s']:8.1f} | "
              f"{row['speedup_vs_cached_xl']:11.2f}x | {row['paired_speedup_median']:12.2f}x | "
              f"{acc:>10} | {tpf:>17} |")
    ctx = args.prompt_len + args.new_tokens // 2
    costs = forward_costs(model, args.draft, ctx, (2, args.draft_len))
    xl = costs["XL 1 token"]
    print(f"\nmedian cached forward at {ctx} tokens of context (ms; ratio to one XL token):")
    for name, ms in costs.items():
        print(f"  {name:<16} {ms:6.2f} ms  {ms / xl:5.2f}")
    if args.json:
        args.json.write_text(json.dumps({"date": dt.datetime.now().isoformat(timespec="seconds"),
                                         "source": source, "threads": args.threads,
                                         "rows": rows, "forward_ms": costs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
