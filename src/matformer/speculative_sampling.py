"""The acceptance rule of speculative decoding: which drafted tokens a round keeps.

Pure tensor maths, no model: given the drafts and the target's scores at the same prefixes,
:func:`greedy_accept` keeps the drafts that equal the target's argmax, and :func:`accept_reject`
(speculative rejection sampling, Leviathan et al. 2023) keeps them so that the emitted tokens
are distributed exactly as the target's. Either way the round ends with one token of the
target's own (a correction or a bonus). :mod:`matformer.speculative` runs them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def greedy_accept(draft_tokens: Tensor, target_logits: Tensor) -> Tensor:
    """Keep draft tokens while they equal the target's argmax; then the target's own token.

    Args:
        draft_tokens: (k,) proposed ids.
        target_logits: (k + 1, vocab): the target's logits after each prefix.

    Returns:
        The 1..k+1 emitted ids (accepted drafts, then the target's correction or bonus).
    """
    best = target_logits.argmax(-1)  # (k + 1,)
    k = draft_tokens.shape[0]
    miss = (best[:k] != draft_tokens).nonzero()
    n = int(miss[0, 0]) if len(miss) else k
    return best[: n + 1]  # best[:n] == draft_tokens[:n]


def accept_reject(draft_tokens: Tensor, draft_probs: Tensor, target_probs: Tensor,
                  generator: torch.Generator | None = None) -> Tensor:
    """Speculative rejection sampling: the emitted tokens are distributed as the target's.

    Draft token ``d_i ~ p_i`` is accepted with probability ``min(1, q_i(d_i) / p_i(d_i))``; at the
    first rejection a token is drawn from the residual ``max(q_i - p_i, 0)`` (normalised) and the
    round ends; if all ``k`` are accepted a bonus token is drawn from ``q_k``.

    Args:
        draft_tokens: (k,) ids drawn from ``draft_probs``.
        draft_probs: (k, vocab) drafter distributions ``p_1..p_k``.
        target_probs: (k + 1, vocab) target distributions ``q_1..q_{k+1}`` at the same prefixes.
        generator: Random source.

    Returns:
        The 1..k+1 emitted ids.
    """
    k = draft_tokens.shape[0]
    rows = torch.arange(k, device=draft_tokens.device)
    q = target_probs[rows, draft_tokens]
    p = draft_probs[rows, draft_tokens]
    u = torch.rand(k, generator=generator, device=draft_tokens.device)
    rejected = (u * p >= q).nonzero()  # accept iff u < q / p  (p > 0: d was drawn from p)
    if not len(rejected):
        extra = torch.multinomial(target_probs[k], 1, generator=generator)
        return torch.cat([draft_tokens, extra])
    n = int(rejected[0, 0])
    residual = (target_probs[n] - draft_probs[n]).clamp_min(0)
    if float(residual.sum()) <= 0:  # q == p: a rejection then has probability 0; be safe anyway
        residual = target_probs[n]
    extra = torch.multinomial(residual / residual.sum(), 1, generator=generator)
    return torch.cat([draft_tokens[:n], extra])
