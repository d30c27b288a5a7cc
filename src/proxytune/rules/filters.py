"""Rules that restrict or bias an inner rule's scores: top-k reranking, plausibility, tokens.

Each wraps an ``inner`` rule (default ``proxy``): the inner rule scores the tokens, the
filter decides which tokens may be chosen at all. Masks come from the *base* model, so the
candidate set is the base's and the pairs only re-rank inside it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..errors import ConfigError
from ..sampling import top_p_filter
from .base import (
    RuleBase,
    is_zero,
    make_rule,
    register,
    require_tokens,
    row_alpha,
    rule_spec,
)
from .context import Request, Rule, Sides, StepContext
from .settings import (
    boolean,
    integer,
    list_of,
    mapping_of,
    number,
    optional,
    setting,
    text,
    token_id,
)

BIAS = 1e6
"""The largest token bias: far past any log-prob, far from float32's overflow."""
NEG_INF = float("-inf")


# -- the formulas ---------------------------------------------------------------------------


def top_k_mask(base: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, V)`` bool: each row's ``k`` most likely base tokens (never a masked one)."""
    k = min(k, base.shape[-1])
    keep = torch.zeros_like(base, dtype=torch.bool)
    keep.scatter_(-1, torch.topk(base, k, dim=-1).indices, True)  # exactly k, ties by index
    return keep & ~torch.isneginf(base)


def plausible_mask(base: torch.Tensor, tau: float = 0.0, top_p: float = 1.0) -> torch.Tensor:
    """``(B, V)`` bool: tokens the base finds plausible (contrastive decoding / DExperts).

    ``p_M(t) >= tau * max_t' p_M(t')`` and ``t`` inside the base's top-``p`` nucleus. The
    base's best token always passes, so the mask is never empty on a row the base can decode.
    """
    keep = torch.ones_like(base, dtype=torch.bool)
    if tau > 0.0:
        best = base.max(dim=-1, keepdim=True).values  # (B, 1)
        keep &= base >= best + math.log(tau)
    if top_p < 1.0:
        keep &= ~torch.isneginf(top_p_filter(base, top_p))
    return keep


def union_mask(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    tau: float,
    on: Sequence[torch.Tensor | None] = (),
) -> torch.Tensor:
    """``(B, V)`` bool: tokens the base *or* any expert finds plausible (:func:`plausible_mask`
    of each model at ``tau``). ``on[i]``: ``(B, 1)`` bool, rows where expert ``i`` has a say
    (``None``: every row).

    >>> b = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    >>> e = torch.log(torch.tensor([[0.1, 0.1, 0.8]]))
    >>> union_mask(b, [e], 0.5)
    tensor([[ True, False,  True]])
    """
    keep = plausible_mask(base, tau)
    for i, expert in enumerate(experts):
        said = plausible_mask(expert, tau)
        gate = on[i] if i < len(on) else None
        keep |= said if gate is None else said & gate
    return keep


def sequence_ends_with(ids: Any, prefix: tuple[int, ...]) -> bool:
    """Whether the generated ``ids`` end with ``prefix`` (the empty prefix always matches)."""
    n = len(prefix)
    return n == 0 or (len(ids) >= n and tuple(ids[-n:]) == prefix)


# -- the rules ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Wrapper(RuleBase):
    """A rule around an ``inner`` rule: runs the models the inner rule runs."""

    inner: Rule = setting(  # noqa: RUF009 (setting() is a dataclasses.field)
        make_rule, "the rule whose scores this one works on", rule_spec, factory=True
    )

    def check(self, request: Request) -> None:
        super().check(request)
        if isinstance(self.inner, RuleBase):
            self.inner.check(request)

    def needs(self, request: Request) -> tuple[Sides, ...]:
        self.check(request)
        return self.inner.needs(request)

    def prepare(self, request: Request) -> Any:
        return self.inner.bind(request)

    def inner_pointwise(self) -> bool:
        """Whether the inner rule is :meth:`~.base.RuleBase.pointwise` (a rule given as a
        plain function never is)."""
        return isinstance(self.inner, RuleBase) and self.inner.pointwise()


@register
@dataclass(frozen=True, kw_only=True)
class Rerank(_Wrapper):
    name = "rerank"
    summary = (
        "Top-k reranking: only the base's k best tokens can be chosen; the inner rule "
        "re-scores them, every other token stays impossible."
    )
    formula = "inner(t) if t in topk_k(p_M) else -inf"
    cost = "the inner rule's, plus a top-k over (B, V)"

    k: int = setting(10, "how many of the base's best tokens stay candidates", integer(1))

    def pointwise(self) -> bool:
        return self.inner_pointwise()  # the mask comes from the base alone

    def candidate_only(self, request: Request) -> bool:
        """Yes where ``k`` is below the vocabulary and the inner rule is pointwise (the
        default, ``proxy``): every token outside the base's top ``k`` is ``-inf``, and inside,
        a per-row constant on a pair model's log-probs shifts the row's scores by one amount,
        which neither the argmax nor the softmax sees. So the pair's logits at the ``k``
        candidates alone (unnormalised) choose the same token."""
        return self.k < request.vocab_size and self.inner_pointwise()

    def candidates(self, base: torch.Tensor) -> torch.Tensor:
        return top_k_mask(base, self.k)

    def step(self, ctx: StepContext, state: Any) -> torch.Tensor:
        scores = state(ctx)
        if self.k >= scores.shape[-1]:
            return scores
        scores = scores.masked_fill(~top_k_mask(ctx.base, self.k), NEG_INF)
        hint = f"the inner rule rules out all of the base's top {self.k} tokens; raise k"
        return require_tokens(scores, self, ctx.step, hint)


@register
@dataclass(frozen=True, kw_only=True)
class Plausible(_Wrapper):
    name = "plausible"
    summary = (
        "Plausibility filter (contrastive decoding, DExperts): keep tokens with base "
        "probability >= tau x the base's best, and/or inside the base's top-p nucleus."
    )
    formula = "inner(t) if p_M(t) >= tau max p_M and t in nucleus_top_p(p_M) else -inf"
    cost = "the inner rule's, plus a max (tau) or a sort (top_p) over (B, V)"

    tau: float = setting(0.1, "keep p_M(t) >= tau * max p_M; 0 turns it off", number(0.0, 1.0))
    top_p: float = setting(
        1.0, "keep the base's top-p nucleus; 1 turns it off", number(0.0, 1.0, lo_open=True)
    )

    def pointwise(self) -> bool:
        return self.inner_pointwise()

    def candidate_only(self, request: Request) -> bool:
        """Yes where a filter is on and the inner rule is pointwise (as for ``rerank``: the
        candidates are the base's plausible tokens: at most ``1 / (tau max p_M)`` of them, few
        where the base is sure, many where it is flat)."""
        filtered = self.tau > 0.0 or self.top_p < 1.0
        return filtered and self.inner_pointwise()

    def candidates(self, base: torch.Tensor) -> torch.Tensor:
        return plausible_mask(base, self.tau, self.top_p)

    def step(self, ctx: StepContext, state: Any) -> torch.Tensor:
        scores = state(ctx)
        if self.tau == 0.0 and self.top_p == 1.0:
            return scores
        scores = scores.masked_fill(~plausible_mask(ctx.base, self.tau, self.top_p), NEG_INF)
        hint = (
            f"the inner rule rules out every token the base finds plausible (tau={self.tau}, "
            f"top_p={self.top_p}); lower tau or raise top_p"
        )
        return require_tokens(scores, self, ctx.step, hint)


@dataclass(frozen=True)
class _UnionState:
    inner: Any
    inner_needs: tuple[Sides, ...]  # what the inner rule reads (it sees only that)


@register
@dataclass(frozen=True, kw_only=True)
class Union(_Wrapper):
    name = "union"
    summary = (
        "Union plausibility mask: keep a token if the base or an expert finds it plausible "
        "(p >= tau x that model's best); the inner rule scores the kept tokens."
    )
    formula = "inner(t) if p_M(t) >= tau max p_M or p_Ei(t) >= tau max p_Ei for some i else -inf"
    cost = "the inner rule's, plus each expert (run even if inner does not read it) and a max"

    tau: float = setting(
        0.1,
        "keep p(t) >= tau * max p of the base or of an expert; 0 keeps every token",
        number(0.0, 1.0),
    )

    def needs(self, request: Request) -> tuple[Sides, ...]:
        inner = super().needs(request)
        return tuple(
            (e or (p.expert and not p.always_off), a)
            for (e, a), p in zip(inner, request.pairs, strict=True)
        )

    def prepare(self, request: Request) -> _UnionState:
        return _UnionState(self.inner.bind(request), tuple(self.inner.needs(request)))

    def step(self, ctx: StepContext, state: _UnionState) -> torch.Tensor:
        seen = tuple(
            (e if ne else None, a if na else None)
            for (e, a), (ne, na) in zip(ctx.pairs, state.inner_needs, strict=True)
        )
        scores = state.inner(replace(ctx, pairs=seen))
        if self.tau == 0.0:
            return scores
        experts, on = [], []
        for (expert, _), alpha in zip(ctx.pairs, ctx.alphas, strict=True):
            if expert is None or is_zero(alpha):  # a pair at alpha 0 has no say
                continue
            experts.append(expert)
            tensor = isinstance(alpha, torch.Tensor)
            on.append(row_alpha(alpha, ctx.rows, ctx.base.device) != 0 if tensor else None)
        scores = scores.masked_fill(~union_mask(ctx.base, experts, self.tau, on), NEG_INF)
        hint = (
            f"the inner rule rules out every token the base or an expert finds plausible "
            f"(tau={self.tau}); lower tau"
        )
        return require_tokens(scores, self, ctx.step, hint)


@dataclass(frozen=True)
class _TokenState:
    inner: Any
    bias: torch.Tensor | None  # (V,) additive bias, -inf for blocked ids
    sequences: tuple[tuple[tuple[int, ...], int, float], ...]  # (prefix, last id, bias)
    allow: torch.Tensor | None  # (V,) bool


@register
@dataclass(frozen=True, kw_only=True)
class Tokens(_Wrapper):
    name = "tokens"
    summary = (
        "Token boosts and blocks: additive biases, block-lists and allow-lists, by id or by "
        "string (expanded to ids with the base tokenizer)."
    )
    formula = "inner(t) + bias(t); -inf if t blocked or not allowed"
    cost = "the inner rule's, plus one (V,) add; strings are tokenized once per request"

    bias: Mapping[int, float] = setting(
        dict, "token id -> additive bias", mapping_of(token_id, number(-BIAS, BIAS)), factory=True
    )
    bias_strings: Mapping[str, float] = setting(
        dict,
        "string -> additive bias on its last token once its other tokens were generated",
        mapping_of(text, number(-BIAS, BIAS)),
        factory=True,
    )
    block: tuple[int, ...] = setting((), "token ids that can never be chosen", list_of(token_id))
    block_strings: tuple[str, ...] = setting(
        (), "strings whose exact tokenization can never be generated", list_of(text)
    )
    allow: tuple[int, ...] | None = setting(
        None, "if set, only these token ids can be chosen", optional(list_of(token_id))
    )
    allow_strings: tuple[str, ...] | None = setting(
        None, "if set, only the tokens of these strings can be chosen", optional(list_of(text))
    )
    allow_eos: bool = setting(True, "with an allow-list, end-of-sequence stays allowed", boolean)

    def pointwise(self) -> bool:
        return self.inner_pointwise()  # biases and lists never read the pairs

    def prepare(self, request: Request) -> _TokenState:
        v = request.vocab_size
        where = self.name

        def check_id(i: int, key: str) -> int:
            if i >= v:
                raise ConfigError(
                    f"{where}.{key}: token id {i} is outside the vocabulary (< {v})",
                    param=f"{where}.{key}",
                )
            return i

        def encode(s: str, key: str) -> tuple[int, ...]:
            if request.tokenizer is None:
                raise ConfigError(
                    f"{where}.{key}: token strings need the base tokenizer", param=f"{where}.{key}"
                )
            ids = tuple(request.tokenizer(s, add_special_tokens=False)["input_ids"])
            if not ids:
                raise ConfigError(
                    f"{where}.{key}: {s!r} tokenizes to no token", param=f"{where}.{key}"
                )
            return tuple(check_id(i, key) for i in ids)

        bias = torch.zeros(v, device=request.device)  # (V,)
        sequences = []
        for i, b in self.bias.items():
            bias[check_id(i, "bias")] += b
        for i in self.block:
            bias[check_id(i, "block")] = NEG_INF
        pushes = [(s, b, "bias_strings") for s, b in self.bias_strings.items()]
        pushes += [(s, NEG_INF, "block_strings") for s in self.block_strings]
        for s, b, key in pushes:
            *prefix, last = encode(s, key)
            if prefix:
                sequences.append((tuple(prefix), last, b))
            else:
                bias[last] = NEG_INF if b == NEG_INF else bias[last] + b
        left = ~torch.isneginf(bias)  # (V,) ids not blocked
        allow = None
        if self.allow is not None or self.allow_strings is not None:
            allow = torch.zeros(v, dtype=torch.bool, device=request.device)  # (V,)
            for i in self.allow or ():
                allow[check_id(i, "allow")] = True
            for s in self.allow_strings or ():
                allow[list(encode(s, "allow_strings"))] = True
            if self.allow_eos:
                allow[[i for i in request.eos_token_ids if i < v]] = True
            left &= allow
        if not bool(left.any()):  # refused here (a 400), not at the first step (a 500)
            what = "the block-list" if allow is None else "the allow-list minus the block-list"
            raise ConfigError(f"{where}: {what} leaves no token to choose", param=where)
        used = bool(bias.any())
        return _TokenState(
            self.inner.bind(request), bias if used else None, tuple(sequences), allow
        )

    def step(self, ctx: StepContext, state: _TokenState) -> torch.Tensor:
        scores = state.inner(ctx)
        if state.bias is not None:
            scores = scores + state.bias.to(scores.device)  # (B, V) + (V,): -inf + b = -inf
        hits = [
            (r, last, b)
            for prefix, last, b in state.sequences
            for r, ids in enumerate(ctx.generated)
            if sequence_ends_with(ids, prefix)
        ]
        if hits:
            scores = scores.clone()  # the inner rule's tensor may be shared (the base's)
            for r, last, b in hits:
                scores[r, last] += b  # -inf for a blocked string
        if state.allow is not None:
            scores = scores.masked_fill(~state.allow.to(scores.device), NEG_INF)
        hint = "allow / block / block_strings rule out every token the inner rule allows"
        return require_tokens(scores, self, ctx.step, hint)
