"""``matformer export-gguf``: a submodel as one llama.cpp GGUF file, at its real size."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import (
    Result,
    add_command,
    add_eval_data,
    add_latency,
    add_submodel,
    chosen_submodel,
    load_checkpoint,
)
from .submodels import (
    _add_budgets,
    _add_force,
    _budgets,
    _heads_note,
    picked_submodel,
)

EXAMPLES = """\
examples:
  matformer export-gguf runs/demo --granularity S --out demo-S.gguf
  matformer export-gguf runs/demo --widths 256,256,512,512,1024,1024 --out demo-mix.gguf
  matformer export-gguf runs/demo --max-params 4.5e6 --sweep runs/demo/mixnmatch --out fit.gguf
  matformer export-gguf runs/demo-M --out demo-M.gguf --dtype q8_0 --check
  matformer export-gguf runs/demo --granularity XL --skip-attention 4 --out demo-XL-a4.gguf
"""


def add_export_gguf(sub: argparse._SubParsersAction) -> None:
    from ..submodels.gguf import DTYPES

    p = add_command(
        sub, "export-gguf", "write a llama.cpp GGUF file (per-layer widths at their real size)",
        EXAMPLES, description="Export a checkpoint, or one of its submodels, as a GGUF file "
        "that llama.cpp (and front ends built on it, such as llama-cpp-python) runs, with "
        "the tokenizer embedded. "
        "Uniform widths -> llama, per-layer widths -> deci (each layer at its own FFN size, "
        "no padding), uniform relu2 -> arcee; gelu has no llama.cpp architecture and is "
        "refused. Without --granularity/--widths/a budget the model is exported as it is.")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, required=True, help="the .gguf file to write")
    p.add_argument("--dtype", default="f32", choices=DTYPES,
                   help="weight matrices: f32 (exact), f16, bf16 or q8_0 (default: f32)")
    _add_force(p)
    p.add_argument("--name", help="model name stored in the file (default: the submodel's)")
    p.add_argument("--check", action="store_true", help="load the file with llama-cpp-python "
                   "and compare its logits with ours")
    add_submodel(p)
    _add_budgets(p)
    add_eval_data(p, batches=20)
    add_latency(p, prefill=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(out_is_file=True)


#: Text whose tokens the check compares: words, digits, punctuation, spaces, accents, CJK.
CHECK_TEXT = ("To be, or not to be: that is the question.\n  In 2024, 1,234.5 apples cost $6 "
              "(about 7%)!  Caf\u00e9 na\u00efve \u4f60\u597d, it's we'll   done.\n\n")


def _check(path: Path, model: Any, tokenizer: Any, sub: Any) -> dict[str, Any]:
    """llama.cpp against us: max |logit difference| on 32 tokens of a fixed random text, and
    whether both tokenise :data:`CHECK_TEXT` to the same ids."""
    import torch

    from ..submodels.gguf import llama_logits, load_llama

    n = min(32, model.config.max_seq_len)
    ids = torch.randint(0, model.config.vocab_size, (1, n),
                        generator=torch.Generator().manual_seed(0))
    got = llama_logits(path, ids[0].tolist())
    with torch.no_grad():
        ref = model(ids, widths=sub)[0].float().numpy()
    llm = load_llama(path, n_ctx=256)  # the tokenizer is what is used: a small context
    try:
        theirs = llm.tokenize(CHECK_TEXT.encode(), add_bos=False, special=False)
    finally:
        llm.close()
    return {"check_max_abs_logit_diff": float(abs(got - ref).max()),
            "check_same_tokens": theirs == tokenizer.encode(CHECK_TEXT)}


def export_gguf(args: argparse.Namespace) -> Result:
    from .. import checkpoint as ckpt
    from ..outputs import check_output
    from ..submodels.gguf import export_gguf
    from ..submodels.pretokenizers import bounded_pretokens
    from ..tokenizer import MIN_BPE_VOCAB_SIZE

    if args.out.is_dir():
        raise ValueError(f"--out {args.out} is a directory; give the path of the .gguf file "
                         "to write")
    # before any (possibly slow) budget sweep; never over the checkpoint it reads
    check_output(args.out, overwrite=args.force, sources=ckpt.inputs(args.checkpoint))
    model, tokenizer = load_checkpoint(args.checkpoint)
    chosen = sub = None
    if args.widths or args.granularity or any(v is not None for v in _budgets(args).values()):
        sub, chosen = picked_submodel(args, model, tokenizer)
    else:
        sub = chosen_submodel(args, model)  # --skip-attention alone: the full model's widths
    info = export_gguf(model, tokenizer, args.out, widths=sub, dtype=args.dtype,
                       overwrite=args.force, name=args.name)
    notes = []
    heads = None if sub is None else _heads_note(model, sub)
    if heads is not None:
        info["heads"], note = heads
        notes = [note] if note else []
    elif info["skip_attention"]:  # a checkpoint built without some layers' attention
        notes = [f"no attention in layers {info['skip_attention']} (deci attention-free "
                 "layers; untrained depth elasticity)"]
    if tokenizer.vocab_size > MIN_BPE_VOCAB_SIZE and bounded_pretokens(
            json.loads(tokenizer.to_json())):  # our BPE's bounded pre-tokens
        notes.append("llama.cpp's gpt-2 pre-tokenizer does not cut runs at 256 characters as "
                     "ours does: a run of more than 255 characters without a space tokenises "
                     "differently there (docs/llamacpp.md)")
    info["selected"] = chosen
    if args.check:
        info |= _check(args.out, model, tokenizer, sub)
    types = ", ".join(f"{n} {t}" for t, n in info["tensor_types"].items())
    lines = [f"exported {info['architecture']} ({info['params'] / 1e6:.3f}M params, FFN widths "
             f"{','.join(map(str, info['ffn_widths']))}) to {info['out']}: "
             f"{info['bytes'] / 1e6:.2f} MB, tensors {types}"]
    if notes:
        info["note"] = "; ".join(notes)
    lines += [f"note: {n}" for n in notes]
    if "check_max_abs_logit_diff" in info:
        lines.append(f"check: llama.cpp logits vs ours, max abs diff "
                     f"{info['check_max_abs_logit_diff']:.2e}; tokens of a sample text "
                     f"{'the same' if info['check_same_tokens'] else 'DIFFER'} "
                     f"(pre-tokenizer {info['tokenizer_pre']})")
    return info, "\n".join(lines)
