"""Submodel latency: in-place slicing vs extracted dense model vs a dense model built fresh.

For every granularity G of a nested model, three setups with identical shapes are timed side by
side in one process, batch size 1, fp32:

- (a) ``in-place``: the nested model run as ``model(x, widths=G)`` (weights sliced per call);
- (b) ``extracted``: ``mixnmatch.extract(model, G)``, a standalone dense copy;
- (c) ``fresh``: ``MatFormerLM(cfg.dense(G))``, an ordinary dense model built from scratch.

Measured per setup (``latency.lm_latency``): prefill = one forward of ``--prefill-len``
tokens; decode = one single-token step (with the KV cache when the model API has one, after a
64-token context; otherwise a single-token forward). Rounds are interleaved over all setups
(median of ``--repeats``), so load changes on a shared CPU hit every setup alike.

Expected: (a)/(c) and (b)/(c) ~ 1.0 (slicing and extraction cost nothing at inference), and the
S/XL prefill ratio approaching the FLOP ratio (decode of a small model is overhead-bound).

    .venv/bin/python benchmarks/submodel_latency.py                       # demo shape, random
    .venv/bin/python benchmarks/submodel_latency.py --checkpoint runs/demo --threads 1
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys

import torch

from matformer import checkpoint as ckpt
from matformer.config import preset
from matformer.model import MatFormerLM
from matformer.submodels.extract import extract
from matformer.submodels.latency import lm_latency


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="nested checkpoint (default: demo preset, random init)")
    p.add_argument("--prefill-len", type=int, default=256)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, help="torch threads while timing (default: torch's)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    if args.checkpoint:
        model = ckpt.load_checkpoint(args.checkpoint)[0]
    else:
        model = MatFormerLM(preset("demo", vocab_size=4096))
    model.eval()
    cfg = model.config
    setups, labels = [], []
    x = torch.randint(0, cfg.vocab_size, (1, 32))
    max_diff = 0.0
    for g in cfg.names:
        ext = extract(model, g).eval()
        fresh = MatFormerLM(cfg.dense(g)).eval()
        with torch.no_grad():
            max_diff = max(max_diff, (ext(x) - model(x, widths=g)).abs().max().item())
        setups += [(model, g), (ext, None), (fresh, None)]
        labels += [(g, "in-place"), (g, "extracted"), (g, "fresh")]
    res = lm_latency(setups, prefill_len=args.prefill_len, decode_steps=args.decode_steps,
                     repeats=args.repeats, threads=args.threads)
    by = {lab: r for lab, r in zip(labels, res, strict=True)}
    seq = min(args.prefill_len, cfg.max_seq_len)
    flops = {g: cfg.flops_per_token(cfg.ffn_widths(g), seq) for g in cfg.names}
    threads = args.threads or torch.get_num_threads()
    decode = "KV-cache step after 64 tokens"
    print(f"# submodel latency: d_model={cfg.d_model}, {cfg.n_layer} layers, d_ff={cfg.d_ff}, "
          f"vocab={cfg.vocab_size}; prefill {seq} tokens, decode = {decode}; batch 1, fp32, "
          f"{threads} thread(s), median of {args.repeats} interleaved rounds")
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{dt.date.today()}; extracted vs in-place logits max abs diff {max_diff:.1e}\n")
    print("| G | FFN width | MFLOPs/token | prefill ms a / b / c | a/c | b/c "
          "| decode ms a / b / c | a/c | b/c |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for g in cfg.names:
        a, b, c = by[(g, "in-place")], by[(g, "extracted")], by[(g, "fresh")]
        row = {"granularity": g, "width": cfg.ffn_widths(g)[0], "flops_per_token": flops[g],
               "in_place": a, "extracted": b, "fresh": c}
        rows.append(row)
        print(f"| {g} | {row['width']} | {flops[g] / 1e6:.1f} | {a['prefill_ms']:.2f} / "
              f"{b['prefill_ms']:.2f} / {c['prefill_ms']:.2f} | "
              f"{a['prefill_ms'] / c['prefill_ms']:.2f} | {b['prefill_ms'] / c['prefill_ms']:.2f} "
              f"| {a['decode_ms']:.3f} / {b['decode_ms']:.3f} / {c['decode_ms']:.3f} | "
              f"{a['decode_ms'] / c['decode_ms']:.2f} | {b['decode_ms'] / c['decode_ms']:.2f} |")
    s, xl = cfg.names[0], cfg.names[-1]
    print(f"\nS/XL FLOP ratio (per token, whole model): {flops[s] / flops[xl]:.3f}")
    for kind in ("in-place", "extracted", "fresh"):
        pre = by[(s, kind)]["prefill_ms"] / by[(xl, kind)]["prefill_ms"]
        dec = by[(s, kind)]["decode_ms"] / by[(xl, kind)]["decode_ms"]
        print(f"S/XL latency ratio, {kind:<9}: prefill {pre:.3f}, decode {dec:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": cfg.to_dict(), "prefill_len": seq, "threads": threads,
                       "decode": decode, "repeats": args.repeats, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
