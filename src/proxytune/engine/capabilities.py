"""The one place where the engine asks what a backend can do (optional protocols of
:mod:`proxytune.backends.base`) and refuses, with the fix, what it cannot."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..backends.base import (
    DecodeState,
    ExtendableState,
    RollbackState,
    StartsAlone,
    TopKOnly,
)
from ..errors import ConfigError
from .members import Member


def is_top_k_only(model: Any) -> bool:
    """Whether ``model`` gives only top-k log-probs (an API base)."""
    return isinstance(model, TopKOnly) and bool(model.top_k_only)


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
