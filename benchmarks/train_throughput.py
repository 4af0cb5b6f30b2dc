"""Training throughput: nested (MatFormer) steps vs dense Transformer steps of the same shapes.

Measures, in one process and interleaved, the wall time of full optimizer steps
(forward + backward + grad clip + AdamW, i.e. exactly ``Trainer.train_step``) for:

- ``sample@G``: the nested model in ``sample`` mode with granularity G forced (one-hot ``probs``);
- ``joint``: the nested model in ``joint`` mode (every granularity on the same batch each step);
- ``dense G``: an ordinary dense Transformer of granularity G's shape (``cfg.dense(G)``), trained
  by the same loop in ``baseline`` mode. ``dense XL`` is the baseline.

Methodology: every variant gets its own model + Trainer on a TokenDataset of random tokens.
``--warmup`` untimed steps per variant, then ``--repeats`` rounds; each round runs every variant
once (round-robin, the starting variant rotates every round), so slow phases of a shared machine
hit all variants alike. Reported: median seconds per step per variant, tokens/s from it, ratios of
medians, and for the ratios also the median (and p25-p75) of the per-round ratios, which pair
steps that ran seconds apart.

    .venv/bin/python benchmarks/train_throughput.py            # demo shape, ~4 min on 2 cores
    .venv/bin/python benchmarks/train_throughput.py --preset tiny --repeats 3 --warmup 1
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from matformer.config import PRESETS, ModelConfig, preset
from matformer.data import TokenDataset
from matformer.model import MatFormerLM
from matformer.task import LMTask
from matformer.tokenizer import Tokenizer
from matformer.train import TrainConfig, Trainer


@dataclass
class Variant:
    label: str
    kind: str  # "sample" | "joint" | "dense"
    granularity: str | None  # None for joint
    trainer: Trainer
    params: int  # parameters the step's forward pass uses (all of them for joint)
    train_flops_per_token: int  # ~3x forward FLOPs, summed over granularities for joint
    times: list[float] = field(default_factory=list)
    warmup_times: list[float] = field(default_factory=list)  # the first one holds compiling
    losses: list[float] = field(default_factory=list)  # loss of every step, timed or not

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def sync() -> None:
    """Wait for queued GPU work so a step's time is its own (a no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
                return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"
    except OSError:
        pass
    return "unknown"


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def random_dataset(vocab_size: int, n_train: int, seed: int = 0) -> TokenDataset:
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    train = rng.integers(0, vocab_size, n_train).astype(dtype)
    val = rng.integers(0, vocab_size, 4096).astype(dtype)
    return TokenDataset(train, val, name="random")


def build_variants(cfg: ModelConfig, args: argparse.Namespace, data: TokenDataset,
                   run_dir: str) -> list[Variant]:
    # The tokenizer is only used when saving checkpoints, which train_step never does.
    task = LMTask(data, Tokenizer.byte_level(), args.seq_len)
    names = cfg.names
    g = len(names)
    common = dict(batch_size=args.batch_size, seq_len=args.seq_len, precision=args.precision,
                  steps=args.warmup + args.repeats, seed=0)

    def trainer(model_cfg: ModelConfig, **kw) -> Trainer:
        torch.manual_seed(0)
        model = MatFormerLM(model_cfg).to(args.device)
        model.train()
        return Trainer(model, task, TrainConfig(**common, **kw), run_dir, progress=False)

    def compiled(v: Variant) -> Variant:
        cfg_v = v.trainer.raw.config
        kw = dict(mode=v.trainer.cfg.mode, probs=v.trainer.cfg.probs, compile=True)
        return Variant(f"{v.label} +compile", v.kind, v.granularity, trainer(cfg_v, **kw),
                       v.params, v.train_flops_per_token)

    def flops(widths: tuple[int, ...]) -> int:
        return 3 * cfg.flops_per_token(widths, args.seq_len)

    variants: list[Variant] = []
    for i, name in enumerate(names):
        one_hot = tuple(1.0 if j == i else 0.0 for j in range(g))
        widths = cfg.ffn_widths(name)
        variants.append(Variant(f"sample@{name}", "sample", name,
                                trainer(cfg, mode="sample", probs=one_hot),
                                cfg.num_params(widths), flops(widths)))
    variants.append(Variant("joint", "joint", None, trainer(cfg, mode="joint"),
                            cfg.num_params(), sum(flops(cfg.ffn_widths(n)) for n in names)))
    for name in names:
        dense_cfg = cfg.dense(name)
        variants.append(Variant(f"dense {name}", "dense", name,
                                trainer(dense_cfg, mode="baseline"),
                                dense_cfg.num_params(), flops(dense_cfg.ffn_dims)))
    if args.compile:  # compiled twins of the nested sample steps (one graph per granularity)
        variants += [compiled(v) for v in variants if v.kind == "sample"]
    return variants


def run_step(v: Variant) -> float:
    sync()
    t0 = time.perf_counter()
    record = v.trainer.train_step()
    sync()
    elapsed = time.perf_counter() - t0
    trained = list(record["loss"])
    expected = list(v.trainer.names) if v.kind == "joint" else [v.granularity]
    if trained != expected:  # the forced granularity really is the one trained
        raise RuntimeError(f"{v.label}: step trained {trained}, expected {expected}")
    v.losses.append(sum(record["loss"].values()))
    return elapsed


def run_rounds(variants: list[Variant], rounds: int, timed: bool, first_round: int) -> None:
    n = len(variants)
    for r in range(rounds):
        shift = (first_round + r) % n  # rotate the order so no variant always runs first
        for v in variants[shift:] + variants[:shift]:
            t = run_step(v)
            (v.times if timed else v.warmup_times).append(t)
        phase = "round" if timed else "warm-up round"
        print(f"  {phase} {r + 1}/{rounds} done ({time.strftime('%H:%M:%S')}, "
              f"load {loadavg()})", file=sys.stderr, flush=True)


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def compute_ratios(by: dict[str, Variant], names: tuple[str, ...]) -> list[dict]:
    """Ratios of step times (>1 = slower than the reference): ratio of medians + per-round."""
    out = []
    top = names[-1]
    specs = [(f"sample@{top} / dense {top}", [f"sample@{top}"], [f"dense {top}"])]
    specs += [(f"sample@{n} / dense {n}", [f"sample@{n}"], [f"dense {n}"]) for n in names[:-1]]
    specs.append((f"joint / (sum of dense {'+'.join(names)})", ["joint"],
                  [f"dense {n}" for n in names]))
    specs.append((f"joint / sample@{top}", ["joint"], [f"sample@{top}"]))
    specs.append((f"dense {top} / dense {names[0]}", [f"dense {top}"], [f"dense {names[0]}"]))
    specs += [(f"sample@{n} +compile / sample@{n}", [f"sample@{n} +compile"], [f"sample@{n}"])
              for n in names if f"sample@{n} +compile" in by]
    for label, num, den in specs:
        of_medians = sum(by[k].median for k in num) / sum(by[k].median for k in den)
        of_minimums = sum(min(by[k].times) for k in num) / sum(min(by[k].times) for k in den)
        rounds = len(by[num[0]].times)
        per_round = [sum(by[k].times[r] for k in num) / sum(by[k].times[r] for k in den)
                     for r in range(rounds)]
        p25, med, p75 = quantiles(per_round)
        out.append(dict(ratio=label, of_medians=of_medians, of_minimums=of_minimums,
                        per_round_median=med,
                        per_round_p25=p25, per_round_p75=p75))
    return out


def markdown(variants: list[Variant], ratios: list[dict], tokens_per_step: int) -> str:
    lines = [
        "| variant | params used | s/step (median) | p25-p75 | min | tokens/s | model GFLOP/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        p25, med, p75 = quantiles(v.times)
        gflops = v.train_flops_per_token * tokens_per_step / med / 1e9
        lines.append(f"| {v.label} | {v.params / 1e6:.2f}M | {med:.3f} | {p25:.3f}-{p75:.3f} "
                     f"| {min(v.times):.3f} | {tokens_per_step / med:,.0f} | {gflops:.1f} |")
    lines += [
        "",
        "| ratio of step times | of medians | per-round median | per-round p25-p75 "
        "| of minimums |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in ratios:
        lines.append(f"| {r['ratio']} | {r['of_medians']:.3f} | {r['per_round_median']:.3f} "
                     f"| {r['per_round_p25']:.3f}-{r['per_round_p75']:.3f} "
                     f"| {r['of_minimums']:.3f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=12, help="timed rounds (one step per variant)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice, usually all cores); "
                   "1 is far less noisy when other jobs share the cores")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile'd sample steps (compile time reported apart)")
    p.add_argument("--json", metavar="PATH", help="also write raw times and ratios to PATH")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        p.error("need --repeats >= 1, --warmup >= 0 and --threads >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_flush_denormal(True)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = PRESETS[args.preset]
    cfg = preset(args.preset, vocab_size=args.vocab_size,
                 max_seq_len=max(base["max_seq_len"], args.seq_len))
    tokens_per_step = args.batch_size * args.seq_len
    started = dt.datetime.now().astimezone()

    machine = dict(torch=torch.__version__, python=platform.python_version(),
                   threads=torch.get_num_threads(), cpu_count=os.cpu_count(), cpu=cpu_model(),
                   cpu_flags=cpu_flags(), loadavg_start=loadavg())
    settings = dict(preset=args.preset, vocab_size=cfg.vocab_size, d_model=cfg.d_model,
                    n_layer=cfg.n_layer, n_head=cfg.n_head, d_ff=cfg.d_ff,
                    granularities={n: cfg.ffn_widths(n)[0] for n in cfg.names},
                    activation=cfg.activation, batch_size=args.batch_size, seq_len=args.seq_len,
                    tokens_per_step=tokens_per_step, precision=args.precision,
                    warmup=args.warmup, repeats=args.repeats)
    print(f"# Training throughput ({started:%Y-%m-%d %H:%M %Z})")
    print()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    sys.stdout.flush()

    data = random_dataset(cfg.vocab_size, max(1 << 20, 4 * tokens_per_step))
    with tempfile.TemporaryDirectory(prefix="matformer-bench-") as run_dir:
        variants = build_variants(cfg, args, data, run_dir)
        t0 = time.perf_counter()
        run_rounds(variants, args.warmup, timed=False, first_round=0)
        run_rounds(variants, args.repeats, timed=True, first_round=args.warmup)
        wall = time.perf_counter() - t0
    machine["loadavg_end"] = loadavg()

    by = {v.label: v for v in variants}
    ratios = compute_ratios(by, cfg.names)
    # Same seed, same shapes, same batches: the nested model at full width must do exactly the
    # dense model's computation, so their losses must match step for step.
    top = cfg.names[-1]
    same = by[f"sample@{top}"].losses == by[f"dense {top}"].losses
    print(f"sample@{top} and dense {top} losses identical at all "
          f"{len(by[f'dense {top}'].losses)} steps: {same}")
    print(f"loadavg at end: {machine['loadavg_end']}; benchmark loop took {wall:.0f} s")
    print()
    print(markdown(variants, ratios, tokens_per_step))
    print()
    for v in variants:
        if v.label.endswith("+compile") and v.warmup_times:
            eager = by[v.label.removesuffix(" +compile")]
            print(f"{v.label}: first step {v.warmup_times[0]:.1f} s (compiling) vs "
                  f"{eager.warmup_times[0]:.2f} s eager; break-even after "
                  f"{(v.warmup_times[0] - eager.median) / max(eager.median - v.median, 1e-9):.0f} "
                  "steps" if v.median < eager.median else
                  f"{v.label}: first step {v.warmup_times[0]:.1f} s (compiling); no speed-up")
    print()
    print("s/step and ratios are medians over rounds; tokens/s = batch tokens / median step "
          "time (joint trains each token at every granularity); model GFLOP/s counts "
          "3 x forward matmul+attention FLOPs.")

    if args.json:
        result = dict(date=started.isoformat(), machine=machine, settings=settings,
                      wall_s=wall, ratios=ratios, full_width_losses_identical=same,
                      variants={v.label: dict(params=v.params, median_s=v.median,
                                              tokens_per_s=tokens_per_step / v.median,
                                              times_s=v.times) for v in variants})
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
