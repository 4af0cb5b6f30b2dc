"""One cached decode step of XL and S: eager vs compiled, and what the C++ wrapper adds.

Times a single-token step of the lean runner (``matformer.runner``) at a fixed position of a
filled KV cache, for the full model and its smallest granularity, in three forms: eager,
compiled with inductor's C++ wrapper (the default on CPU) and compiled without it. All six are
measured by ``matformer.submodels.latency.measure`` (warm-up, interleaved rounds, fixed thread
count) and every ratio is taken within this run. Weights are random: a step's cost does not
depend on their values. Compiling takes a while the first time (inductor caches graphs on disk).

    .venv/bin/python benchmarks/decode_step.py [--preset demo] [--context 64] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from matformer import runner as runner_module
from matformer.cache import KVCache
from matformer.config import preset
from matformer.model import MatFormerLM
from matformer.runner import SubmodelRunner
from matformer.submodels.latency import measure


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--context", type=int, default=64, help="tokens in the cache")
    p.add_argument("--steps", type=int, default=50, help="decode steps per timed call")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MatFormerLM(preset(args.preset, vocab_size=args.vocab_size)).eval()
    cfg = model.config
    t0 = time.perf_counter()
    nocpp = "compiled, no C++ wrapper"
    forms = {"eager": (False, True), "compiled": (True, True), nocpp: (True, False)}
    names, fns = [], []
    with torch.no_grad():
        for name in (cfg.names[-1], cfg.names[0]):
            for form, (compiled, cpp) in forms.items():
                runner_module.CPP_WRAPPER = cpp  # read when the graph compiles (next call)
                r = SubmodelRunner(model, name, compile=compiled)
                cache = KVCache.for_model(model, 1, 2 * args.context)
                r(torch.zeros(1, args.context, dtype=torch.long), cache, 0, last_only=True)
                tok = torch.zeros(1, 1, dtype=torch.long)
                r(tok, cache, args.context)  # compiles

                def steps(r: SubmodelRunner = r, cache: KVCache = cache,
                          tok: torch.Tensor = tok) -> None:
                    for _ in range(args.steps):
                        r(tok, cache, args.context)

                names.append((name, form))
                fns.append(steps)
        runner_module.CPP_WRAPPER = True
        setup = time.perf_counter() - t0
        times = measure(fns, repeats=args.repeats, threads=args.threads)
    ms = {k: [t / args.steps for t in ts] for k, ts in zip(names, times, strict=True)}
    med = {k: statistics.median(v) for k, v in ms.items()}

    def ratio(a: tuple[str, str], b: tuple[str, str]) -> float:
        """Median over rounds of the paired speed ratio a vs b (b's time / a's time)."""
        return statistics.median(y / x for x, y in zip(ms[a], ms[b], strict=True))

    xl, s = cfg.names[-1], cfg.names[0]
    flops = cfg.flops_per_token(cfg.ffn_widths(xl), args.context) / cfg.flops_per_token(
        cfg.ffn_widths(s), args.context)
    print(f"# decode step, {args.preset} (random weights), {args.context} tokens of context; "
          f"{torch.__version__}, {args.threads} thread(s); median of {args.repeats} "
          f"interleaved rounds of {args.steps} steps; setup and compiling {setup:.0f}s")
    print("\n| submodel | form | ms per step | vs eager |")
    print("|---|---|---:|---:|")
    for name, form in names:
        print(f"| {name} | {form} | {med[name, form]:.3f} | "
              f"{ratio((name, form), (name, 'eager')):.2f}x |")
    print(f"\nC++ wrapper vs none: {xl} {ratio((xl, 'compiled'), (xl, nocpp)):.2f}x, "
          f"{s} {ratio((s, 'compiled'), (s, nocpp)):.2f}x")
    for form in forms:
        sp = ratio((s, form), (xl, form))
        print(f"{s} vs {xl}, {form}: {sp:.2f}x (FLOP ratio {flops:.2f}x; {sp / flops:.2f} of it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
