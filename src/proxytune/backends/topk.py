"""A base known only by its top-k log-probabilities: pure functions on ``(B, k)`` / ``(B, V)``.

An API returns, per step, ``k`` candidates ``(id, log p)`` and nothing about the other
``V - k`` tokens. Proxy-tuning needs ``log p_M(t)`` for every token it may pick, so this
module states how a full row is completed and which tokens may be picked at all::

    known     the k returned tokens: their log-probs, exactly
    missing   m = 1 - sum_k p  (the mass the endpoint did not show)
    others    log min(m / (V - k), p_k)      (rule "uniform": m spread evenly over the
              V - k unseen tokens, never above the k-th shown probability, which bounds
              every unseen token)
    support   known  |  each expert's own top tokens   (the tokens the step may choose)

With ``k = V`` nothing is estimated and the row is the endpoint's distribution exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MISSING_RULES = ("uniform", "floor", "none")
"""How unseen tokens get a base log-prob: ``uniform`` (the leftover mass spread evenly,
capped at the k-th probability), ``floor`` (the k-th log-prob itself: an upper bound),
``none`` (``-inf``: only the endpoint's own candidates can be chosen)."""

IMPOSSIBLE = -9999.0
"""OpenAI-style servers report an impossible token as -9999 (JSON has no -inf)."""


def topk_row(
    ids: torch.Tensor, logprobs: torch.Tensor, vocab_size: int, missing: str = "uniform"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Complete ``(B, k)`` candidates into a ``(B, V)`` log-prob row and its ``known`` mask.

    ``ids`` may hold ``-1`` for padding (rows with fewer candidates); log-probs at or below
    :data:`IMPOSSIBLE` count as ``-inf``. Unseen tokens follow ``missing``
    (:data:`MISSING_RULES`).

    >>> row, known = topk_row(torch.tensor([[0, 1]]), torch.tensor([[-0.3567, -1.6094]]), 4)
    >>> row.exp().round(decimals=2)
    tensor([[0.7000, 0.2000, 0.0500, 0.0500]])
    """
    if missing not in MISSING_RULES:
        raise ValueError(f"missing-mass rule must be one of {MISSING_RULES}, got {missing!r}")
    rows = ids.shape[0]
    lp = logprobs.float().masked_fill(logprobs <= IMPOSSIBLE, float("-inf"))
    valid = (ids >= 0) & (ids < vocab_size)
    lp = lp.masked_fill(~valid, float("-inf"))
    at_row = torch.arange(rows, device=ids.device)[:, None].expand_as(ids)[valid]
    at_id = ids[valid]
    known = torch.zeros((rows, vocab_size), dtype=torch.bool, device=ids.device)
    known[at_row, at_id] = True
    fill = unseen_logprob(lp, known.sum(-1), vocab_size, missing)  # (B, 1)
    row = fill.expand(rows, vocab_size).clone()
    row[at_row, at_id] = lp[valid]
    return row, known


def unseen_logprob(
    lp: torch.Tensor, n_known: torch.Tensor, vocab_size: int, missing: str
) -> torch.Tensor:
    """``(B, 1)``: the log-prob an unseen token gets, from ``(B, k)`` shown log-probs."""
    rows = lp.shape[0]
    neg_inf = torch.full((rows, 1), float("-inf"), device=lp.device)
    finite = torch.isfinite(lp)
    if missing == "none" or lp.shape[-1] == 0:
        return neg_inf
    kth = lp.masked_fill(~finite, float("inf")).min(dim=-1, keepdim=True).values
    kth = torch.where(torch.isinf(kth), neg_inf, kth)  # no finite candidate at all
    if missing == "floor":
        return kth
    shown = torch.logsumexp(lp, dim=-1, keepdim=True).clamp(max=0.0)
    left = (-torch.expm1(shown)).clamp(min=0.0)  # 1 - sum p, computed without cancellation
    unseen = (vocab_size - n_known).clamp(min=1).to(lp.dtype).view(rows, 1)
    spread = torch.log(left / unseen)
    out = torch.minimum(spread, kth)
    return torch.where((vocab_size - n_known).view(rows, 1) > 0, out, neg_inf)


def expert_support(pair_lps: Sequence[torch.Tensor | None], top: int) -> torch.Tensor | None:
    """``(B, V)`` mask of each given model's ``top`` best tokens (``None`` if none given)."""
    mask = None
    for lp in pair_lps:
        if lp is None or top <= 0:
            continue
        k = min(top, lp.shape[-1])
        idx = torch.topk(lp, k, dim=-1).indices
        m = torch.zeros_like(lp, dtype=torch.bool).scatter_(1, idx, True)
        m &= torch.isfinite(lp)
        mask = m if mask is None else mask | m
    return mask


def restrict(scores: torch.Tensor, support: torch.Tensor | None) -> torch.Tensor:
    """``scores`` with every token outside ``support`` set to ``-inf``."""
    return scores if support is None else scores.masked_fill(~support, float("-inf"))


def coverage(base_lp: torch.Tensor, mapped: torch.Tensor) -> torch.Tensor:
    """``(B,)``: the base's probability mass on the ``mapped`` tokens, ``(B, V)`` bool."""
    p = torch.softmax(base_lp.float(), dim=-1)
    return 1.0 - (p * ~mapped).sum(-1)  # exactly 1 when every token mapped
