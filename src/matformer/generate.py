"""Text generation from any submodel: KV-cached prefill/decode, batching, sampling, streaming.

* :func:`sample_next` / :func:`logits_to_probs` -- temperature, top-k and top-p, seeded by an
  explicit ``torch.Generator``; ``temperature=0`` is greedy.
* :func:`generate_stream` -- the fast decoder: one prefill forward over the (left-padded) prompts
  fills a :class:`~matformer.cache.KVCache`, then every step feeds one token per row, through
  the lean per-submodel forward of :mod:`matformer.runner` (eager, or ``torch.compile``-d with
  ``compile=True``; the default compiles on CUDA only) unless the batch is left-padded. Yields
  each step's tokens as they come.
* :func:`generate` -- collects the stream; falls back to the simple uncached reference decoder
  (re-runs the model over the whole, cropped, context every step) when asked to or when the
  prompt plus the new tokens do not fit the context.

Speculative decoding with a nested drafter lives in :mod:`matformer.speculative`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .cache import KVCache
from .config import SubmodelSpec
from .model import MatFormerLM, eval_mode
from .runner import RunnerPool, SubmodelRunner

log = logging.getLogger(__name__)

def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")


def _filter_logits(logits: Tensor, temperature: float, top_k: int | None,
                   top_p: float | None) -> Tensor:
    """Temperature-scaled fp32 logits with the tokens outside top-k / top-p set to -inf.

    The logits are shifted so that their maximum is 0 before scaling (the distribution is the
    same), and temperatures below 1e-30 scale as 1e-30 (a denormal would be flushed to 0): a
    tiny temperature then gives the argmax's distribution, never +inf or NaN probabilities."""
    logits = logits.float()
    logits = (logits - logits.amax(-1, keepdim=True)) / max(temperature, 1e-30)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop = (cum - sorted_logits.softmax(-1)) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def logits_to_probs(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None) -> Tensor:
    """The sampling distribution (..., vocab) in fp32 that :func:`sample_next` draws from.

    ``temperature=0`` gives the one-hot distribution of the argmax (greedy decoding).
    """
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        probs = torch.zeros_like(logits, dtype=torch.float32)
        return probs.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return _filter_logits(logits, temperature, top_k, top_p).softmax(-1)


def sample_next(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Draw one token per row from (B, vocab) logits; ``temperature=0`` is greedy."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    probs = _filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Stack token lists of different lengths, left-padded: ``(ids (B, T), lengths (B,))``."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("need at least one prompt, and every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
    return ids, torch.tensor([len(p) for p in prompts], dtype=torch.long)


def _as_batch(prompt: Tensor | Sequence[Sequence[int]], prompt_lengths: Sequence[int] | Tensor |
              None, pad_id: int) -> tuple[Tensor, Tensor | None]:
    if isinstance(prompt, Tensor):
        if prompt.dim() != 2 or prompt.shape[1] == 0:
            raise ValueError(f"prompt must be (B, T) token ids with T >= 1, "
                             f"got {tuple(prompt.shape)}")
        lengths = None if prompt_lengths is None else torch.as_tensor(prompt_lengths)
        return prompt, lengths
    if prompt_lengths is not None:
        raise ValueError("prompt_lengths goes with a left-padded tensor, not with token lists")
    ids, lengths = left_pad(prompt, pad_id)
    return ids, lengths if len(set(lengths.tolist())) > 1 else None


def prefill(model: MatFormerLM, prompt: Tensor, cache: KVCache, *, widths: SubmodelSpec = None,
            prompt_lengths: Tensor | None = None,
            runner: SubmodelRunner | None = None) -> Tensor:
    """Run the (left-padded) prompts through ``model`` into ``cache``; last-position logits.

    The cache's padding state is set here, so a cache reused after a left-padded batch forgets
    that batch's padding. With a ``runner`` (of the same submodel) and no padding, the lean
    path runs and only the last position is projected onto the vocabulary.
    """
    B, T = prompt.shape
    if prompt_lengths is None:
        prompt_lengths = torch.full((B,), T, dtype=torch.long)
    cache.set_prompt_lengths(prompt_lengths, T)
    if runner is not None and not cache.padded:
        return runner(prompt, cache, 0, last_only=True)[:, -1]
    return model(prompt, widths=widths, cache=cache, start_pos=0)[:, -1]


def _stream_batch(model: MatFormerLM, prompt: Tensor | Sequence[Sequence[int]],
                  prompt_lengths: Sequence[int] | Tensor | None, max_new_tokens: int,
                  eos_id: int | None) -> tuple[Tensor, Tensor | None, int]:
    """The (left-padded) batch, its prompt lengths, and the cache slots decoding it needs.

    Raises:
        ValueError: A negative ``max_new_tokens``, or prompt + new tokens beyond the context.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    ids, lengths = _as_batch(prompt, prompt_lengths, 0 if eos_id is None else eos_id)
    T = ids.shape[1]
    need = T + max_new_tokens - 1
    ctx = model.config.max_seq_len
    if T > ctx or need > ctx:
        raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) - 1 = {need} "
                         f"exceeds the context max_seq_len={ctx}")
    return ids, lengths, need


@torch.no_grad()
def generate_stream(model: MatFormerLM, prompt: Tensor | Sequence[Sequence[int]],
                    max_new_tokens: int, *, widths: SubmodelSpec = None,
                    temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, eos_id: int | None = None,
                    generator: torch.Generator | None = None,
                    prompt_lengths: Sequence[int] | Tensor | None = None,
                    cache: KVCache | None = None, runners: RunnerPool | None = None,
                    compile: bool | None = None) -> Iterator[Tensor]:
    """KV-cached decoding; yields the (B,) new tokens of each step as soon as they exist.

    Args:
        model: Any MatFormer (or dense) model; one forward per step, on weight slices.
        prompt: (B, T) ids, left-padded when ``prompt_lengths`` is given, or a list of token
            lists of any lengths (left-padded here).
        max_new_tokens: Upper bound on new tokens per row.
        widths: The submodel (see :meth:`MatFormerLM.forward`).
        temperature, top_k, top_p, generator: Sampling (see :func:`sample_next`).
        eos_id: Rows that emit it keep emitting it; the stream ends when every row has.
        prompt_lengths: Real tokens per row of a left-padded (B, T) prompt.
        cache: A cache to fill (made here when None); it must hold T + max_new_tokens - 1 slots.
        runners: Where the lean per-submodel forward comes from (pass one to reuse compiled
            graphs across calls); made here when None.
        compile: For a pool made here: ``torch.compile`` the lean forward (None: on CUDA only).

    Unpadded batches run the lean :class:`~matformer.runner.SubmodelRunner`; left-padded ones
    run ``model.forward`` (which masks the padding). The model's train/eval mode is restored
    when the stream ends.
    """
    _check_sampling(temperature, top_k, top_p)
    ids, lengths, need = _stream_batch(model, prompt, prompt_lengths, max_new_tokens, eos_id)
    if max_new_tokens == 0:
        return
    B, T = ids.shape
    sub = model.config.submodel(widths)
    pool = RunnerPool.of(model, runners, compile=compile)
    if lengths is not None and pool.weights != "model":
        raise ValueError(f"prompts of different lengths (left-padded) run model.forward, not "
                         f"the {pool.weights} weights of runners; give prompts of one length")
    runner = pool.get(sub)
    if cache is None:
        cache = pool.new_cache(B, max(need, T))
    with eval_mode(model):
        logits = prefill(model, ids.to(cache.device), cache, widths=sub,
                         prompt_lengths=lengths, runner=runner)
        lean = not cache.padded
        done = torch.zeros(B, dtype=torch.bool, device=logits.device)
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                              generator=generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            yield nxt
            if step == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
                return
            if lean:
                logits = runner(nxt[:, None], cache, T + step)[:, -1]
            else:
                logits = model(nxt[:, None], widths=sub, cache=cache, start_pos=T + step)[:, -1]


def fits_context(context: int, prompt_len: int, max_new_tokens: int) -> bool:
    """Whether a KV cache of ``context`` slots holds the decoding: the prompt and every new
    token but the last (which is never fed back). Otherwise decoding slides its window,
    uncached (:func:`generate` decides so by default)."""
    return prompt_len <= context and prompt_len + max_new_tokens - 1 <= context


@torch.no_grad()
def generate(model: MatFormerLM, prompt: Tensor | Sequence[Sequence[int]], max_new_tokens: int,
             *, widths: SubmodelSpec = None, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, eos_id: int | None = None,
             generator: torch.Generator | None = None,
             prompt_lengths: Sequence[int] | Tensor | None = None,
             use_cache: bool | None = None, runners: RunnerPool | None = None,
             compile: bool | None = None) -> Tensor:
    """Continue (B, T) prompts by up to ``max_new_tokens``; stops early when all rows hit EOS.

    Returns (B, T + n) ids: the (left-padded) prompts followed by the new tokens; rows that
    ended keep emitting ``eos_id``.

    Args:
        use_cache: True decodes with a KV cache (:func:`generate_stream`); False runs the simple
            reference decoder that re-runs the model over the (cropped) context each step; None
            (default) uses the cache whenever prompt + new tokens fit the context.
        runners, compile: The lean forwards to decode with (see :func:`generate_stream`).
        Others: as in :func:`generate_stream`.
    """
    ids, lengths = _as_batch(prompt, prompt_lengths, 0 if eos_id is None else eos_id)
    fits = fits_context(model.config.max_seq_len, ids.shape[1], max_new_tokens)
    if use_cache is None:
        use_cache = fits or lengths is not None
        if not use_cache:
            log.info("prompt + new tokens exceed the context: uncached sliding-window decoding")
    if use_cache:
        steps = list(generate_stream(model, ids, max_new_tokens, widths=widths,
                                     temperature=temperature, top_k=top_k, top_p=top_p,
                                     eos_id=eos_id, generator=generator, prompt_lengths=lengths,
                                     runners=runners, compile=compile))
        return torch.cat([ids.to(steps[0].device), torch.stack(steps, 1)], 1) if steps else ids
    if lengths is not None:
        raise ValueError("left-padded prompts need the KV cache (use_cache=True)")
    return _generate_uncached(model, ids, max_new_tokens, widths=widths,
                              temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
                              generator=generator)


@torch.no_grad()
def _generate_uncached(model: MatFormerLM, prompt: Tensor, max_new_tokens: int, *,
                       widths: SubmodelSpec, temperature: float,
                       top_k: int | None, top_p: float | None, eos_id: int | None,
                       generator: torch.Generator | None) -> Tensor:
    """The reference decoder: each step re-runs the model on the (cropped) context."""
    with eval_mode(model):
        return _decode_uncached(model, prompt, max_new_tokens, widths=widths,
                                temperature=temperature, top_k=top_k, top_p=top_p,
                                eos_id=eos_id, generator=generator)


def _decode_uncached(model: MatFormerLM, prompt: Tensor, max_new_tokens: int, *,
                     widths: SubmodelSpec, temperature: float,
                     top_k: int | None, top_p: float | None, eos_id: int | None,
                     generator: torch.Generator | None) -> Tensor:
    ctx = model.config.max_seq_len
    sub = model.config.submodel(widths)
    out = prompt
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        logits = model(out[:, -ctx:], widths=sub)[:, -1]
        nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                          generator=generator)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        out = torch.cat([out, nxt[:, None]], dim=1)
        if eos_id is not None and bool(done.all()):
            break
    return out
