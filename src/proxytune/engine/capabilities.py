"""The one place where the engine asks what a backend can do (optional protocols of
:mod:`proxytune.backends.base`) and refuses, with the fix, what it cannot."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..backends.base import (
    CandidateScoring,
    DecodeState,
    ExtendableState,
    HiddenState,
    KnowsWeightBytes,
    RollbackState,
    StartsAlone,
    TopKOnly,
)
from ..errors import ConfigError
from ..rules import CandidateCombiner, Combiner
from .members import Member


def is_top_k_only(model: Any) -> bool:
    """Whether ``model`` gives only top-k log-probs (an API base)."""
    return isinstance(model, TopKOnly) and bool(model.top_k_only)


def weight_size(model: Any) -> float:
    """Bytes of weights a decoding forward of ``model`` reads (the draft cost ratio); 1 where
    the model does not say (:class:`~proxytune.backends.base.KnowsWeightBytes`)."""
    if not isinstance(model, KnowsWeightBytes):
        return 1.0
    return float(model.weight_bytes) or 1.0


def can_extend(state: DecodeState) -> bool:
    """Whether rows can join ``state`` now (continuous batching)."""
    return isinstance(state, ExtendableState) and bool(state.can_extend)


def compact(state: DecodeState) -> None:
    """Free the space of dropped rows, where the state can."""
    if isinstance(state, ExtendableState):
        state.compact()


def start_alone(
    member: Member, prompts: Sequence[Sequence[int]], use_cache: bool
) -> tuple[DecodeState, torch.Tensor]:
    """Start ``member`` on a state of its own (never grouped with another role's)."""
    if isinstance(member.model, StartsAlone):
        return member.model.start_alone(prompts, use_cache=use_cache)
    return member.model.start(prompts, use_cache=use_cache)


def require_rollback(states: dict[str, DecodeState], members: Sequence[Member]) -> None:
    """Refuse speculative decoding on a model whose states cannot roll back."""
    for m in members:
        if not isinstance(states[m.role], RollbackState):
            raise ConfigError(
                f"speculative decoding rolls every model back to the accepted drafts, and "
                f"the {m.role} ({m.model.name}) cannot: its decode state has no rollback() "
                "(a model of your own behind the LogitsModel protocol must implement "
                "RollbackState.rollback; otherwise decode without speculative)"
            )


def rollback(state: DecodeState, drop: torch.Tensor) -> None:
    """Forget the last ``drop[r]`` ids of each row (checked by :func:`require_rollback`)."""
    assert isinstance(state, RollbackState)
    state.rollback(drop)


def candidate_roles(combine: Combiner, pair_members: Sequence[Member]) -> frozenset[str]:
    """The pair roles to run on candidates only: none unless the bound rule re-ranks the
    base's candidates (:class:`~proxytune.rules.CandidateCombiner`), then every member whose
    model can score chosen ids (:class:`~proxytune.backends.base.CandidateScoring`)."""
    if not (isinstance(combine, CandidateCombiner) and combine.candidate_only):
        return frozenset()
    return frozenset(
        m.role
        for m in pair_members
        if isinstance(m.model, CandidateScoring) and m.model.scores_candidates
    )


def start_member(
    member: Member, prompts: Sequence[Sequence[int]], use_cache: bool, hidden: bool
) -> tuple[DecodeState, torch.Tensor]:
    """Start ``member``, on hidden states where ``hidden`` (and the model can now)."""
    if hidden:
        assert isinstance(member.model, CandidateScoring)
        return member.model.start_hidden(prompts, use_cache=use_cache)
    return member.model.start(prompts, use_cache=use_cache)


def returns_hidden(state: DecodeState) -> bool:
    """Whether ``state`` returns hidden states instead of logits."""
    return isinstance(state, HiddenState) and bool(state.hidden)


def candidate_logits(member: Member, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``member``'s ``(B, n)`` logits at ``ids`` from its ``(B, H)`` hidden states."""
    assert isinstance(member.model, CandidateScoring)
    return member.model.candidate_logits(hidden, ids)
