"""The seam between the decode loop and a model: full next-token logits, with a cache.

A backend turns token ids into logits; it never sees text, alphas or sampling. The loop
keeps one :class:`DecodeState` per model role, so two roles may share one set of weights
(the expert and anti-expert of the prompt-based set-up) while each keeps its own cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class DecodeState(Protocol):
    """A batch of sequences in flight on one model."""

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``(B, k)`` ids to every row; return the logits at those ``k`` positions,
        ``(B, k, W)`` in float32 on the model's device."""
        ...

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices into the current batch), in that order."""
        ...


@runtime_checkable
class RollbackState(DecodeState, Protocol):
    """A :class:`DecodeState` that can forget its last ids (speculative decoding's rejected
    drafts). Optional: the plain decode loop never calls it."""

    def rollback(self, drop: torch.Tensor) -> None:
        """Forget the last ``drop[r]`` ids of each row ``r`` (``(B,)`` ints >= 0), as if they had
        never been advanced: the next :meth:`advance` continues from what is left."""
        ...


@runtime_checkable
class LogitsModel(Protocol):
    """A causal LM that exposes full next-token logits (local weights)."""

    name: str
    tokenizer: Any
    device: torch.device

    @property
    def vocab_width(self) -> int:
        """Width ``W`` of the logits (lm_head rows, padding included)."""
        ...

    @property
    def context_length(self) -> int | None:
        """Most positions the model accepts, if known."""
        ...

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end a sequence for this model."""
        ...

    def start(
        self, prompts: Sequence[Sequence[int]], use_cache: bool = True
    ) -> tuple[DecodeState, torch.Tensor]:
        """Prefill ``prompts`` (ragged); return the state and last-position logits ``(B, W)``."""
        ...
