"""Pick a Gemma 3n slice for your data and device: evaluate candidate slices *in place*.

A candidate is one width per original layer, 0 for a skipped layer (``SlicePlan.layer_widths``).
:func:`in_place` runs a loaded transformers Gemma 3n model as that slice without writing it:
each kept layer's FFN weights are swapped for prefix *views* of themselves (``gate``/``up``
rows, ``down`` columns: no copy) and each skipped decoder layer for an identity, restored on
exit. The result equals the model :func:`matformer.submodels.gemma3n.slice_hf` writes.

:func:`gemma3n_sweep` scores every candidate (held-out loss on the user's text, parameters,
measured prefill latency) through the shared :func:`matformer.submodels.sweep.sweep`, so the
Pareto fronts, budget selection (:func:`~matformer.submodels.sweep.select`) and report
(:func:`~matformer.submodels.report.write_report`) are the ones every other sweep uses.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .candidates import Candidate, candidates
from .gemma3n import SlicePlan, plan_slice
from .latency import measure, spread
from .sweep import LM_OBJECTIVE, Row, sweep

log = logging.getLogger(__name__)


def text_model(model: nn.Module) -> nn.Module:
    """The Gemma 3n language model inside ``model`` (causal LM or multimodal)."""
    for m in model.modules():
        if hasattr(m, "embed_tokens_per_layer") and hasattr(m, "layers"):
            return m
    raise ValueError(f"{type(model).__name__} holds no Gemma 3n language model")


class _Skipped(nn.Module):
    """A decoder layer left out: its input (the AltUp stack) passes through unchanged."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states


@contextlib.contextmanager
def in_place(model: nn.Module, layer_widths: Sequence[int]) -> Iterator[nn.Module]:
    """Run ``model`` as the slice ``layer_widths`` (one per layer; 0 skips it) inside the block.

    Weights are narrowed to views, never copied; everything is restored on exit, also on error.
    """
    tm = text_model(model)
    layers = tm.layers
    if len(layer_widths) != len(layers):
        raise ValueError(f"{len(layer_widths)} widths for {len(layers)} layers")
    saved: list[tuple[int, nn.Module | None, dict[str, nn.Parameter]]] = []
    try:
        for i, w in enumerate(layer_widths):
            layer = layers[i]
            if w == 0:
                saved.append((i, layer, {}))
                layers[i] = _Skipped()
                continue
            mlp = layer.mlp
            full = mlp.gate_proj.weight.shape[0]
            if not 1 <= w <= full:
                raise ValueError(f"width {w} at layer {i} is outside 1..{full}")
            if w == full:
                continue
            old = {n: getattr(mlp, n).weight for n in ("gate_proj", "up_proj", "down_proj")}
            saved.append((i, None, old))
            mlp.gate_proj.weight = nn.Parameter(old["gate_proj"].detach()[:w], requires_grad=False)
            mlp.up_proj.weight = nn.Parameter(old["up_proj"].detach()[:w], requires_grad=False)
            mlp.down_proj.weight = nn.Parameter(old["down_proj"].detach()[:, :w], requires_grad=False)
        yield model
    finally:
        for i, layer, old in reversed(saved):
            if layer is not None:
                layers[i] = layer
            for n, p in old.items():
                getattr(layers[i].mlp, n).weight = p


# ----------------------------------------------------------------------------- the space
@dataclass(frozen=True)
class SliceSpace:
    """Candidate slices of one Gemma 3n model, shaped like a nested config for the shared
    candidate generator: granularity ``g`` keeps ``ratios[g]`` of every layer's FFN.

    ``layer_params`` (per layer, FFN excluded), ``ffn_unit`` (parameters per FFN unit),
    ``per_layer_embed`` (per-layer-embedding parameters of one layer) and ``shared`` (the rest,
    ``embedding`` of it being the token embeddings) price a slice without building it.
    """

    full: tuple[int, ...]
    ratios: tuple[float, ...]
    names: tuple[str, ...]
    layer_params: tuple[int, ...]
    ffn_unit: int
    per_layer_embed: int
    per_layer_projection: int
    shared: int
    embedding: int
    hidden: int
    vocab: int
    n_head: int = 1

    @property
    def n_layer(self) -> int:
        return len(self.full)

    @property
    def attention_heads(self) -> tuple[int, ...]:
        """Every layer keeps all its query heads (a slice narrows FFNs and drops layers)."""
        return (self.n_head,) * self.n_layer

    def head_counts(self, g: int | str) -> None:
        """Heads are not nested in a Gemma 3n slice."""
        return None

    def candidate(self, name: str, widths: Sequence[int]) -> Candidate:
        """An explicit candidate: ``widths`` per layer, 0 drops the layer (its heads too)."""
        w = tuple(int(v) for v in widths)
        return Candidate(w, tuple(self.n_head if v else 0 for v in w), name, "explicit")

    @property
    def num_granularities(self) -> int:
        return len(self.ratios)

    @property
    def ffn_dims(self) -> tuple[int, ...]:
        return self.full

    def ffn_widths(self, g: int | str) -> tuple[int, ...]:
        r = self.ratios[self.names.index(g) if isinstance(g, str) else g]
        return tuple(max(1, round(r * d)) for d in self.full)

    def num_params(self, widths: Sequence[int], *, embedding: bool = True) -> int:
        """Parameters of the text model sliced to ``widths`` (0 = skipped layer); without
        ``embedding``: no token or per-layer embedding tables (Gemma 3n's "effective" count
        also leaves the per-layer embeddings out, as they can live off the accelerator)."""
        kept = [i for i, w in enumerate(widths) if w]
        body = sum(self.layer_params[i] + self.ffn_unit * widths[i] for i in kept)
        body += len(kept) * self.per_layer_projection + self.shared - self.embedding
        return body + (self.embedding + len(kept) * self.per_layer_embed if embedding else 0)

    @classmethod
    def of(cls, model: nn.Module, ratios: Sequence[float], names: Sequence[str] | None = None
           ) -> SliceSpace:
        tm = text_model(model)
        cfg = tm.config
        full, rest = [], []
        for layer in tm.layers:
            ffn = sum(p.numel() for p in layer.mlp.parameters())
            full.append(layer.mlp.gate_proj.weight.shape[0])
            rest.append(sum(p.numel() for p in layer.parameters()) - ffn)
        n, h = len(full), cfg.hidden_size
        pl_embed = tm.embed_tokens_per_layer.weight.numel() // n
        pl_proj = tm.per_layer_model_projection.weight.numel() // n
        in_layers = sum(rest) + sum(3 * h * w for w in full)
        total = sum(p.numel() for p in tm.parameters())
        shared = total - in_layers - n * (pl_embed + pl_proj)
        return cls(tuple(full), tuple(float(r) for r in ratios),
                   tuple(names or (f"{r:g}x" for r in ratios)), tuple(rest), 3 * h, pl_embed,
                   pl_proj, shared, tm.embed_tokens.weight.numel(), h, cfg.vocab_size,
                   cfg.num_attention_heads)


def slice_candidates(space: SliceSpace, *, mixed: bool = True,
                     explicit: Sequence[tuple[str, Sequence[int]]] = (),
                     skip_sets: Sequence[Sequence[int]] = ()) -> list[Candidate]:
    """Uniform ratios, (with ``mixed``) the paper's rule over them (non-decreasing with depth,
    least slope), every uniform ratio with each skip set, and ``explicit`` (name, layer widths)
    candidates such as the rows of Google's table."""
    out = candidates(space, ("rule",) if mixed else ())
    for skip in skip_sets:
        outside = sorted(i for i in skip if not 0 <= i < space.n_layer)
        if outside:
            raise ValueError(f"skip set {list(skip)}: layers {outside} do not exist (the model "
                             f"has layers 0..{space.n_layer - 1})")
        for g, name in enumerate(space.names):
            w = tuple(0 if i in skip else v for i, v in enumerate(space.ffn_widths(g)))
            out.append(space.candidate(f"{name} skip {','.join(map(str, skip))}", w))
    out += [space.candidate(name, w) for name, w in explicit]
    return list(dict.fromkeys(out))  # equal widths: the first one stays


# ----------------------------------------------------------------------------- scoring
def text_batches(ids: Sequence[int], seq_len: int, batch_size: int, max_batches: int | None
                 ) -> list[tuple[Tensor, Tensor]]:
    """Consecutive non-overlapping (input, target) windows of a token stream."""
    t = torch.tensor(list(ids), dtype=torch.long)
    n = (len(t) - 1) // seq_len
    if n < 1:
        raise ValueError(f"the text has {len(t)} tokens: fewer than one window of "
                         f"{seq_len + 1}; give more text or a shorter window (seq_len)")
    x = t[: n * seq_len].view(n, seq_len)
    y = t[1: n * seq_len + 1].view(n, seq_len)
    out = [(x[i: i + batch_size], y[i: i + batch_size]) for i in range(0, n, batch_size)]
    return out[:max_batches] if max_batches else out


@torch.no_grad()
def hf_loss(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]]) -> float:
    """Token-weighted mean next-token loss (nats) of a transformers causal LM."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for x, y in batches:
        logits = model(input_ids=x.to(device), use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten())
        total += loss.item() * y.numel()
        count += y.numel()
    return total / count


def gemma3n_sweep(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]],
                  cands: Sequence[Candidate], space: SliceSpace, *, latency: bool = True,
                  prefill_len: int = 128, repeats: int = 5, threads: int | None = None,
                  progress: bool = True) -> list[Row]:
    """Loss, parameters and (optionally) measured prefill latency of every candidate slice,
    evaluated in place; rows as :func:`matformer.submodels.sweep.sweep` makes them."""
    text = text_model(model).config.to_dict()
    for c in cands:  # refuse a candidate that breaks a slicing rule before evaluating any
        plan = SlicePlan.from_layer_widths(c.widths)
        plan_slice(text, plan.widths, plan.skip)
    model.eval()

    def score(m: nn.Module, sub: Any) -> Row:
        with in_place(model, sub.widths):
            loss = hf_loss(model, batches)
        return {"val_loss": loss, "perplexity": math.exp(min(loss, 700.0))}

    def cost(m: nn.Module, sub: Any) -> Row:
        tokens = space.vocab * space.hidden  # the output head (tied to the embedding)
        ne = space.num_params(sub.widths, embedding=False)
        return {"params": space.num_params(sub.widths), "non_embedding_params": ne,
                "flops_per_token": 2 * (ne + tokens)}

    def timer(setups: Sequence[tuple[nn.Module, Any]]) -> list[Row]:
        device = next(model.parameters()).device
        x = torch.randint(0, space.vocab, (1, prefill_len),
                          generator=torch.Generator().manual_seed(0)).to(device)

        def fn(widths: Any) -> Any:
            def run() -> None:
                with in_place(model, widths):
                    model(input_ids=x, use_cache=False)
            return run

        times = measure([fn(sub.widths) for _, sub in setups], repeats=repeats, threads=threads,
                        device=device)
        out = []
        for t in times:
            s = spread(t)
            out.append({"prefill_ms": s["median"], "prefill_ms_q1": s["q1"],
                        "prefill_ms_q3": s["q3"]})
        return out

    return sweep(_Space(space), cands, score, cost, objective=LM_OBJECTIVE,
                 timer=timer if latency else None, progress=progress)


class _Space(nn.Module):
    """What the shared sweep sees as "the model": its ``config`` is the slice space."""

    def __init__(self, space: SliceSpace) -> None:
        super().__init__()
        self.config = space


# ----------------------------------------------------------------------------- folders
def load_gemma3n(src: str | Path, dtype: str = "auto") -> nn.Module:
    """A transformers Gemma 3n model from a local folder: ``Gemma3nForCausalLM`` for a text
    checkpoint, ``Gemma3nForConditionalGeneration`` for the multimodal one (which needs the
    vision tower's ``timm``). ``dtype``: ``auto`` (as stored), ``float32`` or ``bfloat16``."""
    import json

    import transformers

    config = json.loads((Path(src) / "config.json").read_text())
    kind = config.get("model_type")
    cls_name = {"gemma3n_text": "Gemma3nForCausalLM",
                "gemma3n": "Gemma3nForConditionalGeneration"}.get(kind)
    if cls_name is None:
        raise ValueError(f"{src}: model_type={kind!r} is not Gemma 3n (gemma3n or gemma3n_text)")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    from safetensors import SafetensorError

    try:
        model = getattr(transformers, cls_name).from_pretrained(str(src), dtype=torch_dtype)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read the weights of {src}: {e} (a damaged or truncated "
                         "file?)") from e
    return model.eval()


def text_token_batches(src: str | Path, data: str, seq_len: int, batch_size: int,
                       max_batches: int | None) -> tuple[list[tuple[Tensor, Tensor]], int]:
    """Windows of the user's text (a file, directory, glob or embedded corpus name), tokenised
    with the folder's own tokenizer; returns (batches, number of tokens)."""
    from transformers import AutoTokenizer

    from ..corpora import load_corpus

    tok = AutoTokenizer.from_pretrained(str(src))
    ids = tok("\n\n".join(load_corpus(data)), add_special_tokens=False)["input_ids"]
    return text_batches(ids, seq_len, batch_size, max_batches), len(ids)


@torch.no_grad()
def check_slice(src_model: nn.Module, dst: str | Path, layer_widths: Sequence[int],
                tokens: int = 32) -> float:
    """Max abs logit difference between the written slice ``dst`` (loaded by stock
    transformers) and ``src_model`` run in place as the same slice, on random tokens."""
    sliced = load_gemma3n(dst, dtype="float32")
    vocab = text_model(sliced).config.vocab_size
    x = torch.randint(0, vocab, (2, tokens), generator=torch.Generator().manual_seed(0))
    with in_place(src_model, layer_widths):
        ref = src_model(input_ids=x, use_cache=False).logits.float()
    return (sliced(input_ids=x, use_cache=False).logits.float() - ref).abs().max().item()
