"""llama.cpp speed of MatFormer submodels exported to GGUF: the size you pick is the speed you get.

One nested checkpoint is exported (``matformer.submodels.gguf.export_gguf``) as S, M, L, XL (llama
architecture) and as two Mix'n'Match submodels of the paper's rule (arXiv 2310.07707, sec. 3.3;
non-decreasing widths, deci architecture, every layer at its own FFN size). Each Mix'n'Match
submodel is also exported zero-padded to its widest layer (what ``export-hf`` has to do for
transformers: exact logits, llama architecture), to show what padding costs.

Timed in one process, interleaved (every model once per round, median of ``--repeats``), batch 1,
through llama-cpp-python with ``--threads`` threads (default 1):

* prefill: one ``eval`` of ``--prefill-len`` prompt tokens (tokens/s);
* decode: ``--decode-steps`` single-token ``eval`` calls after the prompt (tokens/s);
* ours: the same submodel in this package's KV-cached torch decoder (in place, fp32): a prefill
  forward, and decode steps after a prompt-length context (``submodels.latency.decode_step_fn``).

llama.cpp's context is sized to the prompt plus the decode steps (it rounds up to 256), not the
model's ``max_seq_len``: its per-token cost grows with the context it is given (a 1024-slot
context made S's decode step ~3x slower than a 256-slot one in a probe here).

Speed-ups are reported against XL and set beside the FLOP ratio (forward FLOPs per token,
``ModelConfig.flops_per_token`` at the prompt length).

    .venv/bin/python benchmarks/gguf_speed.py --checkpoint runs/demo
    .venv/bin/python benchmarks/gguf_speed.py --preset paper-180m --dtypes q8_0,f32 --repeats 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from matformer.config import preset
from matformer.families import load_checkpoint
from matformer.model import MatFormerLM
from matformer.submodels.candidates import describe, rule_candidates
from matformer.submodels.extract import extract
from matformer.submodels.gguf import export_gguf, load_llama
from matformer.submodels.latency import decode_step_fn
from matformer.tokenizer import Tokenizer


def mixnmatch_pair(cfg: Any) -> list[tuple[int, ...]]:
    """Two non-uniform rule candidates: the ones nearest the middle of M..L and of L..XL."""
    mixed = [c.widths for c in rule_candidates(cfg) if len(set(c.widths)) > 1]
    picks = []
    for lo, hi in (("M", "L"), ("L", "XL")):
        target = (cfg.num_params(cfg.ffn_widths(lo)) + cfg.num_params(cfg.ffn_widths(hi))) / 2
        picks.append(min(mixed, key=lambda w, t=target: abs(cfg.num_params(w) - t)))
    return picks


@torch.no_grad()
def padded(model: Any, widths: tuple[int, ...]) -> Any:
    """The submodel ``widths`` as a uniform-width model zero-padded to its widest layer."""
    wide = extract(model, (max(widths),) * len(widths))
    for block, w in zip(wide.blocks, widths, strict=True):
        for lin in (block.ffn.gate_proj, block.ffn.up_proj):
            if lin is not None:
                lin.weight[w:] = 0
        block.ffn.down_proj.weight[:, w:] = 0
    return wide


def _table(title: str, rows: list[dict[str, Any]], xl: dict[str, Any]) -> None:
    print(f"\n{title}\n")
    print("| submodel | FFN widths | arch | MB | MFLOPs/token (XL/this) | prefill tok/s (x XL) "
          "| decode tok/s (x XL) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mb = f"{r['bytes'] / 1e6:.1f}" if r.get("bytes") else "-"
        print(f"| {r['name']} | {','.join(map(str, r['widths']))} | {r['arch']} | {mb} | "
              f"{r['flops'] / 1e6:.1f} ({xl['flops'] / r['flops']:.2f}x) | "
              f"{r['prefill_tok_s']:.0f} ({r['prefill_tok_s'] / xl['prefill_tok_s']:.2f}x) | "
              f"{r['decode_tok_s']:.0f} ({r['decode_tok_s'] / xl['decode_tok_s']:.2f}x) |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="nested checkpoint or run directory")
    src.add_argument("--preset", help="instead: a randomly initialised model of this preset "
                     "(speed does not depend on the weight values), byte-level tokenizer")
    p.add_argument("--vocab", type=int, default=4096, help="--preset: vocabulary size")
    p.add_argument("--dtypes", default="f32,q8_0",
                   help="GGUF weight types to export and time, comma-separated")
    p.add_argument("--prefill-len", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        model, tok = load_checkpoint(args.checkpoint)
    else:
        torch.manual_seed(0)
        model, tok = MatFormerLM(preset(args.preset, vocab_size=args.vocab)), Tokenizer.byte_level()
    model.eval()
    cfg = model.config
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    subs: list[tuple[str, tuple[int, ...], bool]] = [
        (g, cfg.ffn_widths(g), False) for g in cfg.names]
    for w in mixnmatch_pair(cfg):
        subs += [(describe(cfg, w), w, False), (f"{describe(cfg, w)} padded", w, True)]
    n_pre = min(args.prefill_len, cfg.max_seq_len - args.decode_steps)
    prompt = torch.randint(0, cfg.vocab_size, (n_pre,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    tmp = Path(tempfile.mkdtemp(prefix="gguf-speed-"))
    runs: list[dict[str, Any]] = []
    for name, w, pad in subs:
        cost = (max(w),) * len(w) if pad else w  # a padded model computes at its widest layer
        base = {"name": name, "widths": list(w), "flops": cfg.flops_per_token(cost, n_pre),
                "params": cfg.num_params(w), "pre": [], "dec": []}
        for dtype in dtypes:
            f = tmp / f"{len(runs)}.gguf"
            info = export_gguf(padded(model, w) if pad else model, tok, f,
                               widths=None if pad else w, dtype=dtype)
            runs.append({**base, "engine": f"llama.cpp {dtype}", "arch": info["architecture"],
                         "bytes": info["bytes"], "llm": load_llama(f, threads=args.threads, n_ctx=n_pre + args.decode_steps),
                         "pre": [], "dec": []})
        if not pad:
            runs.append({**base, "engine": "ours (torch fp32)", "arch": "MatFormerLM",
                         "step": decode_step_fn(model, w, context=n_pre)})
    x = torch.tensor([prompt])
    start = time.perf_counter()
    for r in range(1 + args.repeats):  # round 0 warms up
        for run in runs:
            if "llm" in run:
                llm = run["llm"]
                llm.reset()
                t0 = time.perf_counter()
                llm.eval(prompt)
                t1 = time.perf_counter()
                for j in range(args.decode_steps):
                    llm.eval([prompt[j]])
                t2 = time.perf_counter()
            else:
                with torch.no_grad():
                    t0 = time.perf_counter()
                    model(x, widths=tuple(run["widths"]))
                    t1 = time.perf_counter()
                    for _ in range(args.decode_steps):
                        run["step"]()
                    t2 = time.perf_counter()
            if r:
                run["pre"].append(n_pre / (t1 - t0))
                run["dec"].append(args.decode_steps / (t2 - t1))
    elapsed = time.perf_counter() - start
    shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for run in runs:
        if "llm" in run:
            run["llm"].close()
        rows.append({k: v for k, v in run.items() if k not in ("llm", "step", "pre", "dec")}
                    | {"prefill_tok_s": statistics.median(run["pre"]),
                       "decode_tok_s": statistics.median(run["dec"])})
    import llama_cpp

    what = args.checkpoint or f"preset {args.preset}, random init"
    print(f"# llama.cpp speed of GGUF exports: {what} (d_model={cfg.d_model}, "
          f"{cfg.n_layer} layers, d_ff={cfg.d_ff}, vocab={cfg.vocab_size})")
    print(f"# prefill {n_pre} tokens, then {args.decode_steps} single-token decode steps; "
          f"batch 1, {args.threads} thread(s); median of {args.repeats} interleaved rounds "
          f"({elapsed:.0f} s)")
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"llama-cpp-python {llama_cpp.__version__}, {now} UTC")
    summary = []
    for engine in dict.fromkeys(r["engine"] for r in rows):
        part = [r for r in rows if r["engine"] == engine]
        xl = next(r for r in part if r["name"] == cfg.names[-1])
        s = next(r for r in part if r["name"] == cfg.names[0])
        _table(f"**{engine}**", part, xl)
        summary.append(f"{engine}: prefill {s['prefill_tok_s'] / xl['prefill_tok_s']:.2f}x, "
                       f"decode {s['decode_tok_s'] / xl['decode_tok_s']:.2f}x")
    s_xl = cfg.flops_per_token(cfg.ffn_widths(cfg.names[-1]), n_pre) / cfg.flops_per_token(
        cfg.ffn_widths(cfg.names[0]), n_pre)
    print(f"\nS/XL speed-up (FLOP ratio {s_xl:.2f}x): " + "; ".join(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
