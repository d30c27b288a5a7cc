"""Decoding settings, validated once, up front."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class GenerationConfig:
    """Everything that controls one ``generate`` call. Defaults: greedy, 128 new tokens."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    """0 means greedy decoding; otherwise sample from ``softmax(scores / temperature)``."""
    top_k: int = 0
    """Keep the k best tokens (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    min_p: float = 0.0
    """Drop tokens below ``min_p`` x the best token's probability (0 = off)."""
    repetition_penalty: float = 1.0
    """> 1 raises the probability of already-seen tokens to this power (1 = off)."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    """Stop strings: a row finishes when its text contains one; the text is cut before it."""
    seed: int | None = None
    """Seed for sampling; the same seed gives the same output, batched or not."""
    n: int = 1
    """Samples per prompt."""
    logprobs: bool = False
    """Return each generated token's log-probability under the combined distribution."""
    top_logprobs: int = 0
    """With ``logprobs``, also return this many most likely alternatives per step."""
    eos_token_ids: tuple[int, ...] | None = None
    """Ids that end a row; default: the end-of-sequence ids of every model in the set."""
    ignore_eos: bool = False
    use_cache: bool = True
    """KV caches on (off recomputes every model on the full sequence each step)."""

    def __post_init__(self) -> None:
        _require_int(self.max_new_tokens, "max_new_tokens", 1)
        _require_int(self.n, "n", 1)
        _require_int(self.top_k, "top_k", 0)
        _require_int(self.top_logprobs, "top_logprobs", 0)
        _require_number(self.temperature, "temperature")
        if self.temperature < 0:
            raise ConfigError(
                f"temperature must be >= 0 (0 = greedy), got {self.temperature}; "
                "use temperature=0 for greedy decoding"
            )
        _require_number(self.top_p, "top_p")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}; 1 turns it off")
        _require_number(self.min_p, "min_p")
        if not 0.0 <= self.min_p < 1.0:
            raise ConfigError(f"min_p must be in [0, 1), got {self.min_p}; 0 turns it off")
        _require_number(self.repetition_penalty, "repetition_penalty")
        if self.repetition_penalty <= 0:
            raise ConfigError(
                f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}"
            )
        _require_number(self.presence_penalty, "presence_penalty")
        _require_number(self.frequency_penalty, "frequency_penalty")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ConfigError(f"seed must be an integer or None, got {self.seed!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        stop = tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ConfigError(f"stop strings must be non-empty strings, got {stop!r}")
        object.__setattr__(self, "stop", stop)
        if self.eos_token_ids is not None:
            object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        """Whether a penalty reads each row's history (prompt and generated ids)."""
        return bool(
            self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty
        )

    def sampling(self) -> dict[str, float | int]:
        """The settings of :func:`~proxytune.sampling.next_tokens` and
        :func:`~proxytune.sampling.shape_scores` (without history and generators)."""
        return {
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }

    def updated(self, **overrides: Any) -> GenerationConfig:
        """A copy with ``overrides`` applied; ``None`` values are ignored; unknown keys refused."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(
                f"unknown generation setting(s) {unknown}; known settings: {sorted(known)}"
            )
        clean = {k: v for k, v in overrides.items() if v is not None}
        if isinstance(clean.get("stop"), Sequence) and not isinstance(clean["stop"], str):
            clean["stop"] = tuple(clean["stop"])
        return replace(self, **clean)


def _require_number(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")


def _require_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


DEFAULT_CONFIG = GenerationConfig()
__all__ = ["DEFAULT_CONFIG", "GenerationConfig"]
