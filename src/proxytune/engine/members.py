"""Who takes part in a decode: models in roles, and the expert/anti-expert pairs."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..backends.base import LogitsModel
from ..errors import ConfigError
from ..prompts import PromptFormat
from ..rules import PairInfo
from ..schedules import Constant, Schedule, alpha_range


@dataclass(frozen=True)
class Member:
    """A model in a role (base, expert or anti-expert) with the prompt format of that role."""

    role: str
    model: LogitsModel
    prompt: PromptFormat = field(default_factory=PromptFormat)


@dataclass(frozen=True)
class Pair:
    """An expert/anti-expert pair and its alpha schedule. One side may be ``None``."""

    expert: Member | None = None
    anti_expert: Member | None = None
    alpha: Schedule = field(default_factory=lambda: Constant(1.0))
    name: str | None = None
    """What the server's pairs admin API and per-pair metrics call it (``None``: its index)."""

    def __post_init__(self) -> None:
        if self.expert is None and self.anti_expert is None:
            raise ConfigError("a pair needs an expert, an anti-expert, or both")

    @property
    def members(self) -> list[Member]:
        return [m for m in (self.expert, self.anti_expert) if m is not None]

    @property
    def always_off(self) -> bool:
        """A constant zero alpha: under most rules the pair cannot change anything."""
        return isinstance(self.alpha, Constant) and self.alpha.alpha == 0.0

    @property
    def info(self) -> PairInfo:
        """What a rule may know about this pair before any model runs."""
        return PairInfo(
            self.expert is not None,
            self.anti_expert is not None,
            self.always_off,
            alpha_range(self.alpha),
        )
