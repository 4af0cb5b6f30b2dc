"""``matformer mixnmatch | extract | export-hf | import-hf``: submodels out of one checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from .cli_common import add_command

MIXNMATCH_EXAMPLES = """\
examples:
  matformer mixnmatch runs/demo                         # sweep -> runs/demo/mixnmatch/
  matformer mixnmatch runs/demo --patterns rule,decreasing,random --batches 10 --threads 1
  matformer mixnmatch runs/demo --baselines runs/base-S runs/base-XL
  matformer mixnmatch runs/demo --sweep runs/demo/mixnmatch --max-params 3e6   # pick, no sweep
  matformer extract runs/demo --granularity M --out runs/demo-M
  matformer extract runs/demo --widths 256,256,256,256,512,512 --out runs/demo-mix
  matformer extract runs/demo --max-latency-ms 8 --sweep runs/demo/mixnmatch --out runs/fast
  matformer export-hf runs/demo-mix --out hf/demo-mix --check
  matformer export-hf runs/demo --granularity S --out hf/demo-S
  matformer import-hf hf/demo-S --out runs/from-hf
"""


def _add_budgets(p: argparse.ArgumentParser) -> None:
    b = p.add_argument_group("budget (pick the lowest-loss submodel that fits all given limits)")
    b.add_argument("--max-params", type=float, help="total parameters")
    b.add_argument("--max-flops", type=float, help="forward FLOPs per token")
    b.add_argument("--max-latency-ms", type=float, help="measured prefill latency (ms)")
    b.add_argument("--max-decode-ms", type=float, help="measured decode-step latency (ms)")
    b.add_argument("--sweep", type=Path, help="a stored mixnmatch.json (or its directory) to "
                   "pick from; default: evaluate the candidates that fit, now")


def _add_submodel(p: argparse.ArgumentParser) -> None:
    p.add_argument("--granularity", help="a uniform granularity by name (S, M, ...)")
    p.add_argument("--widths", help="per-layer FFN widths: one int, or one per layer")
    p.add_argument("--any-width", action="store_true",
                   help="allow widths outside the trained nested set (untrained submodels)")


def _add_eval_data(p: argparse.ArgumentParser, batches: int | None) -> None:
    p.add_argument("--data", help="corpus (default: the one the checkpoint was trained on)")
    p.add_argument("--batches", type=int, default=batches, help="validation batches "
                   f"(default: {batches or 'all'})")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precision", default="fp32", choices=("bf16", "fp32"))
    p.add_argument("--repeats", type=int, default=7, help="latency: timed rounds (median)")
    p.add_argument("--prefill-len", type=int, default=128, help="latency: prompt tokens")
    p.add_argument("--threads", type=int, help="latency: torch threads while timing "
                   "(1 is steadier on a shared CPU; default: torch's setting)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_mixnmatch(sub: argparse._SubParsersAction) -> None:
    from .mixnmatch import PATTERNS

    p = add_command(
        sub, "mixnmatch", "sweep Mix'n'Match submodels: loss, size, latency", MIXNMATCH_EXAMPLES,
        description="Evaluate per-layer-width submodels picked by the paper's "
        "rule (non-decreasing with depth, least slope; one per reachable size) "
        "on held-out data, measure their latency here, write mixnmatch.json, "
        "mixnmatch.png and mixnmatch.md, and optionally pick one for a budget.")
    p.add_argument("checkpoint", type=Path, help="checkpoint or run directory")
    p.add_argument("--out", type=Path, help="output directory (default: CHECKPOINT/mixnmatch)")
    p.add_argument("--patterns", default="rule", help="comma-separated, from "
                   f"{','.join(PATTERNS)} (default: rule; the others are ablations)")
    p.add_argument("--widths", action="append", default=[],
                   help="an extra candidate (repeatable): one int or one per layer")
    p.add_argument("--any-width", action="store_true", help="allow untrained widths")
    p.add_argument("--baselines", nargs="+", type=Path, default=[],
                   help="independently trained dense checkpoints to overlay")
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    p.add_argument("--seed", type=int, default=0, help="seed of the random pattern")
    _add_eval_data(p, batches=None)
    _add_budgets(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_extract(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "extract", "save any submodel as a standalone dense checkpoint", MIXNMATCH_EXAMPLES)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, required=True, help="new checkpoint directory")
    p.add_argument("--name", help="granularity name stored in the config (default: derived)")
    _add_submodel(p)
    _add_budgets(p)
    _add_eval_data(p, batches=20)
    p.add_argument("--json", action="store_true")


def add_export_hf(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "export-hf", "write a Hugging Face transformers folder", MIXNMATCH_EXAMPLES,
        description="Export a checkpoint (or one of its submodels) as a folder "
        "that stock transformers loads with AutoModelForCausalLM/AutoTokenizer "
        "(no trust_remote_code). swiglu -> Llama, gelu/relu2 -> Arcee. Per-layer "
        "widths are zero-padded to the widest layer: exact, but no faster than it.")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, required=True)
    _add_submodel(p)
    p.add_argument("--no-pad", action="store_true",
                   help="refuse per-layer widths instead of zero-padding them")
    p.add_argument("--check", action="store_true",
                   help="load the folder with transformers and compare logits with ours")
    p.add_argument("--json", action="store_true")


def add_import_hf(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "import-hf", "convert a Llama/Arcee transformers folder to ours", MIXNMATCH_EXAMPLES)
    p.add_argument("folder", type=Path)
    p.add_argument("--out", type=Path, required=True, help="new checkpoint directory")
    p.add_argument("--data", help="record this corpus so `matformer eval` needs no --data")
    p.add_argument("--json", action="store_true")


def _budgets(args: argparse.Namespace) -> dict[str, float | None]:
    return {k: getattr(args, k) for k in ("max_params", "max_flops", "max_latency_ms",
                                          "max_decode_ms")}


def _submodel_widths(args: argparse.Namespace, model: Any) -> Any:
    from .config import parse_widths
    from .mixnmatch import check_widths

    if args.widths and args.granularity:
        raise ValueError("give --granularity or --widths, not both")
    if args.widths:
        return check_widths(model.config, parse_widths(args.widths, model.config.n_layer),
                            nested=not args.any_width)
    return args.granularity


def _sweep_kw(args: argparse.Namespace) -> dict[str, Any]:
    return {"precision": args.precision, "prefill_len": args.prefill_len,
            "repeats": args.repeats, "threads": args.threads, "progress": not args.no_progress}


def _print_row(r: dict[str, Any], prefix: str = "") -> None:
    lat = (f", prefill {r['prefill_ms']:.2f} ms, decode {r['decode_ms']:.3f} ms"
           if "prefill_ms" in r else "")
    print(f"{prefix}{r['name']}: widths {','.join(map(str, r['widths']))}; "
          f"{r['params'] / 1e6:.3f}M params ({r['non_embedding_params'] / 1e6:.3f}M "
          f"non-embedding), {r['flops_per_token'] / 1e6:.1f} MFLOPs/token{lat}; "
          f"val loss {r['val_loss']:.4f}")


def mixnmatch(args: argparse.Namespace) -> int:
    from . import checkpoint as ckpt
    from . import mixnmatch as mm
    from .config import parse_widths
    from .metrics import validation_batches
    from .report import load_sweep, markdown_table, write_report

    budgets = _budgets(args)
    if args.sweep:
        result = load_sweep(args.sweep)
    else:
        model, tokenizer = ckpt.load_checkpoint(args.checkpoint)
        cfg = model.config
        batches, info = validation_batches(args.checkpoint, tokenizer, data=args.data,
                                              batch_size=args.batch_size,
                                              max_batches=args.batches)
        extra = [parse_widths(w, cfg.n_layer) for w in args.widths]
        cands = mm.candidates(cfg, [p.strip() for p in args.patterns.split(",") if p.strip()],
                              widths=extra, seed=args.seed, nested=not args.any_width)
        kw = {**_sweep_kw(args), "seq_len": info["seq_len"], "latency": not args.no_latency}
        baselines = []
        for path in args.baselines:
            bm, btok = ckpt.load_checkpoint(path)
            if btok != tokenizer:
                raise ValueError(f"baseline {path} uses a different tokenizer: losses would "
                                 "not be comparable")
            baselines.append((f"baseline {bm.config.names[0]} ({path.name})", bm))
        rows = mm.sweep(model, batches, cands, baselines=baselines, **kw)
        rows, base_rows = rows[: len(cands)], rows[len(cands):]
        result = {"checkpoint": str(ckpt.resolve(args.checkpoint)), **info,
                  "config": cfg.to_dict(), "patterns": args.patterns,
                  "latency": None if args.no_latency else {
                      "prefill_len": args.prefill_len, "repeats": args.repeats,
                      "threads": args.threads or torch.get_num_threads(),
                      "decode": "one token step" + (" with KV cache"
                                                    if mm.supports_cache(model) else
                                                    " (single-token forward, no cache)")},
                  "candidates": rows, "baselines": base_rows}
        out = args.out or args.checkpoint / "mixnmatch"
        result["files"] = {k: str(v) for k, v in write_report(result, out).items()}
    chosen = None
    if any(v is not None for v in budgets.values()):
        chosen = mm.select(result["candidates"], **budgets)
    if args.json:
        print(json.dumps({**result, "selected": chosen}, indent=1))
        return 0
    if not args.sweep:
        print(markdown_table(result["candidates"] + result.get("baselines", [])), end="")
        n = len(result["candidates"])
        print(f"{n} submodels on {result['val_tokens']:,} validation tokens of "
              f"{result['data']}; wrote {', '.join(result['files'].values())}")
    if chosen is not None:
        _print_row(chosen, "best under the budget: ")
    return 0


def _picked_submodel(args: argparse.Namespace, model: Any, tokenizer: Any
                     ) -> tuple[Any, dict[str, Any] | None]:
    """The submodel a command with extract's flags asks for: (widths, chosen sweep row).

    A budget picks the lowest-loss candidate that fits (from ``--sweep`` or evaluated now);
    otherwise ``--granularity``/``--widths`` name it; one of them is required.
    """
    from . import mixnmatch as mm
    from .metrics import validation_batches
    from .report import load_sweep

    budgets = _budgets(args)
    if any(v is not None for v in budgets.values()):
        if args.widths or args.granularity:
            raise ValueError("give a submodel (--granularity/--widths) or a budget, not both")
        if args.sweep:
            chosen = mm.select(load_sweep(args.sweep)["candidates"], **budgets)
        else:
            batches, info = validation_batches(args.checkpoint, tokenizer, data=args.data,
                                                  batch_size=args.batch_size,
                                                  max_batches=args.batches)
            chosen = mm.choose(model, batches, mm.candidates(model.config), budgets,
                               seq_len=info["seq_len"], **_sweep_kw(args))
        return tuple(chosen["widths"]), chosen
    widths = _submodel_widths(args, model)
    if widths is None:
        raise ValueError("choose a submodel: --granularity, --widths or a budget "
                         "(--max-params / --max-flops / --max-latency-ms)")
    return widths, None


def extract(args: argparse.Namespace) -> int:
    from . import checkpoint as ckpt
    from . import mixnmatch as mm

    model, tokenizer = ckpt.load_checkpoint(args.checkpoint)
    widths, chosen = _picked_submodel(args, model, tokenizer)
    path = mm.save_extracted(args.out, model, tokenizer, widths, source=args.checkpoint,
                             name=args.name)
    sub = ckpt.load_checkpoint(path)[0]
    size = (path / ckpt.WEIGHTS).stat().st_size
    full = (ckpt.resolve(args.checkpoint) / ckpt.WEIGHTS).stat().st_size
    res = {"out": str(path), "name": sub.config.names[0], "widths": list(sub.config.ffn_dims),
           "params": sub.num_params(), "weights_bytes": size, "source_weights_bytes": full,
           "selected": chosen}
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    if chosen is not None:
        _print_row(chosen, "best under the budget: ")
    print(f"extracted {res['name']} (FFN widths {','.join(map(str, res['widths']))}, "
          f"{res['params'] / 1e6:.3f}M params) to {path}; weights {size / 1e6:.2f} MB vs "
          f"{full / 1e6:.2f} MB for the source")
    return 0


def export_hf(args: argparse.Namespace) -> int:
    from . import checkpoint as ckpt
    from .hf import export_hf

    model, tokenizer = ckpt.load_checkpoint(args.checkpoint)
    info = export_hf(model, tokenizer, args.out, widths=_submodel_widths(args, model),
                     pad=not args.no_pad)
    if args.check:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(args.out)).eval()
        x = torch.randint(0, model.config.vocab_size,
                          (2, min(32, model.config.max_seq_len)),
                          generator=torch.Generator().manual_seed(0))
        widths = _submodel_widths(args, model)
        with torch.no_grad():
            diff = (hf(x).logits - model(x, widths=widths)).abs().max().item()
        info["check_max_abs_logit_diff"] = diff
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"exported {info['architecture']} ({info['params'] / 1e6:.3f}M params) to "
          f"{info['out']}: {info['note']}")
    if info["padded"]:
        print(f"note: the folder holds {info['exported_params'] / 1e6:.3f}M parameters, "
              "zero padding included; load it with AutoModelForCausalLM.from_pretrained")
    if "check_max_abs_logit_diff" in info:
        print(f"check: transformers logits vs ours, max abs diff "
              f"{info['check_max_abs_logit_diff']:.2e}")
    return 0


def import_hf(args: argparse.Namespace) -> int:
    from . import checkpoint as ckpt
    from .hf import import_hf

    model, tokenizer = import_hf(args.folder, name=args.folder.name)
    meta: dict[str, Any] = {"origin": {"hf_folder": str(args.folder)}}
    if args.data:
        meta["data"] = args.data
    path = ckpt.save_checkpoint(args.out, model, tokenizer, metadata=meta)
    res = {"out": str(path), "params": model.num_params(),
           "widths": list(model.config.ffn_dims)}
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"imported {args.folder} ({res['params'] / 1e6:.3f}M params, FFN widths "
              f"{','.join(map(str, res['widths']))}) to {path}")
    return 0
