"""One way to measure the latency of submodels.

Every latency figure measured ahead of use goes through :func:`measure`: Mix'n'Match sweeps
(language models, ViTs, Gemma 3n slices), budget selection, ``sizes``, the server's registry,
the drafter search's and adaptive decoding's costs, and the reproduction's speculative stage.
(A live generation, the server and training count the time of their own work instead.)
:func:`measure` does a warm-up, then interleaved rounds (every function once per round, so
drift in machine load spreads over all of them instead of biasing the last ones),
``torch.cuda.synchronize`` around each call on CUDA, a fixed torch thread count; callers take
the median with its spread (quartiles) rather than a single or a best time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..config import SubmodelSpec
from ..model import eval_mode

#: One submodel to time: a model and a submodel of it (anything its config's ``submodel``
#: accepts; None: the full model).
Setup = tuple[nn.Module, SubmodelSpec]


def sync(device: torch.device | None) -> None:
    """Wait for ``device``'s queued work (CUDA); nothing elsewhere."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def spread(samples: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and extremes of repeated timings (ms)."""
    s = sorted(samples)
    q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else (s * 3)
    return {"median": statistics.median(s), "q1": q1, "q3": q3, "min": s[0], "max": s[-1]}


def measure(fns: Sequence[Callable[[], Any]], *, repeats: int = 7, warmup: int = 1,
            threads: int | None = None, device: torch.device | str | None = None
            ) -> list[list[float]]:
    """Wall-clock milliseconds of each zero-argument function, ``repeats`` times each.

    Every round calls every function once, in order (interleaved). ``threads`` fixes torch's
    intra-op threads while timing (restored afterwards); on CUDA the device is synchronised
    before and after each call so the time covers the kernels, not just their launch.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads} must be >= 1")
    dev = torch.device(device) if device is not None else None
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    times: list[list[float]] = [[] for _ in fns]
    try:
        with torch.no_grad():
            for r in range(warmup + repeats):
                for i, fn in enumerate(fns):
                    sync(dev)
                    t0 = time.perf_counter()
                    fn()
                    sync(dev)
                    if r >= warmup:
                        times[i].append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_num_threads(old)
    return times


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def decode_step_fn(model: nn.Module, sub: SubmodelSpec, context: int) -> Callable[[], Any]:
    """One cached decode step of ``sub`` at position ``context``, through the
    lean runner that :func:`~matformer.generate.generate` decodes with (the cache is filled
    once)."""
    from ..cache import KVCache
    from ..runner import SubmodelRunner

    device = _device(model)
    ctx = max(1, min(context, model.config.max_seq_len - 1))
    cache = KVCache.for_model(model, 1, ctx + 1)
    runner = SubmodelRunner(model, sub)
    runner(torch.zeros(1, ctx, dtype=torch.long, device=device), cache, 0, last_only=True)
    tok = torch.zeros(1, 1, dtype=torch.long, device=device)
    return lambda: runner(tok, cache, ctx)


def prefill_fn(model: nn.Module, sub: SubmodelSpec, tokens: torch.Tensor) -> Callable[[], Any]:
    """A prefill of ``tokens`` (1, T) as :func:`~matformer.generate.generate` runs it: the lean
    runner fills a KV cache and projects the last position onto the vocabulary."""
    from ..cache import KVCache
    from ..runner import SubmodelRunner

    cache = KVCache.for_model(model, 1, tokens.shape[1])
    runner = SubmodelRunner(model, sub)
    return lambda: runner(tokens, cache, 0, last_only=True)


def _summarise(name: str, samples: list[float], scale: float = 1.0) -> dict[str, float]:
    s = spread([t * scale for t in samples])
    return {f"{name}_ms": s["median"], f"{name}_ms_q1": s["q1"], f"{name}_ms_q3": s["q3"]}


def lm_latency(setups: Sequence[Setup], *, prefill_len: int = 128, decode_steps: int = 8,
               decode_context: int = 64, repeats: int = 7, warmup: int = 1,
               threads: int | None = None) -> list[dict[str, float]]:
    """Prefill and decode latency (ms, median and quartiles) of language-model submodels,
    batch 1, on the path :func:`~matformer.generate.generate` takes: prefill is one forward of
    ``prefill_len`` tokens into a KV cache; decode is the mean of ``decode_steps`` cached
    single-token steps after ``decode_context`` tokens."""
    if prefill_len < 1 or decode_steps < 1:
        raise ValueError(f"prefill_len={prefill_len} and decode_steps={decode_steps} must be "
                         ">= 1")
    fns: list[Callable[[], Any]] = []
    with eval_mode(*(s[0] for s in setups)):
        for model, sub in setups:
            n = min(prefill_len, model.config.max_seq_len)
            x = torch.randint(0, model.config.vocab_size, (1, n),
                              generator=torch.Generator().manual_seed(0)).to(_device(model))
            step = decode_step_fn(model, sub, decode_context)

            def decode(step: Callable[[], Any] = step) -> None:
                for _ in range(decode_steps):
                    step()

            fns += [prefill_fn(model, sub, x), decode]
        times = measure(fns, repeats=repeats, warmup=warmup, threads=threads,
                        device=_device(setups[0][0]) if setups else None)
    return [{**_summarise("prefill", times[2 * i]),
             **_summarise("decode", times[2 * i + 1], 1 / decode_steps)}
            for i in range(len(setups))]


def forward_latency(setups: Sequence[Setup], inputs: Sequence[torch.Tensor], *,
                    repeats: int = 7, warmup: int = 1, threads: int | None = None
                    ) -> list[dict[str, float]]:
    """Latency (ms, median and quartiles) of one forward of ``inputs[i]`` through each
    (model, submodel) setup, e.g. a batch of images through a ViT submodel."""
    with eval_mode(*(m for m, _ in setups)):
        fns = [lambda m=m, s=s, x=x: m(x, widths=s)
               for (m, s), x in zip(setups, inputs, strict=True)]
        times = measure(fns, repeats=repeats, warmup=warmup, threads=threads,
                        device=_device(setups[0][0]) if setups else None)
    return [_summarise("latency", t) for t in times]


def settings(threads: int | None, repeats: int, **extra: Any) -> dict[str, Any]:
    """What a latency measurement ran with, to store beside its numbers."""
    return {"threads": threads or torch.get_num_threads(), "repeats": repeats,
            "statistic": "median of interleaved rounds (q1/q3: quartiles)", **extra}
