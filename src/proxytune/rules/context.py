"""The seam between the decode loop and a steering rule.

Each step the loop hands the rule a :class:`StepContext` (every model's ``(B, V)`` log-probs,
the alphas, the step, which prompt each live row answers and what it generated so far) and
gets back ``(B, V)`` scores; ``softmax(scores)`` is the distribution that sampling draws from.

Before the first step the loop calls :meth:`Rule.needs` (which models to run at all) and
:meth:`Rule.bind` (per-request work: token strings -> ids, per-prompt alphas, a reward model)
once, with a :class:`Request`; the bound :data:`Combiner` then runs every step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from ..arithmetic import Alpha, PairLogprobs
from ..prompts import Prompt

Sides = tuple[bool, bool]
"""``(expert, anti-expert)``: which side of a pair a rule reads."""


@dataclass(frozen=True)
class PairInfo:
    """What a rule may know about a pair before any model runs."""

    expert: bool = True
    anti_expert: bool = True
    always_off: bool = False
    """Its alpha is a constant 0: under most rules it cannot change anything."""
    alpha_range: tuple[float, float] | None = None
    """The lowest and highest alpha it takes over the steps (``None``: unknown, a function)."""


@dataclass(frozen=True)
class Request:
    """What is fixed for a whole request: prompts, the model set, the base tokenizer."""

    prompts: tuple[Prompt, ...] = ()
    pairs: tuple[PairInfo, ...] = ()
    vocab_size: int = 0
    tokenizer: Any = None
    """The base tokenizer: turns token strings into ids and generated ids into text."""
    eos_token_ids: tuple[int, ...] = ()
    device: torch.device | None = None
    """Where the scores will live (per-request tensors are built there)."""

    @classmethod
    def infer(cls, ctx: StepContext) -> Request:
        """A request that matches ``ctx`` (for calling a rule directly on tensors)."""
        pairs = tuple(PairInfo(e is not None, a is not None) for e, a in ctx.pairs)
        n_prompts = max(ctx.prompt_index, default=0) + 1
        return cls(("",) * n_prompts, pairs, ctx.base.shape[-1], device=ctx.base.device)


@dataclass(frozen=True)
class StepContext:
    """Everything a rule sees at one step, for the ``B`` live rows (read-only)."""

    base: torch.Tensor
    """``(B, V)`` float32 log-probs of the base model."""
    pairs: tuple[PairLogprobs, ...] = ()
    """Per pair: ``(expert, anti-expert)`` ``(B, V)`` log-probs; ``None`` where not run."""
    alphas: tuple[Alpha, ...] = ()
    """Per pair: a float, or a ``(B, 1)`` tensor for a per-row alpha."""
    step: int = 0
    prompt_index: tuple[int, ...] = ()
    """``(B,)``: the prompt each row answers (rows drop out as they finish). Default: all 0."""
    generated: Sequence[Sequence[int]] = ()
    """``(B,)``: the ids each row generated before this step. Default: none."""

    def __post_init__(self) -> None:
        rows = self.base.shape[0]
        object.__setattr__(self, "pairs", tuple(self.pairs))
        object.__setattr__(self, "alphas", tuple(self.alphas))
        if len(self.pairs) != len(self.alphas):
            raise ValueError(f"{len(self.pairs)} pairs but {len(self.alphas)} alphas")
        if not self.prompt_index:
            object.__setattr__(self, "prompt_index", (0,) * rows)
        if not self.generated:
            object.__setattr__(self, "generated", ((),) * rows)

    @property
    def rows(self) -> int:
        return self.base.shape[0]

    def ran(self) -> tuple[list[PairLogprobs], list[Alpha]]:
        """The pairs the loop ran and their alphas (a pair the rule does not read is dropped).

        >>> combine_proxy(ctx.base, *ctx.ran())  # doctest: +SKIP
        """
        keep = [i for i, (e, a) in enumerate(self.pairs) if e is not None or a is not None]
        return [self.pairs[i] for i in keep], [self.alphas[i] for i in keep]


Combiner = Callable[[StepContext], torch.Tensor]
"""What the decode loop calls each step: ``StepContext -> (B, V)`` scores."""


@runtime_checkable
class Rule(Protocol):
    """A steering rule: says which models it reads, and binds to one request."""

    def needs(self, request: Request) -> tuple[Sides, ...]:
        """Per pair, which of ``(expert, anti-expert)`` the loop must run for this rule."""
        ...

    def bind(self, request: Request) -> Combiner:
        """Validate against the model set, do per-request work, return the step function."""
        ...


@runtime_checkable
class CandidateCombiner(Protocol):
    """A bound rule that can name, at each step, the only tokens it may choose (from the
    base alone: ``rerank``, ``plausible``). Where ``candidate_only`` holds, the loop may give
    it each pair model's log-probs over the candidates of the step only (renormalised over
    them, ``-inf`` elsewhere): its choice is the same (:meth:`RuleBase.candidate_only
    <proxytune.rules.base.RuleBase.candidate_only>`)."""

    candidate_only: bool

    def candidates(self, base: torch.Tensor) -> torch.Tensor:
        """``(B, V)`` bool from the base's ``(B, V)`` log-probs."""
        ...


@dataclass(frozen=True)
class TopKContext(StepContext):
    """A :class:`StepContext` whose base is known only in part.

    ``base`` is still a full ``(B, V)`` row (the missing-mass rule fills it in), so every
    rule runs unchanged; a rule that cares can read what was estimated.
    """

    base_known: torch.Tensor | None = None
    """``(B, V)`` bool: tokens whose base log-prob the endpoint returned; ``None``: all."""
    support: torch.Tensor | None = None
    """``(B, V)`` bool: the tokens this step may choose (``None``: every token)."""
    coverage: torch.Tensor | None = None
    """``(B,)``: the share of the base's mass that mapped to ids / got a pair value."""

    @property
    def base_top_k(self) -> bool:
        """True when the base's row is partly estimated (an API base with ``k < V``)."""
        return self.base_known is not None and not bool(self.base_known.all())
