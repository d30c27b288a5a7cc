"""Rules that combine the base with the pairs: proxy, product of experts, mixture, per-pair.

Each rule's formula is one pure function on ``(B, V)`` log-probs; the rule classes only pick
the right tensors out of the :class:`~proxytune.rules.base.StepContext`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..arithmetic import Alpha, combine_proxy, proxy_scores
from ..errors import ConfigError
from .base import RuleBase, is_zero, only_pair, register, row_alpha, rule_spec
from .context import PairInfo, Request, Sides, StepContext
from .settings import list_of, number, setting

NEG_INF = float("-inf")


# -- the formulas ---------------------------------------------------------------------------


def product_scores(
    base: torch.Tensor, experts: Sequence[torch.Tensor], alphas: Sequence[Alpha]
) -> torch.Tensor:
    """Product of experts: ``log p_M + sum_i alpha_i * log p_Ei``, ``(B, V)``.

    >>> b = torch.log(torch.tensor([[0.5, 0.5]])); e = torch.log(torch.tensor([[0.9, 0.1]]))
    >>> torch.softmax(product_scores(b, [e], [1.0]), -1)
    tensor([[0.9000, 0.1000]])
    """
    return proxy_scores(base, experts, alphas)  # an expert-only pair's offset is log p_E


def mixture_scores(
    base: torch.Tensor, components: Sequence[torch.Tensor], weights: Sequence[Alpha]
) -> torch.Tensor:
    """Mixture in log space: ``log((1 - sum_i w_i) p_M + sum_i w_i p_Ei)``, ``(B, V)``.

    Computed as a ``logsumexp`` over the terms ``log(w) + log p``, so that tiny probabilities
    never underflow to ``log 0``. Weights are floats or ``(B, 1)`` tensors in ``[0, 1]``; a
    row whose weights are all 0 gets ``base`` back bit for bit.
    """
    rows = base.shape[0]
    if all(is_zero(w) for w in weights):
        return base
    w = [row_alpha(x, rows, base.device) for x in weights]  # each (B, 1)
    total = torch.cat(w, dim=-1).sum(dim=-1, keepdim=True)  # (B, 1)
    lowest = min(float(x.min()) for x in w)
    check_mixture_weights(lowest, float(total.max()), str([x.flatten().tolist() for x in w]))
    rest = (1.0 - total).clamp(min=0.0)
    terms = [torch.log(rest) + base]  # (B, V): log((1 - sum w) p_M)
    terms += [torch.log(wi) + c for wi, c in zip(w, components, strict=True)]  # log(w_i p_Ei)
    mixed = torch.logsumexp(torch.stack(terms), dim=0)  # (B, V)
    return torch.where(total == 0, base, mixed)  # exact base where this row mixes nothing


def nudge_scores(
    base: torch.Tensor, expert: torch.Tensor, gamma: float, on: torch.Tensor | None = None
) -> torch.Tensor:
    """Nudging: the expert's log-probs on rows where the base's top-1 probability is below
    ``gamma``, the base's elsewhere, ``(B, V)``. ``on``: ``(B, 1)`` bool, rows that may nudge.

    The base's top-1 probability is at least ``1 / V``, so ``gamma <= 1 / V`` is the base
    alone; ``gamma = 1`` hands every row whose base is not certain to the expert.

    >>> b = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05]]))
    >>> e = torch.log(torch.tensor([[0.1, 0.1, 0.8], [0.1, 0.1, 0.8]]))
    >>> nudge_scores(b, e, 0.6).argmax(-1)  # row 0 hesitates (0.5 < 0.6): the expert writes
    tensor([2, 0])
    """
    unsure = base.max(dim=-1, keepdim=True).values < math.log(gamma)  # (B, 1)
    if on is not None:
        unsure &= on
    return torch.where(unsure, expert, base)


MIXTURE_TOLERANCE = 1e-6
"""How far past 1 the weights' sum may go (float rounding of weights such as 0.7 + 0.3)."""


def check_mixture_weights(lowest: float, total: float, got: str) -> None:
    """Refuse mixing weights (each pair's alpha) below 0, or summing past 1: the base would
    keep a negative share of the mass. ``lowest``: the smallest weight; ``total``: the largest
    sum of the weights; ``got``: the weights, for the message."""
    if lowest < 0 or total > 1.0 + MIXTURE_TOLERANCE:
        raise ConfigError(
            "alpha: rule 'mixture' takes each pair's alpha as its mixing weight, which must be "
            f"in [0, 1] with the pairs' weights summing to at most 1; got {got}; send alpha "
            "between 0 and 1 (or use rule 'proxy' or 'product' for larger steering)",
            param="alpha",
        )


def steer_delta(base: torch.Tensor, steered: torch.Tensor) -> torch.Tensor:
    """How far a rule moved the base: ``steered - base``, ``(B, V)``, with -inf made safe.

    A token the steered scores rule out gets ``-inf``; a token the base already rules out gets
    0 (it stays out through the base), so ``-inf - -inf`` never turns into NaN.
    """
    delta = steered - base
    delta = torch.where(torch.isneginf(base), torch.zeros_like(delta), delta)
    return delta.masked_fill(torch.isneginf(steered), NEG_INF)


# -- the rules ------------------------------------------------------------------------------


@register
@dataclass(frozen=True, kw_only=True)
class Proxy(RuleBase):
    name = "proxy"
    summary = "The paper's rule: each pair's log-ratio, scaled by its alpha, added to the base."
    formula = "log p_M + sum_i alpha_i (log p_Ei - log p_Ai)"
    cost = "one forward of each model per token (the pairs run in the same step)"

    def pointwise(self) -> bool:
        """Yes: ``alpha (log p_E(t) - log p_A(t))`` reads each pair at ``t`` only, and a
        per-row constant added to ``log p_E`` or ``log p_A`` moves the row by ``alpha`` times it."""
        return True

    def step(self, ctx: StepContext, state: Any) -> torch.Tensor:
        return combine_proxy(ctx.base, *ctx.ran())


@dataclass(frozen=True, kw_only=True)
class _ExpertsOnly(RuleBase):
    """Shared by the rules that read each pair's expert and never its anti-expert."""

    def check(self, request: Request) -> None:
        super().check(request)
        for i, p in enumerate(request.pairs):
            if not p.expert and not p.always_off:
                raise ConfigError(
                    f"rule {self.name!r} reads each pair's expert, but pair {i} has only an "
                    "anti-expert; give it an expert or use rule 'proxy'",
                    param="rule",
                )

    def needs(self, request: Request) -> tuple[Sides, ...]:
        self.check(request)
        return tuple((p.expert and not p.always_off, False) for p in request.pairs)

    def experts(self, ctx: StepContext) -> tuple[list[torch.Tensor], list[Alpha]]:
        """Each pair's expert log-probs and alpha (pairs the loop did not run are skipped)."""
        pairs, alphas = ctx.ran()
        return [e for e, _ in pairs], alphas  # type: ignore[misc]


@register
@dataclass(frozen=True, kw_only=True)
class Product(_ExpertsOnly):
    name = "product"
    summary = (
        "Product of experts with tuned small models (no anti-expert): add alpha x the expert's "
        "log-probs; calibrate with temperatures."
    )
    formula = "log p_M + sum_i alpha_i log p_Ei"
    cost = "one forward of the base and of each expert per token (anti-experts are not run)"

    def pointwise(self) -> bool:
        """Yes: ``alpha log p_E(t)`` (see :meth:`Proxy.pointwise`)."""
        return True

    def step(self, ctx: StepContext, state: Any) -> torch.Tensor:
        return product_scores(ctx.base, *self.experts(ctx))


@register
@dataclass(frozen=True, kw_only=True)
class Mixture(_ExpertsOnly):
    name = "mixture"
    summary = (
        "Mixture of probabilities (alpha = weight in [0, 1]): the base keeps 1 - sum w of the "
        "mass; computed stably with logsumexp."
    )
    formula = "log((1 - sum_i w_i) p_M + sum_i w_i p_Ei),  w_i = alpha_i"
    cost = "one forward of the base and of each expert per token; a logsumexp over (B, V)"

    def check(self, request: Request) -> None:
        """Each read pair's alpha range (over the steps) within the mixture's bounds, before
        anything runs (a schedule given as a function is checked as it runs instead)."""
        super().check(request)
        ranges = [
            p.alpha_range
            for p in request.pairs
            if p.expert and not p.always_off and p.alpha_range is not None
        ]
        if ranges:
            got = ", ".join(f"{lo:g}" if lo == hi else f"{lo:g} to {hi:g}" for lo, hi in ranges)
            check_mixture_weights(min(lo for lo, _ in ranges), sum(hi for _, hi in ranges), got)

    def step(self, ctx: StepContext, state: Any) -> torch.Tensor:
        return mixture_scores(ctx.base, *self.experts(ctx))


@register
@dataclass(frozen=True, kw_only=True)
class Nudging(_ExpertsOnly):
    """Nudging: the base decodes and the expert writes the tokens where the base hesitates.

    The expert runs at every step, not only at the nudged ones: every decode loop feeds each
    running model every chosen token to keep its cache in step, and no loop yet catches a
    model up on demand. The anti-expert is never run.
    """

    name = "nudging"
    summary = (
        "Nudging: the base decodes; at a step where its top-1 probability is below gamma, "
        "the expert's distribution (greedy: its argmax) writes the token."
    )
    formula = "log p_E if max p_M < gamma else log p_M  (one pair; alpha 0 -> log p_M)"
    cost = (
        "one forward of the base and of the expert per token (the expert runs at every step "
        "to keep its cache; anti-experts are not run)"
    )

    gamma: float = setting(
        0.5,
        "hand the token to the expert where the base's top-1 probability is below gamma",
        number(0.0, 1.0, lo_open=True),
    )

    def check(self, request: Request) -> None:
        super().check(request)
        live = [i for i, p in enumerate(request.pairs) if not p.always_off]
        if len(live) > 1:
            raise ConfigError(
                f"rule 'nudging' hands the token to one expert, but {len(live)} pairs are on; "
                "keep one pair on (or give the others alpha 0)",
                param="rule",
            )

    def step(self, ctx: StepContext, state: Any) -> torch.Tensor:
        experts, alphas = self.experts(ctx)
        if not experts or is_zero(alphas[0]):
            return ctx.base
        on = None
        if isinstance(alphas[0], torch.Tensor):  # per-row alpha: a row at 0 stays the base's
            on = row_alpha(alphas[0], ctx.rows, ctx.base.device) != 0
        return nudge_scores(ctx.base, experts[0], self.gamma, on)


@register
@dataclass(frozen=True, kw_only=True)
class Base(RuleBase):
    name = "base"
    summary = "The base model alone (pairs are not run): plain decoding, or ARGS's paper setup."
    formula = "log p_M"
    cost = "one forward of the base per token"

    def needs(self, request: Request) -> tuple[Sides, ...]:
        self.check(request)
        return tuple((False, False) for _ in request.pairs)

    def step(self, ctx: StepContext, state: Any) -> torch.Tensor:
        return ctx.base


@register
@dataclass(frozen=True, kw_only=True)
class Pairs(RuleBase):
    name = "pairs"
    summary = (
        "Several pairs, each with its own rule (style, safety, domain): each pair steers the "
        "base by its rule and the steers add in log space."
    )
    formula = "log p_M + sum_i (R_i(M, pair i) - log p_M)"
    cost = "the sum of the per-pair rules' costs"

    rules: tuple[Any, ...] = setting(
        (),
        "required: one rule per pair, in pair order (a name or {name: ..., settings})",
        list_of(rule_spec),
    )

    def check(self, request: Request) -> None:
        super().check(request)
        if len(self.rules) != len(request.pairs):
            raise ConfigError(
                f"rule 'pairs' needs one rule per pair: {len(self.rules)} rule(s) in 'rules' "
                f"for {len(request.pairs)} pair(s)",
                param="rule",
            )

    def _alone(self, request: Request, i: int) -> Request:
        off = PairInfo(False, False, True)
        pairs = tuple(p if j == i else off for j, p in enumerate(request.pairs))
        return replace(request, pairs=pairs)

    def needs(self, request: Request) -> tuple[Sides, ...]:
        self.check(request)
        return tuple(rule.needs(self._alone(request, i))[i] for i, rule in enumerate(self.rules))

    def prepare(self, request: Request) -> Any:
        return [rule.bind(self._alone(request, i)) for i, rule in enumerate(self.rules)]

    def step(self, ctx: StepContext, state: Any) -> torch.Tensor:
        scores = ctx.base
        for i, bound in enumerate(state):
            expert, anti = ctx.pairs[i]
            if expert is None and anti is None:
                continue
            scores = scores + steer_delta(ctx.base, bound(only_pair(ctx, i)))
        return scores
