"""Generation speed, every ratio against a baseline measured in the same run.

Greedy, batch 1, one torch thread, fp32 unless a row says otherwise; each variant decodes the same
validation prompts. For each prompt of each round (``--repeats``) all variants run back to back,
the starting variant rotating, so load from other jobs on a shared machine slows all alike; the
ratios printed are medians of per-(round, prompt) ratios of runs seconds apart. Rows:

- ``HF <sub>``: Hugging Face ``generate`` (greedy, KV cache) on the weights exported with
  ``matformer.submodels.hf.export_hf`` (a Mix'n'Match submodel is exported zero-padded to its widest
  layer, so HF runs it at that width's cost: exact logits, no speed gain);
- ``ours <sub>``: :func:`matformer.generate.generate`: the lean decode path (eager);
- ``ours XL, model.forward``: the general forward in a bare cached loop (the path before the
  lean one), to show what the lean path buys;
- ``ours <sub> bf16`` / ``fp16``: weights and cache in that dtype, with the greedy agreement
  with fp32 (the fraction of generated tokens equal to fp32's, position by position);
- ``ours <sub> compiled`` (``--compile``): ``torch.compile`` of the lean forward (static
  shapes, one graph per submodel and query length; compile seconds reported apart);
- ``spec S->XL k=..``: self-speculative decoding, shared cache, fixed draft length;
  ``adaptive``: draft length chosen each round from measured costs and running acceptance
  (0 = plain step); ``auto``: the drafter and draft length from
  :func:`matformer.draft.search_drafter` on other held-out prompts (its table is printed);
  with ``--compile`` every speculative row is repeated on compiled runners (`` compiled``) and
  compared with compiled plain decoding.

    .venv/bin/python benchmarks/generation.py --checkpoint runs/demo
    .venv/bin/python benchmarks/generation.py --checkpoint runs/demo --compile
    .venv/bin/python benchmarks/generation.py --random --new-tokens 32    # no checkpoint needed
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from matformer import checkpoint as ckpt
from matformer.cache import KVCache
from matformer.config import preset
from matformer.data import validation_batches
from matformer.draft import search_drafter
from matformer.families import load_checkpoint
from matformer.generate import generate
from matformer.model import MatFormerLM
from matformer.runner import RunnerPool
from matformer.speculative import SpecStats, speculative_generate

MIX = "M,M,M,M,L,L"  # a Mix'n'Match submodel of the demo shape (rule: non-decreasing, least slope)
Run = Callable[[list[int]], tuple[list[int], SpecStats | None]]  # prompt -> (new ids, stats)


@dataclass
class Variant:
    label: str
    run: Run
    seconds: list[float] = field(default_factory=list)  # per (round, prompt)
    tokens: list[int] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)
    stats: list[SpecStats] = field(default_factory=list)

    @property
    def tps(self) -> list[float]:
        return [n / s for n, s in zip(self.tokens, self.seconds, strict=True)]

    def vs(self, base: Variant) -> float:
        """Median of paired speed ratios (this / base) over the (round, prompt) runs."""
        return statistics.median(a / b for a, b in zip(self.tps, base.tps, strict=True))


def load(args: argparse.Namespace) -> tuple[MatFormerLM, Any, list[list[int]], str]:
    """Model, tokenizer (None for --random), 2 x ``--prompts`` token windows of the context's
    length, and where they came from."""
    n = 2 * args.prompts  # the second half is held out for the drafter search
    if args.random or not Path(args.checkpoint).exists():
        if not args.random:
            print(f"note: {args.checkpoint} not found; random-init demo model", file=sys.stderr)
        torch.manual_seed(0)
        model = MatFormerLM(preset("demo", vocab_size=4096))
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, 4096, (n, model.config.max_seq_len), generator=g).tolist()
        return model, None, prompts, "random-init demo preset (acceptance is meaningless)"
    model, tokenizer = load_checkpoint(args.checkpoint)
    batches, info = validation_batches(tokenizer, ckpt.read_metadata(args.checkpoint),
                                       model.config.max_seq_len, batch_size=1, max_batches=n)
    prompts = [x[0].tolist() for x, _ in batches]  # whole windows; cut by the caller
    return model, tokenizer, prompts, f"{ckpt.resolve(args.checkpoint)} ({info['data']} validation)"


def ours(model: MatFormerLM, widths: Any, n: int, pool: RunnerPool) -> Run:
    def run(prompt: list[int]) -> tuple[list[int], None]:
        out = generate(model, torch.tensor([prompt]), n, widths=widths, temperature=0,
                       runners=pool)
        return out[0, len(prompt):].tolist(), None
    return run


def forward_loop(model: MatFormerLM, n: int) -> Run:
    """Cached greedy decoding through ``model.forward`` (no lean path)."""
    @torch.no_grad()
    def run(prompt: list[int]) -> tuple[list[int], None]:
        cache = KVCache.for_model(model, 1, len(prompt) + n)
        logits = model(torch.tensor([prompt]), cache=cache)[:, -1]
        new = []
        for i in range(n):
            tok = logits.argmax(-1, keepdim=True)
            new.append(tok)
            if i < n - 1:
                logits = model(tok, cache=cache, start_pos=len(prompt) + i)[:, -1]
        return torch.cat(new, 1)[0].tolist(), None
    return run


def hf_run(folder: Path, n: int) -> Run:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    hf.generation_config.eos_token_id = None  # like ours here: never stop early

    @torch.no_grad()
    def run(prompt: list[int]) -> tuple[list[int], None]:
        x = torch.tensor([prompt])
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                          do_sample=False, pad_token_id=0)
        return out[0, len(prompt):].tolist(), None
    return run


@torch.no_grad()
def prefill_ratios(model: MatFormerLM, tmp: Path, prompts: list[list[int]], repeats: int
                   ) -> dict[str, float]:
    """Median speed ratio (ours / HF) of a prefill: one forward over the prompt into a fresh KV
    cache, last-position logits (ours: ``generate.prefill`` on the lean runner; HF: the model's
    forward with ``use_cache=True``), per submodel, interleaved over ``repeats`` rounds."""
    from transformers import AutoModelForCausalLM

    from matformer.generate import prefill

    pool, out = RunnerPool(model, compile=False), {}
    for name in ("XL", "S"):
        hf = AutoModelForCausalLM.from_pretrained(str(tmp / name)).eval()
        runner = pool.get(None if name == "XL" else name)

        def ours(x: torch.Tensor, runner: Any = runner) -> None:
            prefill(model, x, KVCache.for_model(model, 1, x.shape[1]), runner=runner)

        def theirs(x: torch.Tensor, hf: Any = hf) -> None:
            hf(x, use_cache=True, logits_to_keep=1)

        ratios = []
        for r in range(repeats + 1):  # round 0 warms up
            for i, p in enumerate(prompts):
                x, t = torch.tensor([p]), {}
                for fn in (ours, theirs) if (r + i) % 2 else (theirs, ours):  # alternate order
                    t0 = time.perf_counter()
                    fn(x)
                    t[fn] = time.perf_counter() - t0
                if r:
                    ratios.append(t[theirs] / t[ours])
        out[name] = statistics.median(ratios)
    return out


def spec(model: MatFormerLM, n: int, pool: RunnerPool, **kw: Any) -> Run:
    def run(prompt: list[int]) -> tuple[list[int], SpecStats]:
        out, stats = speculative_generate(model, torch.tensor(prompt), n, temperature=0,
                                          shared_cache=True, runners=pool, **kw)
        return out[0, len(prompt):].tolist(), stats
    return run


def variants(model: MatFormerLM, tokenizer: Any, args: argparse.Namespace,
             held_out: list[list[int]], tmp: Path) -> tuple[list[Variant], dict[str, Any]]:
    n, cfg = args.new_tokens, model.config
    mix = tuple(cfg.ffn_widths(g)[i] for i, g in enumerate(MIX.split(",")))
    subs = {"XL": None, "S": "S", "Mix'n'Match": mix}
    pool = RunnerPool(model, compile=False)
    out = [Variant(f"ours {name}", ours(model, w, n, pool)) for name, w in subs.items()]
    out.append(Variant("ours XL, model.forward", forward_loop(model, n)))
    if tokenizer is not None and not args.no_hf:
        from matformer.submodels.hf import export_hf

        for name, w in subs.items():
            export_hf(model, tokenizer, tmp / name, widths=w)
            out.append(Variant(f"HF {name}", hf_run(tmp / name, n)))
    for dtype in args.dtypes:
        low = copy.deepcopy(model).to({"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
        low_pool = RunnerPool(low.eval(), compile=False)
        out += [Variant(f"ours {name} {dtype}", ours(low, subs[name], n, low_pool))
                for name in ("XL", "S")]
    extra: dict[str, Any] = {}
    pools = {"": pool}
    if args.compile:
        cpool = RunnerPool(model, compile=True)
        pools[" compiled"] = cpool
        out += [Variant(f"ours {name} compiled", ours(model, subs[name], n, cpool))
                for name in ("XL", "S")]
        extra["compile_pool"] = cpool
    for tag, p in pools.items():
        out += [Variant(f"spec S->XL k={k}{tag}", spec(model, n, p, draft="S", draft_len=k))
                for k in args.draft_lens]
        out.append(Variant(f"spec S->XL adaptive{tag}", spec(
            model, n, p, draft="S", adaptive=True, max_draft_len=args.max_draft_len)))
        t0 = time.perf_counter()
        rows = search_drafter(model, [torch.tensor(q) for q in held_out], new_tokens=min(n, 32),
                              max_draft_len=args.max_draft_len, runners=p)
        extra[f"search{tag}"] = (time.perf_counter() - t0, rows)
        best = rows[0]
        if best.best_k > 0:
            out.append(Variant(f"spec auto ({best.name})->XL adaptive{tag}", spec(
                model, n, p, draft=best.submodel, adaptive=True,
                max_draft_len=args.max_draft_len)))
    return out, extra


def measure(vs: list[Variant], prompts: list[list[int]], repeats: int) -> None:
    for v in vs:  # warm-up: one run each (compiles graphs; measures the adaptive rule's costs)
        v.run(prompts[0])
    for r in range(repeats):
        for i, prompt in enumerate(prompts):
            j = (r * len(prompts) + i) % len(vs)
            for v in vs[j:] + vs[:j]:  # every variant on this prompt, starting variant rotating
                t0 = time.perf_counter()
                new, stats = v.run(prompt)
                v.seconds.append(time.perf_counter() - t0)
                v.tokens.append(len(new))
                v.outputs.append(new)
                if stats is not None:
                    v.stats.append(stats)


def agreement(a: Variant, b: Variant) -> float:
    """Fraction of generated positions where the two variants emitted the same token."""
    same = sum(x == y for oa, ob in zip(a.outputs, b.outputs, strict=True)
               for x, y in zip(oa, ob, strict=False))
    return same / max(sum(len(o) for o in a.outputs), 1)


def report(vs: list[Variant], model: MatFormerLM, extra: dict[str, Any],
           args: argparse.Namespace) -> None:
    by = {v.label: v for v in vs}
    base = by["ours XL"]
    print(f"| {'variant':<40} | tokens/s | vs ours XL | same tokens as fp32 XL/sub | "
          "acceptance | mean k |")
    print(f"|{'-' * 42}|---------:|-----------:|---------------------------:|-----------:|-------:|")
    for v in vs:
        ref = by["ours S"] if " S" in v.label and "S->" not in v.label else by.get(
            "ours Mix'n'Match") if "Mix" in v.label else base
        acc = mean_k = "-"
        if v.stats:
            drafted = sum(s.drafted for s in v.stats)
            acc = f"{sum(s.accepted for s in v.stats) / max(drafted, 1):.1%}"
            lens = [k for s in v.stats for k in s.draft_lens]
            mean_k = f"{sum(lens) / max(len(lens), 1):.2f}"
        print(f"| {v.label:<40} | {statistics.median(v.tps):8.1f} | {v.vs(base):9.2f}x | "
              f"{agreement(v, ref):26.1%} | {acc:>10} | {mean_k:>6} |")
    cfg = model.config
    flops = cfg.flops_per_token(cfg.ffn_widths("XL"), args.prompt_len + args.new_tokens // 2) / \
        cfg.flops_per_token(cfg.ffn_widths("S"), args.prompt_len + args.new_tokens // 2)
    s_xl = by["ours S"].vs(base)
    print(f"\nS vs XL speed: {s_xl:.2f}x; FLOP ratio {flops:.2f}x; "
          f"speed / FLOP ratio = {s_xl / flops:.2f}")
    for name in ("XL", "S", "Mix'n'Match"):
        if f"HF {name}" in by:
            print(f"ours vs HF generate, {name}: {by[f'ours {name}'].vs(by[f'HF {name}']):.2f}x")
    for name, ratio in extra.get("prefill", {}).items():
        print(f"prefill of {args.prefill_len} tokens, ours vs HF, {name}: {ratio:.2f}x")
    print(f"lean path vs model.forward loop (XL): {base.vs(by['ours XL, model.forward']):.2f}x")
    if "compile_pool" in extra:
        for name in ("XL", "S"):
            print(f"compiled vs eager, {name}: "
                  f"{by[f'ours {name} compiled'].vs(by[f'ours {name}']):.2f}x")
        print(f"compile time (all graphs): {extra['compile_pool'].compile_seconds:.0f}s")
        for k in ("spec S->XL adaptive", *(f"spec S->XL k={k}" for k in args.draft_lens)):
            print(f"{k} compiled vs plain compiled XL: "
                  f"{by[k + ' compiled'].vs(by['ours XL compiled']):.2f}x")
    for key, found in extra.items():
        if not key.startswith("search"):  # search / search compiled
            continue
        seconds, rows = found
        print(f"\ndrafter search{key[6:]} ({seconds:.1f}s; expected speed from acceptance on "
              "held-out prompts and measured costs):")
        print(f"  {'drafter':<16}{'widths':<28}{'accept':>7}{'draft ms':>9}{'best k':>7}"
              f"{'vs plain':>9}")
        for r in rows:
            print(f"  {r.name:<16}{','.join(map(str, r.submodel.widths)):<28}{r.acceptance:>7.1%}"
                  f"{r.draft_ms:>9.2f}{r.best_k:>7}{r.speedup:>8.2f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="runs/demo")
    p.add_argument("--random", action="store_true", help="random-init demo model")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--prefill-len", type=int, default=128, help="prompt tokens of the prefill "
                   "comparison with HF")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--draft-lens", type=int, nargs="+", default=[2, 4])
    p.add_argument("--max-draft-len", type=int, default=8)
    p.add_argument("--dtypes", nargs="*", default=["bf16", "fp16"], choices=["bf16", "fp16"])
    p.add_argument("--compile", action="store_true", help="also time torch.compile-d decoding")
    p.add_argument("--no-hf", action="store_true", help="skip Hugging Face generate")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    model, tokenizer, prompts, source = load(args)
    model.eval()
    long = [p[: args.prefill_len] for p in prompts[: args.prompts]]
    prompts = [p[: args.prompt_len] for p in prompts]
    prompts, held_out = prompts[: args.prompts], prompts[args.prompts:]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        vs, extra = variants(model, tokenizer, args, held_out, Path(tmp))
        measure(vs, prompts, args.repeats)
        if tokenizer is not None and not args.no_hf:
            extra["prefill"] = prefill_ratios(model, Path(tmp), long, args.repeats)
    print(f"# generation benchmark: {source}")
    print(f"# {torch.__version__}, {args.threads} thread(s), greedy, batch 1; {len(prompts)} "
          f"prompts x {args.prompt_len} tokens, {args.new_tokens} new tokens, {args.repeats} "
          f"rounds; {time.perf_counter() - t0:.0f}s")
    report(vs, model, extra, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
