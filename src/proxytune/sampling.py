"""Pure sampling steps on ``(B, V)`` scores, with explicit random generators.

The chain, in order (each step a small function): normalise -> penalties -> temperature ->
top-k -> top-p -> min-p -> draw. Greedy decoding (temperature 0) is penalties -> argmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

NEG_INF = float("-inf")


def apply_penalties(
    logprobs: torch.Tensor,
    history: Sequence[Sequence[int]],
    repetition: float = 1.0,
    presence: float = 0.0,
    frequency: float = 0.0,
) -> torch.Tensor:
    """Penalise tokens already seen in each row's ``history``, ``(B, V)`` -> ``(B, V)``.

    ``logprobs`` must be normalised (all <= 0). A repetition penalty ``r`` multiplies a seen
    token's log-prob by ``r`` (its probability is raised to the power ``r``); presence and
    frequency penalties subtract ``presence`` once and ``frequency`` per occurrence (OpenAI).
    """
    if repetition == 1.0 and presence == 0.0 and frequency == 0.0:
        return logprobs
    out = logprobs.clone()
    vocab = out.shape[-1]
    for row, seen in enumerate(history):
        ids = [t for t in seen if 0 <= t < vocab]
        if not ids:
            continue
        idx = torch.tensor(ids, device=out.device)
        uniq, counts = idx.unique(return_counts=True)
        vals = out[row, uniq]
        if repetition != 1.0:
            vals = vals * repetition
        vals = vals - presence - frequency * counts.to(vals.dtype)
        out[row, uniq] = vals
    return out


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by a positive temperature."""
    return scores if temperature == 1.0 else scores / temperature


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each row's ``k`` best tokens (``k <= 0`` or ``k >= V`` keeps all)."""
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, NEG_INF)


def top_p_filter(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of best tokens whose probability reaches ``p`` (nucleus)."""
    if p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    probs = torch.softmax(sorted_scores, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly better tokens
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False  # the best token always survives
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, NEG_INF)


def min_p_filter(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least ``min_p`` times the row's best."""
    if min_p <= 0.0:
        return scores
    lp = torch.log_softmax(scores, dim=-1)
    threshold = lp.max(dim=-1, keepdim=True).values + torch.log(torch.tensor(min_p))
    return scores.masked_fill(lp < threshold, NEG_INF)


def draw(
    scores: torch.Tensor, generators: Sequence[torch.Generator | None] | None = None
) -> torch.Tensor:
    """Sample one id per row from ``softmax(scores)``; one generator per row if given."""
    probs = torch.softmax(scores.float(), dim=-1)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    picks = [torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generators)]
    return torch.cat(picks)


def shape_scores(
    scores: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    history: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """The chain without the draw, ``(B, V)`` -> ``(B, V)``: ``softmax`` of the result is the
    distribution :func:`next_tokens` samples from (greedy: its argmax is the pick). Speculative
    decoding compares draft and target through it."""
    lp = torch.log_softmax(scores.float(), dim=-1)
    if history is not None:
        lp = apply_penalties(lp, history, repetition_penalty, presence_penalty, frequency_penalty)
    if temperature == 0.0:
        return lp
    lp = apply_temperature(lp, temperature)
    lp = top_k_filter(lp, top_k)
    lp = top_p_filter(lp, top_p)
    return min_p_filter(lp, min_p)


def next_tokens(
    scores: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    history: Sequence[Sequence[int]] | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Choose the next id of every row from combined ``(B, V)`` scores -> ``(B,)``."""
    lp = shape_scores(
        scores,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        history=history,
    )
    if temperature == 0.0:
        return greedy(lp)
    return draw(lp, generators)


def greedy(lp: torch.Tensor) -> torch.Tensor:
    """Each row's first maximal id, ``(B, V)`` -> ``(B,)`` int64, as ``argmax`` picks it.

    A float32 CPU tensor goes through numpy's argmax, about ten times faster than torch's on a
    150k vocabulary (same ids: both take the first maximum, and NaN counts as the maximum).

    >>> greedy(torch.tensor([[0.0, 2.0, 2.0], [1.0, 0.0, -1.0]]))
    tensor([1, 0])
    """
    if lp.device.type == "cpu" and lp.dtype == torch.float32 and lp.dim() == 2:
        return torch.from_numpy(np.argmax(lp.detach().numpy(), axis=-1).astype(np.int64))
    return lp.argmax(dim=-1)
