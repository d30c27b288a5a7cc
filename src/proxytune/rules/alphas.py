"""Rules that set each pair's alpha per row: confidence gating and context-aware alpha.

Both wrap an ``inner`` rule (default ``proxy``) and hand it the same context with new
alphas, as ``(B, 1)`` tensors. Put ``context`` outside ``gated`` when using both: ``context``
*replaces* alphas, ``gated`` *scales* whatever alphas it is given.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import regex
import torch

from ..errors import ConfigError
from ..prompts import raw_text
from .base import Bound, RuleBase, is_zero, register, row_alpha
from .context import Combiner, Request, Sides, StepContext
from .filters import _Wrapper
from .settings import alphas, boolean, number, optional, prompt_rules, setting

# -- the formulas ---------------------------------------------------------------------------


def entropy(lp: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of ``(B, V)`` log-probs -> ``(B,)``; masked tokens add 0."""
    return torch.special.entr(lp.exp()).sum(dim=-1)


def confidence_gate(
    h_base: torch.Tensor,
    h_proxy: torch.Tensor,
    low: float = 0.0,
    high: float = 1.0,
    floor: float = 0.0,
) -> torch.Tensor:
    """The gate ``g`` in ``[floor, 1]`` that scales a pair's alpha, per row, ``(B,)``.

    ``d = H(p_M) - H(p_proxy)`` is how much more certain the proxy is than the base (nats)::

        g = floor + (1 - floor) * clip((d - low) / (high - low), 0, 1)

    Full strength where the proxy is at least ``high`` nats more certain than the base (the
    expert knows, the base hesitates), ``floor`` where it is at most ``low`` more certain, and
    linear in between.

    >>> confidence_gate(torch.tensor([2.0, 2.0, 2.0]), torch.tensor([0.5, 1.5, 2.5]))
    tensor([1.0000, 0.5000, 0.0000])
    """
    ramp = ((h_base - h_proxy - low) / (high - low)).clamp(0.0, 1.0)
    return floor + (1.0 - floor) * ramp


REGEX_SECONDS = 0.1
"""The time a context rule's regex may take on one prompt. Backtracking regexes (nested
quantifiers such as ``(a+)+$``) take exponential time on some texts: they are stopped and the
request refused instead of freezing the server."""


def search(expression: str, text: str, where: str = "regex") -> bool:
    """Whether ``expression`` matches somewhere in ``text`` (:func:`re.search` semantics, on
    the ``regex`` engine, which stops after :data:`REGEX_SECONDS` and lets other threads run
    meanwhile)."""
    try:
        found = regex.search(expression, text, flags=regex.VERSION0, timeout=REGEX_SECONDS)
    except TimeoutError:
        raise ConfigError(
            f"rule {where} {expression!r} took over {REGEX_SECONDS:g}s on the prompt and was "
            "stopped; simplify it (nested quantifiers such as (a+)+ backtrack exponentially)",
            param="rule",
        ) from None
    return found is not None


def choose_alphas(prompt: Any, rules: Any) -> float | tuple[float, ...] | None:
    """The alpha(s) of the first context rule that matches ``prompt``, or ``None``.

    A ``keyword`` matches as a case-insensitive substring, a ``regex`` with :func:`re.search`
    (add ``(?i)`` for case-insensitive), both on the whole prompt (a chat: all messages); a
    regex that runs past :data:`REGEX_SECONDS` raises :class:`~proxytune.errors.ConfigError`.
    """
    text = raw_text(prompt)
    for i, rule in enumerate(rules):
        if "keyword" in rule and rule["keyword"].lower() in text.lower():
            return rule["alpha"]
        if "regex" in rule and search(rule["regex"], text, f"context.rules[{i}].regex"):
            return rule["alpha"]
    return None


# -- the rules ------------------------------------------------------------------------------


@register
@dataclass(frozen=True, kw_only=True)
class Gated(_Wrapper):
    name = "gated"
    summary = (
        "Confidence gating: scale each pair's alpha per row and step by how much more certain "
        "the proxy (its expert) is than the base."
    )
    formula = (
        "inner with alpha_i <- g alpha_i,  "
        "g = floor + (1 - floor) clip((H(p_M) - H(p_Ei) - low) / (high - low), 0, 1)"
    )
    cost = "the inner rule's, plus one entropy over (B, V) per model"

    low: float = setting(0.0, "entropy gap (nats) at or below which g = floor", number())
    high: float = setting(1.0, "entropy gap (nats) at or above which g = 1", number())
    floor: float = setting(0.0, "the smallest gate; 1 turns gating off", number(0.0, 1.0))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.high <= self.low:
            raise ConfigError(f"gated.high ({self.high}) must be greater than low ({self.low})")

    def step(self, ctx: StepContext, state: Any) -> torch.Tensor:
        h_base = entropy(ctx.base)  # (B,)
        new = []
        for (expert, anti), alpha in zip(ctx.pairs, ctx.alphas, strict=True):
            proxy = expert if expert is not None else anti  # the pair's small model
            if proxy is None or is_zero(alpha):
                new.append(alpha)
                continue
            gate = confidence_gate(h_base, entropy(proxy), self.low, self.high, self.floor)
            new.append(row_alpha(alpha, ctx.rows, ctx.base.device) * gate[:, None])  # (B, 1)
        return state(replace(ctx, alphas=tuple(new)))


@dataclass(frozen=True)
class _ContextState:
    inner: Any
    chosen: tuple[tuple[float, ...] | None, ...]  # per prompt: one alpha per pair, or None


@register
@dataclass(frozen=True, kw_only=True)
class Context(_Wrapper):
    name = "context"
    summary = (
        "Context-aware alpha: keyword/regex rules on the prompt pick each pair's alpha once "
        "per request and row (steer hard on some topics, lightly on others)."
    )
    formula = "inner with alpha_i <- alpha_i of the first rule matching the prompt, else default"
    cost = "the inner rule's; the rules run once per prompt"

    rules: tuple[dict[str, Any], ...] = setting(
        (),
        "required: [{keyword: str | regex: str, alpha: a | [a per pair]}], first match wins",
        prompt_rules,
    )
    default: float | tuple[float, ...] | None = setting(
        None, "alpha(s) when no rule matches; null keeps the pairs' own alphas", optional(alphas)
    )
    scale: bool = setting(
        False, "multiply the pairs' own alphas (schedules) instead of replacing them", boolean
    )

    def check(self, request: Request) -> None:
        self._check_own(request)
        if isinstance(self.inner, RuleBase):
            self.inner.check(self._inner_request(request, self._per_prompt(request)))

    def _check_own(self, request: Request) -> None:
        """This rule's settings against the model set (the inner rule is checked on the
        alphas this rule picks, by :meth:`check`, :meth:`needs` and :meth:`bind`)."""
        RuleBase.check(self, request)
        n = len(request.pairs)
        named = [(f"rules[{i}].alpha", r["alpha"]) for i, r in enumerate(self.rules)]
        for where, value in [*named, ("default", self.default)]:
            if isinstance(value, tuple) and len(value) != n:
                raise ConfigError(
                    f"context.{where} gives {len(value)} alphas for {n} pair(s); give one "
                    "number for every pair or one per pair"
                )

    def _per_prompt(self, request: Request) -> tuple[tuple[float, ...] | None, ...]:
        n = len(request.pairs)
        out = []
        for prompt in request.prompts:
            value = choose_alphas(prompt, self.rules)
            value = self.default if value is None else value
            out.append(
                None if value is None else value if isinstance(value, tuple) else (value,) * n
            )
        return tuple(out)

    def _inner_request(
        self, request: Request, chosen: tuple[tuple[float, ...] | None, ...]
    ) -> Request:
        """``request`` as the inner rule sees it: a pair switched on by a rule runs, and each
        pair's alpha range covers the alphas the rules pick."""
        pairs = tuple(
            replace(
                p,
                always_off=p.always_off and (self.scale or not _turned_on(chosen, i)),
                alpha_range=_picked_range(
                    p.alpha_range, [None if c is None else c[i] for c in chosen], self.scale
                ),
            )
            for i, p in enumerate(request.pairs)
        )
        return replace(request, pairs=pairs)

    def needs(self, request: Request) -> tuple[Sides, ...]:
        self._check_own(request)
        return self.inner.needs(self._inner_request(request, self._per_prompt(request)))

    def bind(self, request: Request) -> Combiner:
        self._check_own(request)
        chosen = self._per_prompt(request)
        inner = self.inner.bind(self._inner_request(request, chosen))
        return Bound(self, _ContextState(inner, chosen))

    def step(self, ctx: StepContext, state: _ContextState) -> torch.Tensor:
        picked = [state.chosen[p] for p in ctx.prompt_index]  # per row
        if all(c is None for c in picked):
            return state.inner(ctx)
        has = torch.tensor([c is not None for c in picked], device=ctx.base.device)[:, None]
        new = []
        for i, alpha in enumerate(ctx.alphas):
            own = row_alpha(alpha, ctx.rows, ctx.base.device)  # (B, 1)
            value = torch.tensor(
                [[c[i] if c is not None else 0.0] for c in picked], device=ctx.base.device
            )  # (B, 1)
            value = value * own if self.scale else value
            new.append(torch.where(has, value, own))
        return state.inner(replace(ctx, alphas=tuple(new)))


def _picked_range(
    own: tuple[float, float] | None, picked: list[float | None], scale: bool
) -> tuple[float, float] | None:
    """A pair's alpha range once the context rules picked ``picked`` (per prompt; ``None``:
    the pair's own alphas): the picks, times the pair's own range with ``scale``."""
    values: list[float] = []
    for v in picked:
        if v is not None and not scale:
            values.append(v)
        elif own is None:
            return None
        else:
            values += own if v is None else [v * own[0], v * own[1]]
    return (min(values), max(values)) if values else own


def _turned_on(chosen: tuple[tuple[float, ...] | None, ...], pair: int) -> bool:
    return any(c is not None and c[pair] != 0 for c in chosen)
