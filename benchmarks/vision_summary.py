"""Seed-averaged tables of benchmarks/vision_digits.sh: accuracy and retrieval, mean and spread.

    .venv/bin/python benchmarks/vision_summary.py runs/vision/d64 runs/vision/d16

Reads every ``seed*/eval.json`` and ``seed*/retrieval/retrieval.json`` under each directory and
prints markdown tables (mean over seeds, and min..max) for docs/vision.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def _cell(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ({100 * min(values):.1f}..{100 * max(values):.1f})"


def accuracy_table(base: Path) -> str:
    """Per-granularity top-1: one column per family (MatViT sample, joint, baselines)."""
    runs = [json.loads(f.read_text())["families"] for f in sorted(base.glob("seed*/eval.json"))]
    if not runs:
        return f"(no eval.json under {base})\n"
    families = list(runs[0])
    names = [r["name"] for r in runs[0][families[0]]]
    lines = [f"{len(runs)} seed(s); top-1 % on the held-out digits, mean (min..max)\n",
             "| granularity | non-emb params | " + " | ".join(families) + " |",
             "|---|---|" + "---|" * len(families)]
    for name in names:
        cells = []
        for fam in families:
            accs = [next(r["accuracy"] for r in run[fam] if r["name"] == name) for run in runs]
            cells.append(_cell(accs))
        params = next(r["non_embedding_params"] for r in runs[0][families[0]]
                      if r["name"] == name)
        lines.append(f"| {name} | {params / 1e3:.1f}K | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def retrieval_table(base: Path) -> str:
    """1-NN accuracy of every query encoder against its family's XL gallery, over seeds."""
    files = sorted(base.glob("seed*/retrieval/retrieval.json"))
    runs = [json.loads(f.read_text())["rows"] for f in files]
    if not runs:
        return f"(no retrieval.json under {base})\n"
    lines = [f"{len(runs)} seed(s); %, mean (min..max); chance "
             f"{100 * runs[0][0]['chance']:.1f}%\n",
             "| query encoder | gallery | 1-NN accuracy | recall@10 | own-gallery 1-NN |",
             "|---|---|---|---|---|"]
    for i, row in enumerate(runs[0]):
        gallery = "MatViT XL" if row["group"].startswith("matvit") else "baseline XL"
        vals = [[run[i][k] for run in runs] for k in ("top1_accuracy", "recall@10",
                                                       "same_encoder_top1")]
        lines.append(f"| {row['name']} | {gallery} | " + " | ".join(_cell(v) for v in vals)
                     + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", type=Path)
    args = p.parse_args()
    for base in args.dirs:
        print(f"## {base}\n\n### accuracy\n\n{accuracy_table(base)}\n### retrieval\n\n"
              f"{retrieval_table(base)}")


if __name__ == "__main__":
    main()
