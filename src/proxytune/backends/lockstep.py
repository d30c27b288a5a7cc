"""Roles on one set of weights, driven in lockstep: each operation runs once for all of them.

Proxy-tuning drives every role with the same new ids and keeps the same rows in each. Where
several roles run on one model (roles stacked on one transformers model,
:mod:`.stacked`; the two halves of a one-pass LoRA pair, :mod:`.lora_pair`) their rows form
one batch, and the first role to ask for an operation runs it for the whole batch; the others
find their part waiting in their queue. A role whose call differs from the one run for it, or
that falls ``max_lag`` operations behind, raises :class:`LockstepError`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ProxyTuneError

__all__ = ["Lockstep", "LockstepError", "same_call"]


class LockstepError(ProxyTuneError, RuntimeError):
    """Roles sharing one batch were driven apart (different ids or rows)."""


class Lockstep:
    """One batch that several roles drive: :meth:`call` runs an operation once, when the first
    role asks, and queues each other role's part of the result.

    Subclasses implement each operation ``op`` as ``_op(arg)``, returning one part per role;
    :meth:`run` may wrap them (a lock, per-row adapters). ``name`` and ``otherwise`` word the
    errors ("one role of {name} ran ahead ...; ..., or {otherwise}")."""

    def __init__(self, roles: int, max_lag: int, name: str, otherwise: str) -> None:
        self.pending: list[deque[tuple[str, Any, Any]]] = [deque() for _ in range(roles)]
        self.max_lag = max_lag
        self.name = name
        self.otherwise = otherwise
        self.ran = False
        """Whether any operation ran (after that, no role joins)."""

    def add_role(self) -> int:
        """One more role on the batch (its rows already merged); its index."""
        self.pending.append(deque())
        return len(self.pending) - 1

    def call(self, role: int, op: str, arg: Any) -> Any:
        """``role``'s part of ``op(arg)``: run now for every role, or the part queued for it."""
        self.ran = True
        mine = self.pending[role]
        if mine:
            want_op, want_arg, result = mine.popleft()
            if want_op != op or not same_call(want_arg, arg):
                raise LockstepError(
                    f"the roles of {self.name} got different {op} calls; drive them with the "
                    f"same ids and rows (as proxy-tuning does), or {self.otherwise}"
                )
            return result
        if any(len(q) >= self.max_lag for q in self.pending):
            raise LockstepError(
                f"one role of {self.name} ran ahead of the others; advance them in lockstep, "
                f"or {self.otherwise}"
            )
        parts = self.run(op, arg)
        for other, queue in enumerate(self.pending):
            if other != role:
                queue.append((op, arg, parts[other]))
        return parts[role]

    def run(self, op: str, arg: Any) -> Sequence[Any]:
        """Every role's part of ``op(arg)``, computed once."""
        return getattr(self, "_" + op)(arg)


def same_call(a: Any, b: Any) -> bool:
    """Whether two roles' arguments of one operation agree: equal tensors, or the same
    object (states compare by their ``lockstep_key`` where they have one)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a is b or (a.shape == b.shape and torch.equal(a.cpu(), b.cpu()))
    return getattr(a, "lockstep_key", a) is getattr(b, "lockstep_key", b)
