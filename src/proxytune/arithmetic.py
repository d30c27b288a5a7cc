"""The proxy-tuning arithmetic: pure functions on ``(B, V)`` tensors.

The paper's formula, in one line (see :func:`proxy_scores`)::

    scores = log_softmax(base) + sum_i alpha_i * (log_softmax(expert_i) - log_softmax(anti_i))

Everything here is engine-neutral: no models, no caches, no tokenizers. The decode loop,
a ``transformers`` ``LogitsProcessor`` and the server all call these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import NumericalError

Alpha = float | torch.Tensor
"""A scalar, or a ``(B, 1)`` tensor for a per-row alpha."""


def log_probs(logits: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Log-probabilities over the first ``vocab_size`` ids, in float32.

    ``(B, W)`` logits of a head ``W`` wide -> ``(B, V)`` log-probs, ``V = vocab_size or W``.
    Columns past ``vocab_size`` (padding rows of the head) are dropped before normalising,
    so the result is a distribution over the ids every tokenizer defines.

    >>> log_probs(torch.tensor([[0.0, 0.0, 5.0]]), vocab_size=2).exp()
    tensor([[0.5000, 0.5000]])
    """
    width = logits.shape[-1]
    v = width if vocab_size is None else vocab_size
    if v > width:
        raise ValueError(f"vocab_size {v} exceeds the logits width {width}")
    return torch.log_softmax(logits[..., :v].float(), dim=-1)


def candidate_log_probs(logits: torch.Tensor, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Log-probs renormalised over candidate ids: ``(B, n)`` logits at ``ids`` ``(n,)`` ->
    ``(B, V)``, ``-inf`` at every other id.

    Each row differs from the model's full log-probs at ``ids`` by one constant (the log of
    the mass outside them), which a rule that only re-ranks candidates never sees.

    >>> candidate_log_probs(torch.tensor([[0.0, 0.0]]), torch.tensor([2, 0]), 3).exp()
    tensor([[0.5000, 0.0000, 0.5000]])
    """
    out = torch.full((logits.shape[0], vocab_size), float("-inf"), device=logits.device)
    out[:, ids] = torch.log_softmax(logits.float(), dim=-1)
    return out


def proxy_offset(expert_lp: torch.Tensor | None, anti_lp: torch.Tensor | None) -> torch.Tensor:
    """The steering direction of one pair: ``log p_E - log p_A``, ``(B, V)``.

    A pair may omit one side (DExperts-style):
    - expert only: ``+log p_E`` (a product of experts with the base);
    - anti-expert only: ``-log p_A`` (push away from what the anti-expert likes).
    Where both sides are ``-inf`` (a token masked in both) the offset is 0, not NaN.
    """
    if expert_lp is None and anti_lp is None:
        raise ValueError("a pair needs an expert, an anti-expert, or both")
    if anti_lp is None:
        return expert_lp  # type: ignore[return-value]
    if expert_lp is None:
        return -anti_lp
    offset = expert_lp - anti_lp
    both_masked = torch.isneginf(expert_lp) & torch.isneginf(anti_lp)
    return torch.where(both_masked, 0.0, offset)  # one pass (masked_fill takes two here)


def add_scaled(scores: torch.Tensor, offset: torch.Tensor, alpha: Alpha) -> torch.Tensor:
    """``scores + alpha * offset`` where ``alpha == 0`` contributes exactly nothing.

    ``0 * -inf`` is NaN in IEEE arithmetic; a zero alpha must instead leave ``scores`` bit for
    bit unchanged, so it is skipped (scalar) or selected away (per-row tensor).

    Masks are vetoes, never certainties: a ``-inf`` push rules a token out, while a ``+inf``
    push (an anti-expert that masks a token the expert allows, or a negative alpha on a masked
    expert token) carries no usable size and counts as 0, so no score becomes ``+inf`` or NaN.
    """
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.to(scores.device, torch.float32)
        if alpha.dim() == 1:
            alpha = alpha[:, None]
        scaled = torch.where(alpha == 0, torch.zeros_like(scores), alpha * offset.to(scores))
    elif alpha == 0:
        return scores
    else:
        scaled = alpha * offset.to(scores.device)
    # +inf -> 0 in one pass; NaN and -inf pass through. In place: ``scaled`` is ours alone
    scaled.nan_to_num_(nan=float("nan"), posinf=0.0, neginf=-torch.inf)
    if scaled.shape == scores.shape and scaled.dtype == scores.dtype:
        return scaled.add_(scores)
    return scores + scaled


def proxy_scores(
    base_lp: torch.Tensor,
    offsets: Sequence[torch.Tensor],
    alphas: Sequence[Alpha],
) -> torch.Tensor:
    """The paper's combination: ``log p_M + sum_i alpha_i * offset_i``, ``(B, V)``.

    ``offsets[i]`` is :func:`proxy_offset` of pair ``i``. The result is an unnormalised score;
    :func:`torch.log_softmax` of it is the proxy-tuned distribution.
    """
    if len(offsets) != len(alphas):
        raise ValueError(f"{len(offsets)} offsets but {len(alphas)} alphas")
    scores = base_lp
    for offset, alpha in zip(offsets, alphas, strict=True):
        scores = add_scaled(scores, offset, alpha)
    return scores


def check_finite(logits: torch.Tensor, model_name: str) -> None:
    """Raise :class:`NumericalError` if ``logits`` hold NaN or +/-inf.

    Called on each model's raw logits before they are combined, so that a broken model
    (overflow in float16, corrupt weights) is named instead of producing garbage text.
    One reduction decides (a NaN or an infinity anywhere makes the float32 sum non-finite);
    the element-wise scan runs only then, to name the first bad index.
    """
    if bool(torch.isfinite(logits.sum(dtype=torch.float32))):
        return
    bad = ~torch.isfinite(logits)
    if bool(bad.any()):
        where = tuple(bad.nonzero()[0].tolist())  # (row, token id) for (B, V) logits
        kind = "NaN" if bool(torch.isnan(logits).any()) else "infinite"
        raise NumericalError(
            f"model {model_name!r} produced {kind} logits (first at index {where}). "
            "This usually means float16 overflow or broken weights: load the model in "
            "float32 or bfloat16 (dtype='float32'), or check the checkpoint."
        )


@dataclass(frozen=True)
class TopLogprobs:
    """The chosen token's log-prob and the ``k`` most likely alternatives, per row."""

    chosen: torch.Tensor  # (B,)
    top_ids: torch.Tensor  # (B, k)
    top_logprobs: torch.Tensor  # (B, k)


def top_logprobs(scores: torch.Tensor, chosen: torch.Tensor, k: int) -> TopLogprobs:
    """Normalise ``(B, V)`` scores and read the chosen ids' log-probs and the top ``k``."""
    lp = torch.log_softmax(scores.float(), dim=-1)
    chosen_lp = lp.gather(-1, chosen.view(-1, 1).to(lp.device)).squeeze(-1)
    k = min(k, lp.shape[-1])
    top = torch.topk(lp, k, dim=-1) if k > 0 else None
    if top is None:
        empty = lp.new_zeros((lp.shape[0], 0))
        return TopLogprobs(chosen_lp, empty.long(), empty)
    return TopLogprobs(chosen_lp, top.indices, top.values)


PairLogprobs = tuple[torch.Tensor | None, torch.Tensor | None]
"""``(expert log-probs, anti-expert log-probs)`` of one pair; either side may be absent."""


def combine_proxy(
    base_lp: torch.Tensor, pairs: Sequence[PairLogprobs], alphas: Sequence[Alpha]
) -> torch.Tensor:
    """The default rule: :func:`proxy_scores` over each pair's :func:`proxy_offset`."""
    return proxy_scores(base_lp, [proxy_offset(e, a) for e, a in pairs], alphas)


def steering_kl(scores: torch.Tensor, base_lp: torch.Tensor) -> torch.Tensor:
    """``KL(steered || base)`` per row, in nats: ``(B, V)`` scores and base log-probs -> ``(B,)``.

    ``scores`` are the combined (unnormalised) scores; tokens the steered distribution rules
    out contribute nothing (``0 * log 0 = 0``).

    >>> base = torch.log(torch.tensor([[0.5, 0.5]]))
    >>> steering_kl(torch.log(torch.tensor([[1.0, 0.0]])), base)
    tensor([0.6931])
    """
    lp = torch.log_softmax(scores.float(), dim=-1)
    p = lp.exp()
    terms = torch.where(p > 0, p * (lp - base_lp.float()), torch.zeros_like(p))
    return terms.sum(dim=-1)


def steering_stats(
    scores: torch.Tensor, base_lp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What steering does to each row, ``(B, V)`` -> three ``(B,)``: ``KL(steered || base)``
    (nats), whether the steered top token differs from the base's (0/1), and the steered
    distribution's entropy (nats). One softmax for all three (the server's drift monitor).

    >>> base = torch.log(torch.tensor([[0.75, 0.25]]))
    >>> kl, changed, entropy = steering_stats(torch.log(torch.tensor([[0.25, 0.75]])), base)
    >>> round(float(kl), 4), float(changed), round(float(entropy), 4)
    (0.5493, 1.0, 0.5623)
    """
    lp = torch.log_softmax(scores.float(), dim=-1)
    p = lp.exp()
    live = p > 0
    kl = torch.where(live, p * (lp - base_lp.float()), torch.zeros_like(p)).sum(dim=-1)
    entropy = -torch.where(live, p * lp, torch.zeros_like(p)).sum(dim=-1)
    changed = (scores.argmax(dim=-1) != base_lp.argmax(dim=-1)).float()
    return kl, changed, entropy
