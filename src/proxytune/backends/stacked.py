"""Roles that share one loaded model, stacked into one forward pass per step.

The embedded default's expert and anti-expert are the same 0.5B model reading two prompts.
Run one after the other, its weights are read twice per token; stacked, the ``B`` expert rows
and the ``B`` anti-expert rows form one batch::

    (B, k) ids -> one forward on (2B, k) -> (B, k, W) logits for each role

>>> tuner = ProxyTuner.from_recipe("default").with_options(stacked=True)  # doctest: +SKIP

The decode loop needs no change. Each role keeps its own :class:`StackedState` and calls
``advance``/``keep``/``rollback`` as usual; the first role of a group to call an operation runs
it for the whole group, the others collect their part. That works because proxy-tuning drives
every role in lockstep (same new ids, same rows kept); a role that drifts raises
:class:`LockstepError`. Roles group when they start one after the other with the same number
of rows before any of them ran (as the loop starts them). A state started on its own (a lone
role, or the speculative drafter through :meth:`StackedView.start_alone`) runs alone on the same
weights. Not for the server's continuous batching (no ``extend``).
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from .hf import HFDecodeState, HFModel
from .lockstep import Lockstep, LockstepError

__all__ = ["LockstepError", "StackHost", "StackedState", "StackedView", "stack_shared"]

MAX_LAG = 4
"""Operations one role may run ahead of another in its group before that is an error."""


class _Group(Lockstep):
    """The rows of several roles in one :class:`HFDecodeState`: role 0's rows, then role 1's..."""

    def __init__(self, state: HFDecodeState) -> None:
        super().__init__(1, MAX_LAG, "a stacked group", "do not stack them")
        self.merged = state
        self.rows = state.ids.shape[0]  # per role

    def joinable(self, state: HFDecodeState) -> bool:
        return (
            not self.ran
            and state.ids.shape[0] == self.rows
            and (state.cache is None) == (self.merged.cache is None)
            and state.can_extend
            and self.merged.can_extend
        )

    def join(self, state: HFDecodeState) -> int:
        self.merged.extend(state)
        return self.add_role()

    def _advance(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        n = len(self.pending)
        tokens = tokens.to(self.merged.ids.device).view(self.rows, -1)
        out = self.merged.advance(tokens.repeat(n, 1))  # (n*B, k, W)
        return list(out.split(self.rows))

    def _keep(self, rows: torch.Tensor) -> list[None]:
        rows = rows.to(self.merged.ids.device)
        n = len(self.pending)
        self.merged.keep(torch.cat([rows + m * self.rows for m in range(n)]))
        self.rows = rows.numel()
        return [None] * n

    def _rollback(self, drop: torch.Tensor) -> list[None]:
        n = len(self.pending)
        self.merged.rollback(torch.as_tensor(drop).view(-1).repeat(n))
        return [None] * n


class StackedState:
    """One role's rows in a :class:`_Group` (a :class:`~proxytune.backends.base.RollbackState`)."""

    def __init__(self, group: _Group, member: int) -> None:
        self.group, self.member = group, member

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.group.call(self.member, "advance", tokens)

    def keep(self, rows: torch.Tensor) -> None:
        self.group.call(self.member, "keep", rows)

    def rollback(self, drop: torch.Tensor) -> None:
        self.group.call(self.member, "rollback", torch.as_tensor(drop))


class StackHost:
    """One loaded model shared by several roles; groups the states they start."""

    def __init__(self, lm: HFModel) -> None:
        self.lm = lm
        self._open: weakref.ref[_Group] | None = None  # the latest group no one has run yet

    def start(
        self, prompts: Sequence[Sequence[int]], use_cache: bool = True
    ) -> tuple[StackedState, torch.Tensor]:
        state, logits = self.lm.start(prompts, use_cache=use_cache)
        group = self._open() if self._open is not None else None
        if group is not None and group.joinable(state):
            return StackedState(group, group.join(state)), logits
        group = _Group(state)
        self._open = weakref.ref(group)
        return StackedState(group, 0), logits


class StackedView:
    """A role's :class:`~proxytune.backends.base.LogitsModel` on a :class:`StackHost`."""

    def __init__(self, host: StackHost) -> None:
        self.host = host
        self.name = f"{host.lm.name} (stacked)"

    @property
    def tokenizer(self) -> Any:
        return self.host.lm.tokenizer

    @property
    def device(self) -> torch.device:
        return self.host.lm.device

    @property
    def model(self) -> Any:
        """The underlying ``transformers`` model."""
        return self.host.lm.model

    @property
    def shared_weights(self) -> HFModel:
        """The model every role of this host runs on (:class:`~.base.SharesWeights`)."""
        return self.host.lm

    @property
    def weight_bytes(self) -> int:
        """Bytes of the shared model's weights (:class:`~.base.KnowsWeightBytes`)."""
        return self.host.lm.weight_bytes

    @property
    def vocab_width(self) -> int:
        return self.host.lm.vocab_width

    @property
    def context_length(self) -> int | None:
        return self.host.lm.context_length

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.host.lm.eos_token_ids

    def start(
        self, prompts: Sequence[Sequence[int]], use_cache: bool = True
    ) -> tuple[StackedState, torch.Tensor]:
        return self.host.start(prompts, use_cache=use_cache)

    def start_alone(
        self, prompts: Sequence[Sequence[int]], use_cache: bool = True
    ) -> tuple[HFDecodeState, torch.Tensor]:
        """A state that never joins a group (it will not move in lockstep with the others)."""
        return self.host.lm.start(prompts, use_cache=use_cache)


def stack_shared(models: Sequence[Any]) -> list[Any]:
    """``models`` (one per role, in role order) with every model that serves two or more roles
    replaced by :class:`StackedView` s of one :class:`StackHost`, so that those roles run in one
    forward pass. Only :class:`~proxytune.backends.hf.HFModel` models are stacked; the rest are
    returned as they are."""
    counts = Counter(id(m) for m in models)
    hosts: dict[int, StackHost] = {}

    def wrap(model: Any) -> Any:
        if counts[id(model)] < 2 or type(model) is not HFModel:
            return model
        return StackedView(hosts.setdefault(id(model), StackHost(model)))

    return [wrap(m) for m in models]
