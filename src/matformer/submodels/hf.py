"""Export to and import from Hugging Face ``transformers`` folders (no remote code, offline).

A MatFormer submodel is a Llama-family decoder: RMSNorm pre-norm blocks, rotary embeddings in
the "rotate half" layout, no biases, optional grouped-query attention and tied embeddings. So:

* ``swiglu`` maps exactly to ``LlamaForCausalLM`` (``hidden_act="silu"``, gated MLP);
* ``gelu`` and ``relu2`` map exactly to ``ArceeForCausalLM`` (Llama with a non-gated
  ``up -> act -> down`` MLP).

**Per-layer FFN widths.** Both configs take a single ``intermediate_size``. In the installed
transformers (5.x) the generic ``per_layer_config`` overrides are not honoured by the Llama or
Arcee modeling code (it raises ``AmbiguousGlobalPerLayerAttributeError``), the architectures
that read ``per_layer_config[layer_idx]`` use it for attention only, and
``Gemma3nTextConfig.intermediate_size`` (one int per layer) comes with parts our model lacks
(AltUp, LAuReL, per-layer embeddings, a value norm) that cannot be switched off exactly. The
honest exact route is therefore **zero padding**: every layer gets the widest layer's size and
the extra hidden units have zero gate/up rows and zero down columns. Their contribution is
exactly zero (silu(0)*0 = gelu(0) = relu(0)^2 = 0), so logits are unchanged, but the padded
model runs at the widest layer's cost: it **gains no speed** over that width. The padding is
recorded in ``config.json`` (``matformer_ffn_widths``) so :func:`import_hf` trims it again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer

from ..checkpoint import CheckpointError, materialize
from ..config import ModelConfig, SubmodelSpec
from ..model import MatFormerLM
from ..outputs import atomic_output, write_text_atomic
from ..tokenizer import EOS_TOKEN, Tokenizer

log = logging.getLogger(__name__)

#: activation -> (transformers architecture, model_type, hidden_act)
ARCHITECTURES = {"swiglu": ("LlamaForCausalLM", "llama", "silu"),
                 "gelu": ("ArceeForCausalLM", "arcee", "gelu"),
                 "relu2": ("ArceeForCausalLM", "arcee", "relu2")}
PAD_NOTE = ("per-layer FFN widths are zero-padded to the widest layer ({width}): exact logits, "
            "but the exported model runs at that width's cost (no speed gain)")


class ExportError(ValueError):
    """The model cannot be represented by a stock transformers architecture."""


def _config_class(model_type: str) -> Any:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ExportError("export to Hugging Face needs transformers: "
                          "pip install 'matformer[hf]'") from e
    name = {"llama": "LlamaConfig", "arcee": "ArceeConfig"}[model_type]
    if not hasattr(transformers, name):
        raise ExportError(f"transformers {transformers.__version__} has no {name}; "
                          "upgrade transformers to export this activation")
    return getattr(transformers, name)


def hf_config(cfg: ModelConfig, eos_id: int, *, pad: bool = True) -> tuple[Any, dict[str, Any]]:
    """The transformers config of a dense MatFormer config, plus facts about the mapping."""
    if cfg.activation not in ARCHITECTURES:
        raise ExportError(f"activation {cfg.activation!r} has no exact transformers "
                          f"architecture (supported: {sorted(ARCHITECTURES)})")
    if cfg.num_granularities > 1:
        log.info("exporting the full model of a %d-granularity checkpoint", cfg.num_granularities)
    arch, model_type, act = ARCHITECTURES[cfg.activation]
    dims = cfg.ffn_dims
    padded = len(set(dims)) > 1
    if padded and not pad:
        raise ExportError(f"per-layer FFN widths {list(dims)}: {arch} has one intermediate_size "
                          "per model; allow zero padding (exact, no speed gain; pad=True) "
                          "to export")
    extra = {"matformer_ffn_widths": list(dims)} if padded else {}
    hf = _config_class(model_type)(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=max(dims),
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, hidden_act=act,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=None,
        architectures=[arch], dtype="float32", **extra)
    info = {"architecture": arch, "model_type": model_type, "padded": padded,
            "ffn_widths": list(dims), "intermediate_size": max(dims),
            "note": PAD_NOTE.format(width=max(dims)) if padded else "exact, same shape"}
    return hf, info


def _name_map(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(our name, transformers name) of every stored tensor, used both ways."""
    pairs = [("embed.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
    if not cfg.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight"))
    ffn = ("gate_proj", "up_proj", "down_proj") if cfg.activation == "swiglu" else (
        "up_proj", "down_proj")
    for i in range(cfg.n_layer):
        q, p = f"blocks.{i}.", f"model.layers.{i}."
        pairs += [(q + "attn_norm.weight", p + "input_layernorm.weight"),
                  (q + "ffn_norm.weight", p + "post_attention_layernorm.weight")]
        pairs += [(q + f"attn.{m}.weight", p + f"self_attn.{m}.weight")
                  for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
        pairs += [(q + f"ffn.{m}.weight", p + f"mlp.{m}.weight") for m in ffn]
    return pairs


def _resize_ffn(name: str, t: torch.Tensor, width: int) -> torch.Tensor:
    """An FFN matrix cut or zero-padded to ``width`` hidden units (rows of gate/up, columns of
    down); other tensors unchanged. Zero units contribute exactly nothing."""
    if ".ffn." not in name:
        return t
    dim = 1 if name.endswith("down_proj.weight") else 0
    have = t.shape[dim]
    if have >= width:
        return t.narrow(dim, 0, width)
    pad = (0, width - have, 0, 0) if dim == 1 else (0, 0, 0, width - have)
    return torch.nn.functional.pad(t, pad)


def _hf_state(model: MatFormerLM) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names, every FFN padded to the widest layer."""
    width, state = max(model.config.ffn_dims), model.state_dict()
    return {theirs: _resize_ffn(ours, state[ours], width).detach().to("cpu", torch.float32)
            .contiguous().clone() for ours, theirs in _name_map(model.config)}


def _patch_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_hf_tokenizer(tokenizer: Tokenizer, out: Path, max_len: int | None = None) -> None:
    """Save ``tokenizer`` so ``AutoTokenizer.from_pretrained(out)`` loads it (a fast tokenizer).

    ``tokenizer_class`` is written as ``PreTrainedTokenizerFast``, the name every transformers
    version knows (5.x maps it to its tokenizers backend).
    """
    from transformers import PreTrainedTokenizerFast

    tokenizer.save(out / "tokenizer.json")
    fast = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"),
                                   eos_token=tokenizer.eos_token or EOS_TOKEN)
    if tokenizer.chat_template is not None:  # an imported model's own template
        fast.chat_template = tokenizer.chat_template
    fast.save_pretrained(str(out))
    tokenizer.save(out / "tokenizer.json")  # ours, byte for byte (no added post-processor)
    extra = {"model_max_length": max_len} if max_len else {}
    _patch_json(out / "tokenizer_config.json", tokenizer_class="PreTrainedTokenizerFast",
                **extra)


@torch.no_grad()
def export_hf(model: MatFormerLM, tokenizer: Tokenizer, out: str | Path, *,
              widths: SubmodelSpec = None, pad: bool = True,
              overwrite: bool = False, sources: Iterable[str | Path] = ()) -> dict[str, Any]:
    """Write a transformers folder (config, safetensors weights, tokenizer) for a submodel.

    ``widths`` picks the submodel (a :class:`~matformer.config.Submodel` or a spec), extracted first
    (:func:`~matformer.submodels.extract.extract`); None exports the model as it is (the full
    model of a nested checkpoint). The folder is written atomically: an existing ``out`` is
    refused unless ``overwrite`` (then replaced as a whole: no stale file survives), and it
    may never be one of ``sources``. Returns facts about the export (architecture, padding).
    """
    from transformers import GenerationConfig

    from .extract import extract

    sub = model if widths is None else extract(model, widths)
    if sub.config.skip_attention:
        raise ExportError(f"the submodel skips the attention of layers "
                          f"{list(sub.config.skip_attention)}: transformers' Llama has attention "
                          "in every layer and no exact stand-in for none; use export-gguf (deci "
                          "has attention-free layers) or keep every attention")
    hf_cfg, info = hf_config(sub.config, tokenizer.eos_id, pad=pad)
    out = Path(out)
    with atomic_output(out, overwrite=overwrite, sources=sources) as tmp:
        hf_cfg.save_pretrained(str(tmp))
        # Legacy spellings for transformers 4.x loaders (5.x reads rope_parameters and dtype).
        _patch_json(tmp / "config.json", rope_theta=float(sub.config.rope_theta),
                    torch_dtype="float32")
        save_file(_hf_state(sub), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        stops = sorted(tokenizer.stop_ids)
        GenerationConfig(bos_token_id=tokenizer.eos_id,
                         eos_token_id=stops[0] if len(stops) == 1 else stops,
                         pad_token_id=tokenizer.eos_id).save_pretrained(str(tmp))
        save_hf_tokenizer(tokenizer, tmp, sub.config.max_seq_len)
    info |= {"out": str(out), "params": sub.num_params(),
             "exported_params": sub.config.replace(d_ff=max(sub.config.ffn_dims)).num_params()}
    log.info("exported %s to %s (%s)", info["architecture"], out, info["note"])
    return info


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ExportError(f"{index} is not a valid safetensors index: {e!r}") from e
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder} has no model.safetensors (or its index)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state |= load_file(str(folder / f))
        except (SafetensorError, OSError, RuntimeError, TypeError) as e:
            raise ExportError(f"cannot read weights {folder / f}: {e}") from e
    return state


def _read_hf_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a transformers folder, checked for the keys a Llama/Arcee one has."""
    try:
        c = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder}: cannot read config.json ({e})") from e
    if not isinstance(c, dict):
        raise ExportError(f"{folder}/config.json is not a JSON object")
    need = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
            "max_position_embeddings", "rms_norm_eps")
    lacking = [k for k in need if k not in c] + (
        [] if "intermediate_size" in c or "matformer_ffn_widths" in c else ["intermediate_size"])
    if lacking:
        raise ExportError(f"{folder}/config.json lacks {lacking}: not a complete Llama/Arcee "
                          "config")
    return c


def _config_from_hf(c: dict[str, Any], folder: Path, name: str) -> ModelConfig:
    """Our dense config (granularity ``name``) for a Llama/Arcee ``config.json``; raises
    ExportError for what a MatFormer cannot represent (biases, RoPE scaling, odd head_dim)."""
    act = {v[1:]: k for k, v in ARCHITECTURES.items()}.get((c.get("model_type"),
                                                           c.get("hidden_act")))
    if act is None:
        raise ExportError(f"{folder}: model_type={c.get('model_type')!r} with hidden_act="
                          f"{c.get('hidden_act')!r} is not a Llama/Arcee model we can import")
    rope = c.get("rope_parameters") or {"rope_type": "default",
                                        "rope_theta": c.get("rope_theta", 10000.0)}
    problems = [k for k in ("attention_bias", "mlp_bias") if c.get(k)]
    if rope.get("rope_type", "default") != "default" or c.get("rope_scaling"):
        problems.append(f"rope_type={rope.get('rope_type')}")
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    if head_dim * c["num_attention_heads"] != c["hidden_size"]:
        problems.append(f"head_dim={head_dim} with {c['num_attention_heads']} heads != "
                        f"hidden_size={c['hidden_size']}")
    if problems:
        raise ExportError(f"{folder}: cannot represent {problems} in a MatFormer config")
    n = c["num_hidden_layers"]
    dims = tuple(c.get("matformer_ffn_widths") or [c["intermediate_size"]] * n)
    return ModelConfig(
        vocab_size=c["vocab_size"], n_layer=n, n_head=c["num_attention_heads"],
        n_kv_head=c.get("num_key_value_heads"), d_model=c["hidden_size"],
        d_ff=dims[0] if len(set(dims)) == 1 else dims, ratios=(1.0,), names=(name,),
        activation=act, max_seq_len=c["max_position_embeddings"],
        rope_theta=float(rope["rope_theta"]), norm_eps=c["rms_norm_eps"],
        tie_embeddings=bool(c.get("tie_word_embeddings", False)))


def _load_hf_model(folder: Path, cfg: ModelConfig,
                   hf: dict[str, torch.Tensor] | None = None) -> MatFormerLM:
    """Our model with the folder's weights (or ``hf``, under transformers' names) renamed,
    padding trimmed to ``cfg``'s widths."""
    hf = _read_weights(folder) if hf is None else hf
    missing = sorted(theirs for _, theirs in _name_map(cfg) if theirs not in hf)
    if missing:
        raise ExportError(f"{folder}: the weights lack {len(missing)} tensor(s) the config "
                          f"needs, e.g. {missing[:3]}")
    state = {ours: _resize_ffn(ours, hf[theirs], cfg.ffn_dims[int(ours.split(".")[1])]
                               if ours.startswith("blocks.") else 0).float().contiguous().clone()
             for ours, theirs in _name_map(cfg)}
    try:
        return materialize(MatFormerLM, cfg, state)
    except CheckpointError as e:
        raise ExportError(f"{folder}: {e}") from e


def import_hf(folder: str | Path, *, name: str = "hf") -> tuple[MatFormerLM, Tokenizer]:
    """Load a Llama/Arcee transformers folder (such as one :func:`export_hf` wrote) as ours.

    Zero padding recorded in ``matformer_ffn_widths`` is trimmed, so an exported per-layer
    model comes back with its per-layer widths.
    """
    folder = Path(folder)
    cfg = _config_from_hf(_read_hf_config(folder), folder, name)
    model = _load_hf_model(folder, cfg)
    tok_file = folder / "tokenizer.json"
    if not tok_file.exists():
        raise FileNotFoundError(f"{folder} has no tokenizer.json (a fast tokenizer is needed)")
    return model, Tokenizer.load(tok_file)


def import_gguf(path: str | Path, *, name: str = "gguf") -> tuple[MatFormerLM, Tokenizer]:
    """Load a Llama-architecture GGUF file (llama.cpp's format; Ollama and LM Studio keep
    models so) as ours: transformers reads it and dequantises every tensor to fp32, the
    tokenizer keeps its vocabulary, merges, chat template and end-of-turn token, and its
    pre-tokenizer is the one llama.cpp uses for the file's ``tokenizer.ggml.pre``
    (:mod:`matformer.submodels.pretokenizers`).
    """
    from .pretokenizers import hf_pretokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    meta = read_gguf_metadata(path)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ExportError(f"{path}: GGUF architecture {arch!r}; only 'llama' files import (a "
                          "per-layer 'deci' file that we exported: import its checkpoint)")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ExportError("importing GGUF needs transformers and gguf: "
                          "pip install 'matformer[hf,gguf]'") from e
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its per-tensor bars; the command says what it does
    folder, file = str(path.parent), path.name
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ExportError(f"transformers cannot read {path}: {e}") from e
    config = {k: v for k, v in hf.config.to_dict().items() if k != "quantization_config"}
    cfg = _config_from_hf(config, path, name)
    model = _load_hf_model(path, cfg, dict(hf.state_dict()))
    del hf
    backend = HFTokenizer.from_str(tok.backend_tokenizer.to_str())
    pre = meta.get("tokenizer.ggml.pre")
    if pre is not None:
        backend.pre_tokenizer = hf_pretokenizer(pre, where=str(path))
    eos = tok.eos_token if isinstance(tok.eos_token, str) else None
    tokenizer = Tokenizer(backend, chat_template=tok.chat_template or None, eos_token=eos)
    return model, tokenizer


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The scalar and string key-value fields of a GGUF file (no arrays, no tensors)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise ExportError(f"{path} is not a readable GGUF file: {e}") from e
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if len(field.types) == 1:  # a scalar or a string (arrays have two types)
            out[key] = field.contents()
    return out


def import_model(path: str | Path, *, name: str | None = None) -> tuple[MatFormerLM, Tokenizer]:
    """A pretrained model from a transformers folder (:func:`import_hf`) or a ``.gguf`` file
    (:func:`import_gguf`)."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return import_gguf(path, name=name or path.stem)
    return import_hf(path, name=name or path.name)
