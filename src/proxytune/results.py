"""What generation returns: per-row results and per-step streaming updates."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the combined distribution, and alternatives."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)
    """``(id, token string, log-prob)`` of the most likely tokens at that step, best first."""


@dataclass(frozen=True)
class StepUpdate:
    """One new token of one row, for streaming."""

    row: int
    prompt_index: int
    sample_index: int
    token_id: int
    delta: str
    """Text that became safe to show with this token (may be empty)."""
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None
    """``"stop"`` (EOS or stop string) or ``"length"`` once the row is done, else ``None``."""
    stop_reason: str | int | None = None
    """The stop string or EOS id that ended the row, if any."""


@dataclass
class GenerationResult:
    """One finished sequence."""

    text: str
    token_ids: list[int]
    """The generated ids only (an EOS that ended the row included)."""
    finish_reason: str
    prompt_tokens: int
    """Length of the base model's prompt in tokens."""
    completion_tokens: int
    prompt_index: int = 0
    sample_index: int = 0
    stop_reason: str | int | None = None
    """The stop string or EOS id that ended the row, if any."""
    logprobs: list[TokenLogprob] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
