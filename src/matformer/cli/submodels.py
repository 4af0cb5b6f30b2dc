"""``matformer mixnmatch | extract | export-hf | import-hf``: submodels out of one checkpoint.

Each command returns ``(result, text)`` (see :mod:`matformer.cli.common`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from .args import SEED, Choices, check_latency_budgets, one_submodel
from .common import (
    Result,
    add_budgets,
    add_command,
    add_eval_data,
    add_extra_widths,
    add_latency,
    add_submodel,
    checkpoint_batches,
    chosen_submodel,
    extra_widths,
    load_checkpoint,
)

MIXNMATCH_EXAMPLES = """\
examples:
  matformer mixnmatch runs/demo                         # sweep -> runs/demo/mixnmatch/
  matformer --threads 1 mixnmatch runs/demo --patterns rule,decreasing,random --batches 10
  matformer mixnmatch runs/demo --baselines runs/base-S runs/base-XL
  matformer mixnmatch runs/demo --sweep runs/demo/mixnmatch --max-params 3e6   # pick, no sweep
  matformer extract runs/demo --granularity M --out runs/demo-M
  matformer extract runs/demo --widths 256,256,256,256,512,512 --out runs/demo-mix
  matformer extract runs/demo --max-latency-ms 8 --sweep runs/demo/mixnmatch --out runs/fast
  matformer export-hf runs/demo-mix --out hf/demo-mix --check
  matformer export-hf runs/demo --granularity S --out hf/demo-S
  matformer export-hf runs/demo --granularity M --out hf/demo-S --force   # replace it, whole
  matformer import-hf hf/demo-S --out runs/from-hf
  matformer import-hf models/SmolLM2-135M-Instruct.Q4_1.gguf --out runs/smollm2
"""


def _add_budgets(p: argparse.ArgumentParser) -> None:
    b = add_budgets(p, decode=True)
    b.add_argument("--sweep", type=Path, help="a stored mixnmatch.json (or its directory) to "
                   "pick from; default: evaluate the candidates that fit, now")


def _add_force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out (as a whole, atomically; never the input)")


def add_mixnmatch(sub: argparse._SubParsersAction) -> None:
    from ..submodels.candidates import PATTERNS

    p = add_command(
        sub, "mixnmatch", "sweep Mix'n'Match submodels: loss, size, latency", MIXNMATCH_EXAMPLES,
        description="Evaluate per-layer-width submodels picked by the paper's "
        "rule (non-decreasing with depth, least slope; one per reachable size) "
        "on held-out data, measure their latency here, write mixnmatch.json, "
        "mixnmatch.png and mixnmatch.md, and optionally pick one for a budget.")
    p.add_argument("checkpoint", type=Path, help="checkpoint or run directory")
    p.add_argument("--out", type=Path, help="output directory (default: CHECKPOINT/mixnmatch)")
    p.add_argument("--patterns", type=Choices(PATTERNS), default="rule",
                   help="candidate patterns (rule: the paper's; the others are ablations)")
    add_extra_widths(p, "an extra candidate (repeatable): one int or one per layer")
    p.add_argument("--depth", nargs="?", const="", metavar="GRANULARITY",
                   help="also try skipping one layer's FFN, and one layer's attention, at a "
                   "time in this granularity (default: the full model); untrained, so the "
                   "sweep shows where skipping hurts least")
    p.add_argument("--baselines", nargs="+", type=Path, default=[],
                   help="independently trained dense checkpoints to overlay")
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the random pattern")
    add_eval_data(p, batches=None)
    add_latency(p, prefill=True)
    _add_budgets(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(check_args=_check_mixnmatch)


def _check_mixnmatch(args: argparse.Namespace) -> None:
    """Cross-flag rules of ``mixnmatch``: no sweep flags with a stored ``--sweep``, and no
    latency budget for a sweep that skips latency."""
    if args.sweep:
        given = [flag for flag, value in (("--out", args.out), ("--widths", args.widths),
                                          ("--baselines", args.baselines),
                                          ("--patterns", args.patterns != "rule"),
                                          ("--depth", args.depth is not None),
                                          ("--data", args.data)) if value]
        if given:
            raise ValueError(f"--sweep reads a stored sweep; {', '.join(given)} would only "
                             "apply to a new one (drop --sweep to run it)")
        if not any(v is not None for v in _budgets(args).values()):
            raise ValueError("--sweep needs a budget to pick with (--max-params, --max-flops, "
                             "--max-latency-ms or --max-decode-ms)")
    else:
        check_latency_budgets(args)


def add_extract(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "extract", "save any submodel as a standalone dense checkpoint", MIXNMATCH_EXAMPLES)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, required=True, help="new checkpoint directory")
    _add_force(p)
    p.add_argument("--name", help="granularity name stored in the config (default: derived)")
    add_submodel(p)
    _add_budgets(p)
    add_eval_data(p, batches=20)
    add_latency(p, prefill=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(check_args=_check_extract)


def _check_extract(args: argparse.Namespace) -> None:
    """Cross-flag rules of ``extract``: one submodel, given or picked for a budget."""
    one_submodel(args)
    budget = any(v is not None for v in _budgets(args).values())
    if budget and (args.widths or args.granularity):
        raise ValueError("give a submodel (--granularity/--widths) or a budget, not both")
    if args.sweep and not budget:
        raise ValueError("--sweep goes with a budget (--max-params, --max-flops, "
                         "--max-latency-ms or --max-decode-ms)")


def add_export_hf(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "export-hf", "write a Hugging Face transformers folder", MIXNMATCH_EXAMPLES,
        description="Export a checkpoint (or one of its submodels) as a folder "
        "that stock transformers loads with AutoModelForCausalLM/AutoTokenizer "
        "(no trust_remote_code). swiglu -> Llama, gelu/relu2 -> Arcee. Per-layer "
        "widths are zero-padded to the widest layer: exact, but no faster than it.")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, required=True, help="new folder")
    _add_force(p)
    add_submodel(p)
    p.add_argument("--no-pad", action="store_true",
                   help="refuse per-layer widths instead of zero-padding them")
    p.add_argument("--check", action="store_true",
                   help="load the folder with transformers and compare logits with ours")
    p.add_argument("--json", action="store_true")
    p.set_defaults(check_args=one_submodel)


def add_import_hf(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "import-hf", "convert a Llama/Arcee transformers folder or a GGUF file to ours",
        MIXNMATCH_EXAMPLES, description="Convert a Llama/Arcee transformers folder, or a "
        "llama-architecture GGUF file (as llama.cpp, Ollama or LM Studio keep models; read and "
        "dequantised to fp32 by transformers), to a checkpoint of ours. The tokenizer keeps its "
        "vocabulary, pre-tokenizer, chat template and end-of-turn token.")
    p.add_argument("folder", type=Path, help="transformers folder or .gguf file")
    p.add_argument("--out", type=Path, required=True, help="new checkpoint directory")
    _add_force(p)
    p.add_argument("--data", help="record this corpus so `matformer eval` needs no --data")
    p.add_argument("--json", action="store_true")


def _budgets(args: argparse.Namespace) -> dict[str, float | None]:
    return {k: getattr(args, k) for k in ("max_params", "max_flops", "max_latency_ms",
                                          "max_decode_ms")}


def _heads_note(model: Any, sub: Any) -> tuple[list[int], str] | None:
    """Per-layer head counts of a submodel whose heads differ from the model's own (a
    head-nested granularity, or 0 where attention is skipped) and what shipping it means;
    None when they do not differ."""
    from ..submodels.extract import HEADS_NOTE, heads_record

    counts = heads_record(model, sub)
    if counts is None:
        return None
    n = model.config.n_head
    kept = [h for h in counts if h]
    notes = [HEADS_NOTE.format(n=n, h=min(kept))] if kept and min(kept) < n else []
    skipped = [i for i, h in enumerate(counts) if not h]
    if skipped:
        notes.append(f"no attention in layers {skipped} (untrained depth elasticity; those "
                     "weights are not stored)")
    return counts, "; ".join(notes)


def _check_out(args: argparse.Namespace, source: Path) -> None:
    """Refuse --out before any work: it exists (without --force) or is the input."""
    from .. import checkpoint as ckpt
    from ..outputs import check_output

    check_output(args.out, overwrite=args.force, sources=ckpt.inputs(source))


def _sweep_kw(args: argparse.Namespace) -> dict[str, Any]:
    return {"precision": args.precision, "prefill_len": args.prefill_len,
            "repeats": args.repeats, "progress": not args.no_progress}


def _describe_row(r: dict[str, Any], prefix: str = "") -> str:
    """One line for a sweep row: a language model's (loss, FLOPs per token, prefill/decode
    latency) or a ViT's (accuracy, FLOPs per image, latency)."""
    head = (f"{prefix}{r['name']}: widths {','.join(map(str, r['widths']))}; "
            f"{r['params'] / 1e6:.3f}M params ({r['non_embedding_params'] / 1e6:.3f}M "
            "non-embedding), ")
    if "flops_per_image" in r:
        lat = f", latency {r['latency_ms']:.2f} ms" if "latency_ms" in r else ""
        return (f"{head}{r['flops_per_image'] / 1e6:.2f} MFLOPs/image{lat}; accuracy "
                f"{100 * r['accuracy']:.2f}%")
    lat = (f", prefill {r['prefill_ms']:.2f} ms, decode {r['decode_ms']:.3f} ms"
           if "prefill_ms" in r else "")
    return (f"{head}{r['flops_per_token'] / 1e6:.1f} MFLOPs/token{lat}; "
            f"val loss {r['val_loss']:.4f}")


def mixnmatch(args: argparse.Namespace) -> Result:
    from .. import checkpoint as ckpt
    from ..submodels import candidates as mm
    from ..submodels.latency import settings
    from ..submodels.report import line_analysis, load_sweep, markdown_table, write_report
    from ..submodels.sweep import lm_sweep, select

    budgets = _budgets(args)
    if args.sweep:
        result = load_sweep(args.sweep)
    else:
        model, tokenizer = load_checkpoint(args.checkpoint)
        cfg = model.config
        batches, info = checkpoint_batches(args, model, tokenizer)
        extra = extra_widths(args, cfg)
        depth = None if args.depth is None else (args.depth or cfg.names[-1])
        cands = mm.candidates(cfg, [p.strip() for p in args.patterns.split(",") if p.strip()],
                              widths=extra, seed=args.seed, nested=not args.any_width,
                              depth=depth)
        baselines = []
        for path in args.baselines:
            bm, btok = load_checkpoint(path)
            if btok != tokenizer:
                raise ValueError(f"baseline {path} uses a different tokenizer: losses would "
                                 "not be comparable")
            baselines.append((f"baseline {bm.config.names[0]} ({path.name})", bm))
        rows = lm_sweep(model, batches, cands, baselines=baselines, seq_len=info["seq_len"],
                        latency=not args.no_latency, **_sweep_kw(args))
        rows, base_rows = rows[: len(cands)], rows[len(cands):]
        result = {"checkpoint": str(ckpt.resolve(args.checkpoint)), **info,
                  "config": cfg.to_dict(), "patterns": args.patterns,
                  "latency": None if args.no_latency else settings(
                      None, args.repeats, prefill_len=args.prefill_len,
                      decode="one token step with KV cache"),
                  "candidates": rows, "baselines": base_rows,
                  "analysis": line_analysis(rows)}
        out = args.out or args.checkpoint / "mixnmatch"
        result["files"] = {k: str(v) for k, v in write_report(result, out).items()}
    chosen = None
    if any(v is not None for v in budgets.values()):
        chosen = select(result["candidates"], **budgets)
    lines = []
    if not args.sweep:
        lines.append(markdown_table(result["candidates"] + result.get("baselines", []))
                     + f"{len(result['candidates'])} submodels on {result['val_tokens']:,} "
                     f"validation tokens of {result['data']}; wrote "
                     f"{', '.join(result['files'].values())}")
    if chosen is not None:
        lines.append(_describe_row(chosen, "best under the budget: "))
    return {**result, "selected": chosen}, "\n".join(lines)


def picked_submodel(args: argparse.Namespace, model: Any, tokenizer: Any
                    ) -> tuple[Any, dict[str, Any] | None]:
    """The submodel a command with extract's flags asks for: (Submodel, chosen sweep row).

    A budget picks the lowest-loss candidate that fits (from ``--sweep`` or evaluated now);
    otherwise ``--granularity``/``--widths`` name it; one of them is required.
    """
    from ..submodels import candidates as mm
    from ..submodels.report import load_sweep
    from ..submodels.sweep import LM_OBJECTIVE, VIT_OBJECTIVE, choose, select

    budgets = _budgets(args)
    if any(v is not None for v in budgets.values()):
        if args.widths or args.granularity:
            raise ValueError("give a submodel (--granularity/--widths) or a budget, not both")
        if getattr(args, "skip_attention", None):
            raise ValueError("give --skip-attention or a budget, not both (a budget picks a "
                             "sweep row, which says itself which attention it skips)")
        from ..vision import ViTConfig

        vision = isinstance(model.config, ViTConfig)
        if vision and not args.sweep:
            raise ValueError("a budget for a ViT picks from its sweep: run `matformer vision "
                             "mixnmatch` first and pass --sweep (the folder it wrote)")
        if args.sweep:
            sweep = load_sweep(args.sweep)
            made_on = sweep.get("config")  # as JSON stores it: lists, not tuples
            if made_on is not None and made_on != json.loads(json.dumps(model.config.to_dict())):
                raise ValueError(f"--sweep {args.sweep} was made on another model (config "
                                 f"{made_on}), not on {args.checkpoint}; its costs would not "
                                 "be this model's")
            given = {k: v for k, v in budgets.items() if v is not None}
            chosen = select(sweep["candidates"], VIT_OBJECTIVE if vision else LM_OBJECTIVE,
                            **given)
        else:
            batches, info = checkpoint_batches(args, model, tokenizer)
            chosen = choose(model, batches, mm.candidates(model.config), budgets,
                            seq_len=info["seq_len"], **_sweep_kw(args))
        sub = model.config.submodel(tuple(chosen["widths"]), heads=chosen.get("heads"))
        return sub, chosen
    sub = chosen_submodel(args, model)
    if sub is None:
        raise ValueError("choose a submodel: --granularity, --widths or a budget "
                         "(--max-params / --max-flops / --max-latency-ms)")
    return sub, None


def extract(args: argparse.Namespace) -> Result:
    from .. import checkpoint as ckpt
    from ..submodels.extract import save_extracted

    _check_out(args, args.checkpoint)
    model, tokenizer = load_checkpoint(args.checkpoint)
    picked, chosen = picked_submodel(args, model, tokenizer)
    path = save_extracted(args.out, model, tokenizer, picked, source=args.checkpoint,
                          name=args.name, overwrite=args.force)
    sub = load_checkpoint(path)[0]
    size = (path / ckpt.WEIGHTS).stat().st_size
    full = (ckpt.resolve(args.checkpoint) / ckpt.WEIGHTS).stat().st_size
    res = {"out": str(path), "name": sub.config.names[0], "widths": list(sub.config.ffn_dims),
           "params": sub.num_params(), "weights_bytes": size, "source_weights_bytes": full,
           "selected": chosen}
    lines = [_describe_row(chosen, "best under the budget: ")] if chosen is not None else []
    lines.append(f"extracted {res['name']} (FFN widths {','.join(map(str, res['widths']))}, "
                 f"{res['params'] / 1e6:.3f}M params) to {path}; weights {size / 1e6:.2f} MB "
                 f"vs {full / 1e6:.2f} MB for the source")
    heads = _heads_note(model, picked)
    if heads is not None:
        res["heads"], note = heads
        lines.append("note: " + note)
    return res, "\n".join(lines)


def export_hf(args: argparse.Namespace) -> Result:
    from .. import checkpoint as ckpt
    from ..submodels.hf import export_hf

    _check_out(args, args.checkpoint)
    model, tokenizer = load_checkpoint(args.checkpoint)
    sub = chosen_submodel(args, model)
    info = export_hf(model, tokenizer, args.out, widths=sub, pad=not args.no_pad,
                     overwrite=args.force, sources=ckpt.inputs(args.checkpoint))
    heads = None if sub is None else _heads_note(model, sub)
    if heads is not None:
        info["heads"], note = heads
        info["note"] += "; " + note
    if args.check:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(args.out)).eval()
        x = torch.randint(0, model.config.vocab_size,
                          (2, min(32, model.config.max_seq_len)),
                          generator=torch.Generator().manual_seed(0))
        with torch.no_grad():  # against the submodel eval measures (its heads included)
            diff = (hf(x).logits - model(x, widths=sub)).abs().max().item()
        info["check_max_abs_logit_diff"] = diff
    lines = [f"exported {info['architecture']} ({info['params'] / 1e6:.3f}M params) to "
             f"{info['out']}: {info['note']}"]
    if info["padded"]:
        lines.append(f"note: the folder holds {info['exported_params'] / 1e6:.3f}M parameters, "
                     "zero padding included; load it with AutoModelForCausalLM.from_pretrained")
    if "check_max_abs_logit_diff" in info:
        lines.append(f"check: transformers logits vs ours, max abs diff "
                     f"{info['check_max_abs_logit_diff']:.2e}")
    return info, "\n".join(lines)


def import_hf(args: argparse.Namespace) -> Result:
    from .. import checkpoint as ckpt
    from ..corpora import absolute_spec
    from ..outputs import check_output
    from ..submodels.hf import import_model

    check_output(args.out, overwrite=args.force, sources=[args.folder])
    model, tokenizer = import_model(args.folder)
    meta: dict[str, Any] = {"origin": {"source": str(args.folder.resolve())}}
    if args.data:
        meta["data"] = absolute_spec(args.data)
    path = ckpt.save_checkpoint(args.out, model, tokenizer, metadata=meta, overwrite=args.force,
                                sources=[args.folder])
    res = {"out": str(path), "params": model.num_params(),
           "widths": list(model.config.ffn_dims), "vocab_size": tokenizer.vocab_size,
           "chat_template": tokenizer.chat_template is not None,
           "eos_token": tokenizer.eos_token}
    return res, (f"imported {args.folder} ({res['params'] / 1e6:.3f}M params, FFN widths "
                 f"{','.join(map(str, sorted(set(res['widths']))))}, {res['vocab_size']:,} "
                 f"tokens{', a chat template' if res['chat_template'] else ''}) to {path}")
