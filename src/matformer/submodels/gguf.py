"""Export any submodel to llama.cpp's GGUF format, at its real size.

A Mix'n'Match submodel (arXiv 2310.07707, sec. 3.3) is a dense decoder with one FFN width per
layer. ``export-hf`` has to zero-pad such a model to its widest layer; llama.cpp can run it as
it is:

* uniform widths + ``swiglu`` -> llama.cpp's ``llama`` architecture;
* per-layer widths + ``swiglu`` -> ``deci`` (DeciLM / Nemotron-NAS): the same math as Llama
  (RMSNorm, SwiGLU, the same RoPE type), but it builds every layer at its own FFN size
  (``n_ff(il)``). The ``llama`` architecture reads a per-layer size list yet builds every layer
  at layer 0's size, so it cannot load such a file;
* uniform widths + ``relu2`` -> ``arcee`` (Llama with a non-gated squared-ReLU FFN);
* ``gelu``, and ``relu2`` with per-layer widths, have no exact llama.cpp architecture: refused.

**Skipped FFNs** (width 0, depth elasticity) go out as ``deci`` layers with one all-zero hidden
unit, which adds exactly 0. deci's own "FFN size 0" cannot be used: its graph then skips the
whole layer, attention output included (checked against llama.cpp as bundled in
llama-cpp-python 0.3.36: logits off by 5; on the last layer it aborts).

**Skipped attention** (0 heads) goes out as a ``deci`` attention-free layer, the way
llama.cpp's converter writes Nemotron-51B's: per-layer head counts with ``head_count`` and
``head_count_kv`` both 0 there, and no attention tensors; deci then feeds the layer's input
straight to its FFN, as our block does. Layer 0 must keep its attention: llama.cpp derives the
head size of every layer from layer 0's head count (0 there makes it 0 and the file fails to
load), so such a submodel is refused.

Two conversions make llama.cpp compute what we compute:

* **RoPE layout.** Our attention rotates dimension ``i`` with ``i + head_dim/2`` ("rotate
  half"); llama.cpp's ``llama``/``deci``/``arcee`` rotate consecutive pairs ``(2i, 2i + 1)``.
  Permuting the rows of q and k inside every head (``[0, hd/2, 1, hd/2 + 1, ...]``) turns one
  into the other exactly; attention scores are unchanged because q and k move together.
* **Tokenizer.** A byte-level BPE (byte-to-unicode map, no normaliser) is llama.cpp's ``gpt2``
  tokenizer; its pre-tokenizer is written as the llama.cpp type that cuts text alike (``gpt-2``
  for ours, ``smollm`` for an imported SmolLM2; :mod:`.pretokenizers`), and one with no such
  type is refused by name. The file carries the tokens, merges and token types, an imported
  model's chat template, and as EOS the model's own end token (an instruct model's end of turn)
  or ``<|endoftext|>``; BOS is ``<|endoftext|>``, never added.

The file is written with the ``gguf`` package (``pip install gguf``) to a temporary file beside
the destination and renamed, so a crash never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..config import ModelConfig, SubmodelSpec
from ..model import MatFormerLM
from ..outputs import atomic_file, check_output
from ..tokenizer import EOS_TOKEN, Tokenizer
from .pretokenizers import PreTokenizerError, llamacpp_pre

if TYPE_CHECKING:
    import gguf as gguf_lib

log = logging.getLogger(__name__)

#: Storage types of the 2-D weight matrices (norm weights always stay f32).
DTYPES = ("f32", "f16", "bf16", "q8_0")


class GGUFExportError(ValueError):
    """The submodel cannot be written as a GGUF file llama.cpp runs exactly (or may not be)."""


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise GGUFExportError("GGUF export needs the gguf package: "
                              "pip install 'matformer[gguf]' (or pip install gguf)") from e
    return gguf


# ----------------------------------------------------------------------------- mapping
def architecture(cfg: ModelConfig) -> str:
    """The llama.cpp architecture that runs this dense config exactly; raises if none does."""
    widths = cfg.ffn_dims
    uniform = len(set(widths)) == 1 and not cfg.skip_attention
    if cfg.activation == "swiglu":
        return "llama" if uniform else "deci"
    if cfg.activation == "relu2":
        if uniform:
            return "arcee"
        if cfg.skip_attention:
            raise GGUFExportError(
                f"skipped attention at layers {list(cfg.skip_attention)} with relu2: only "
                "deci (SwiGLU) has attention-free layers in llama.cpp; keep every attention")
        raise GGUFExportError(
            f"per-layer FFN widths {list(widths)} with relu2: llama.cpp's only relu2 "
            "architecture with our layout (arcee) builds every layer at one FFN size, and deci "
            "(per-layer sizes) is SwiGLU only; export a uniform width (a granularity) instead, "
            "or use export-hf (zero-padded)")
    raise GGUFExportError(
        f"activation {cfg.activation!r}: llama.cpp has no architecture with RMSNorm, RoPE and a "
        "non-gated GELU FFN without biases, so the model cannot run there exactly; only "
        "swiglu (llama/deci) and uniform-width relu2 (arcee) models export to GGUF")


def rope_permute(weight: Tensor, n_heads: int) -> Tensor:
    """Reorder q/k projection rows from the rotate-half layout to llama.cpp's pair layout.

    Row ``s * hd/2 + j`` of every head (half ``s``, frequency ``j``) moves to row ``2j + s``, so
    the pair llama.cpp rotates together, ``(2j, 2j + 1)``, is the pair we rotate together,
    ``(j, j + hd/2)``, at the same frequency.
    """
    out_dim = weight.shape[0]
    hd = out_dim // n_heads
    return (weight.reshape(n_heads, 2, hd // 2, *weight.shape[1:]).transpose(1, 2)
            .reshape(weight.shape))


def _vocab(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens (by id), GGUF token types and merges of our byte-level BPE.

    A model with more embedding rows than tokenizer ids gets unused filler tokens.
    """
    gguf = _gguf()
    spec = json.loads(tokenizer.to_json())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise GGUFExportError(f"tokenizer model {model.get('type')!r}: only byte-level BPE "
                              "tokenizers map to llama.cpp's gpt2 tokenizer")
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    special = set()
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        if added.get("special"):
            special.add(added["id"])
    if max(by_id) >= vocab_size:
        raise GGUFExportError(f"tokenizer has ids up to {max(by_id)} but the model only "
                              f"{vocab_size} embedding rows")
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            control = i in special
            types.append(gguf.TokenType.CONTROL if control else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        # llama.cpp requires the merges key and gguf cannot write an empty array. A merge of
        # two multi-character symbols never fires (the BPE starts from single characters and no
        # merge builds them), so this leaves the plain byte-level tokenizer unchanged.
        merges = [f"{EOS_TOKEN} {EOS_TOKEN}"]
    return tokens, [int(t) for t in types], merges


def _pre(tokenizer: Tokenizer) -> str:
    """llama.cpp's pre-tokenizer type for ``tokenizer`` (GGUFExportError when it has none)."""
    try:
        return llamacpp_pre(json.loads(tokenizer.to_json()))
    except PreTokenizerError as e:
        raise GGUFExportError(str(e)) from e


def _tensors(model: MatFormerLM) -> dict[str, Tensor]:
    """GGUF tensor name -> weight (fp32, CPU), q/k rows permuted for llama.cpp's RoPE."""
    cfg = model.config
    out = {"token_embd.weight": model.embed.weight, "output_norm.weight": model.norm.weight}
    if not cfg.tie_embeddings:
        out["output.weight"] = model.lm_head.weight
    for i, b in enumerate(model.blocks):
        p = f"blk.{i}."
        if b.attn is not None:  # a skipped attention has no tensors (deci: 0 heads)
            out[p + "attn_norm.weight"] = b.attn_norm.weight
            out[p + "attn_q.weight"] = rope_permute(b.attn.q_proj.weight, cfg.n_head)
            out[p + "attn_k.weight"] = rope_permute(b.attn.k_proj.weight, cfg.kv_heads)
            out[p + "attn_v.weight"] = b.attn.v_proj.weight
            out[p + "attn_output.weight"] = b.attn.o_proj.weight
        out[p + "ffn_norm.weight"] = b.ffn_norm.weight
        if b.ffn.d_ff == 0:  # a skipped FFN: one hidden unit with zero weights adds exactly 0
            zero = torch.zeros(1, cfg.d_model)
            out |= {p + "ffn_gate.weight": zero, p + "ffn_up.weight": zero,
                    p + "ffn_down.weight": zero.T}
            continue
        if b.ffn.gate_proj is not None:
            out[p + "ffn_gate.weight"] = b.ffn.gate_proj.weight
        out[p + "ffn_up.weight"] = b.ffn.up_proj.weight
        out[p + "ffn_down.weight"] = b.ffn.down_proj.weight
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def _add_tensor(writer: gguf_lib.GGUFWriter, name: str, t: Tensor, dtype: str) -> str:
    """Write one tensor in ``dtype`` (1-D tensors stay f32); returns the type used."""
    gguf = _gguf()
    data = t.numpy()
    if t.ndim == 1 or dtype == "f32":
        writer.add_tensor(name, data)
        return "f32"
    if dtype == "f16":
        writer.add_tensor(name, data.astype(np.float16))
        return "f16"
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    try:
        packed = gguf.quants.quantize(data, qtype)
    except gguf.QuantError:  # q8_0 needs rows that are a multiple of its 32-value block
        log.info("%s: rows of %d values do not fit %s blocks; stored as f16", name,
                 data.shape[-1], dtype)
        writer.add_tensor(name, data.astype(np.float16))
        return "f16"
    writer.add_tensor(name, packed, raw_dtype=qtype)
    return dtype


_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def _add_hparams(writer: gguf_lib.GGUFWriter, cfg: ModelConfig, arch: str, dtype: str,
                 name: str) -> None:
    """The model's shape, RoPE and norm settings and storage type, as ``arch`` reads them."""
    gguf = _gguf()
    sizes = [w or 1 for w in cfg.ffn_dims]  # skipped FFNs are one zero unit (see _tensors)
    writer.add_name(name)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(sizes if arch == "deci" else sizes[0])
    if cfg.skip_attention:  # per layer: 0 heads (and 0 kv heads) = attention-free
        writer.add_head_count(list(cfg.attention_heads))
        writer.add_head_count_kv([cfg.kv_heads if h else 0 for h in cfg.attention_heads])
    else:
        writer.add_head_count(cfg.n_head)
        writer.add_head_count_kv(cfg.kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPES[dtype])))


def _add_tokenizer(writer: gguf_lib.GGUFWriter, vocab: tuple[list[str], list[int], list[str]],
                   tokenizer: Tokenizer, pre: str) -> None:
    """llama.cpp's ``gpt2`` tokenizer from :func:`_vocab`'s output with the pre-tokenizer type
    ``pre``; EOS is the model's end token, BOS ``<|endoftext|>`` (never added); the chat
    template when the tokenizer has one."""
    tokens, types, merges = vocab
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    end = tokenizer.eos_token
    writer.add_bos_token_id(tokenizer.eos_id)
    writer.add_eos_token_id(tokenizer.eos_id if end is None else tokens.index(end))
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if tokenizer.chat_template is not None:
        writer.add_chat_template(tokenizer.chat_template)


def _write_gguf(path: Path, sub: MatFormerLM, arch: str, dtype: str, name: str,
                vocab: tuple[list[str], list[int], list[str]], tokenizer: Tokenizer,
                pre: str) -> dict[str, int]:
    """Write the whole GGUF file of the dense model ``sub``; returns tensors per stored type."""
    writer = _gguf().GGUFWriter(str(path), arch)
    _add_hparams(writer, sub.config, arch, dtype, name)
    _add_tokenizer(writer, vocab, tokenizer, pre)
    stored: dict[str, int] = {}
    for key, t in _tensors(sub).items():
        kind = _add_tensor(writer, key, t, dtype)
        stored[kind] = stored.get(kind, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


# ----------------------------------------------------------------------------- export
@torch.no_grad()
def export_gguf(model: MatFormerLM, tokenizer: Tokenizer, out: str | Path, *,
                widths: SubmodelSpec = None, dtype: str = "f32", overwrite: bool = False, name: str | None = None
                ) -> dict[str, Any]:
    """Write the submodel ``widths`` of ``model`` as one GGUF file llama.cpp runs as it is.

    Args:
        model: A (nested or dense) language model.
        tokenizer: Its tokenizer; embedded in the file.
        out: Destination ``.gguf`` file.
        widths: The submodel (extracted first); None exports the model as it is (the full model
            of a nested checkpoint). Fewer heads (nested heads) are exported as
            :func:`~matformer.submodels.extract.extract` ships them: every head kept, those past
            the count zeroed (the same function, at the full attention cost); 0 heads (a
            skipped attention) as an attention-free layer.
        dtype: Storage of the weight matrices: f32 (exact), f16, bf16 or q8_0 (matrices whose
            rows are not a multiple of 32 values fall back to f16).
        overwrite: Replace an existing file (CLI: ``--force``).
        name: ``general.name`` in the file (default: the submodel's granularity name; the
            largest one's when a nested model is exported as it is).

    Returns:
        Facts about the export: architecture, widths, parameter count, tensor types, bytes.

    Raises:
        GGUFExportError: Unsupported activation/width combination or unknown dtype.
        OutputExistsError: An existing file without ``overwrite``.
    """
    from .extract import extract, heads_record

    if dtype not in DTYPES:
        raise GGUFExportError(f"dtype {dtype!r}: choose one of {DTYPES}")
    out = check_output(out, overwrite=overwrite)
    chosen = model.config.submodel(widths)
    if chosen.heads[0] == 0:
        raise GGUFExportError("heads: layer 0 skips its attention, which llama.cpp cannot load "
                              "(it takes every layer's head size from layer 0's head count); "
                              "skip attention in layers 1.. only")
    sub = model if widths is None else extract(model, chosen)
    cfg = sub.config
    arch = architecture(cfg)
    vocab, pre = _vocab(tokenizer, cfg.vocab_size), _pre(tokenizer)
    with atomic_file(out) as tmp:
        stored = _write_gguf(tmp, sub, arch, dtype, name or cfg.names[-1], vocab, tokenizer,
                             pre)
    dims = list(cfg.ffn_dims)
    info = {"out": str(out), "architecture": arch, "ffn_widths": dims, "dtype": dtype,
            "skip_attention": list(cfg.skip_attention),
            "heads": heads_record(model, chosen),
            "tensor_types": stored, "params": sub.num_params(),
            "bytes": out.stat().st_size, "vocab_size": cfg.vocab_size,
            "tokenizer_pre": pre, "chat_template": tokenizer.chat_template is not None}
    log.info("exported %s (%s, FFN widths %s) to %s", arch, dtype, dims, out)
    return info


# ----------------------------------------------------------------------------- llama.cpp side
def load_llama(path: str | Path, *, n_ctx: int = 0, threads: int = 1, logits_all: bool = False
               ) -> Any:
    """Open a GGUF file with llama-cpp-python, fp32 KV cache (exact), quiet.

    ``n_ctx=0`` uses the context length stored in the file.
    """
    try:
        from llama_cpp import Llama
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise GGUFExportError("running GGUF files needs llama-cpp-python: "
                              "pip install llama-cpp-python") from e
    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                 logits_all=logits_all, verbose=False, type_k=0, type_v=0, flash_attn=False)


def llama_logits(path: str | Path, ids: Sequence[int], *, threads: int = 1) -> np.ndarray:
    """Logits (T, vocab) llama.cpp computes for one sequence of token ids."""
    # a context for these ids only (rounded up as llama.cpp does), not the file's whole one
    llm = load_llama(path, n_ctx=-(-len(ids) // 256) * 256, threads=threads, logits_all=True)
    try:
        llm.eval(list(ids))
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
