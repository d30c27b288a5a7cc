"""Decoding settings, validated once, up front."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .errors import ConfigError

MIN_TEMPERATURE = 1e-4
"""The smallest positive temperature (``scores / temperature`` must stay finite)."""


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
                "use temperature=0 for greedy decoding",
                param="temperature",
            )
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise ConfigError(
                f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got "
                f"{self.temperature!r}: a smaller one overflows the scores; use temperature=0 "
                "for greedy decoding",
                param="temperature",
            )
        _require_number(self.top_p, "top_p")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(
                f"top_p must be in (0, 1], got {self.top_p}; 1 turns it off", param="top_p"
            )
        _require_number(self.min_p, "min_p")
        if not 0.0 <= self.min_p < 1.0:
            raise ConfigError(
                f"min_p must be in [0, 1), got {self.min_p}; 0 turns it off", param="min_p"
            )
        _require_number(self.repetition_penalty, "repetition_penalty")
        if self.repetition_penalty <= 0:
            raise ConfigError(
                f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}",
                param="repetition_penalty",
            )
        _require_number(self.presence_penalty, "presence_penalty")
        _require_number(self.frequency_penalty, "frequency_penalty")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ConfigError(f"seed must be an integer or None, got {self.seed!r}", param="seed")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        stop = tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ConfigError(f"stop strings must be non-empty strings, got {stop!r}", param="stop")
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
        raise ConfigError(f"{name} must be a finite number, got {value!r}", param=name)


def _require_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}", param=name)


AUTO_DRAFT = "auto"


def parse_draft_length(value: int | str) -> int | str:
    """A speculative draft length as given by a user: an integer >= 1 (``"4"`` too) or
    ``"auto"``."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == AUTO_DRAFT:
            return AUTO_DRAFT
        if text.isdigit():
            value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"speculative must be a draft length >= 1 or 'auto', got {value!r}; "
            "leave it unset (or 0 on the command line) for the plain loop"
        )
    return value


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs the models: speed features that leave the output as it is.

    The one place to turn them on, from Python (``ProxyTuner(..., options=...)``,
    :meth:`~proxytune.tuner.ProxyTuner.with_options`), a recipe's ``engine:`` mapping, the
    command line (``--overlap``, ``--speculative``, ``--stacked``, ``--prefix-cache``,
    ``--one-pass/--two-pass``; ``--candidates/--no-candidates`` on ``generate`` and ``eval``) and
    the server (the same flags). ``candidates`` keeps the tokens but not every bit of a
    log-prob (the pair's logits at the candidates agree with llama.cpp's to about 1e-6).

    >>> EngineOptions.parse({"overlap": True, "speculative": "4"})  # doctest: +NORMALIZE_WHITESPACE
    EngineOptions(overlap=True, speculative=4, stacked=False, prefix_cache=False,
                  prefix_min_tokens=16, one_pass=True, candidates=True)
    """

    overlap: bool = False
    """Run the forwards of models on different weights at once (:mod:`proxytune.engine.overlap`)."""
    speculative: int | str | None = None
    """Speculative proxy decoding: a draft length or ``"auto"``; ``None`` (or 0): off."""
    stacked: bool = False
    """Roles that share one loaded model run in one forward (:mod:`~.backends.stacked`)."""
    prefix_cache: bool = False
    """Prefill repeated prompt prefixes once per model (:mod:`~.backends.prefix`)."""
    prefix_min_tokens: int = 16
    """The shortest shared prefix worth caching (with ``prefix_cache``)."""
    one_pass: bool = True
    """A LoRA expert of its anti-expert's model runs in the same forward
    (:mod:`~.backends.lora_pair`); applies when models load."""
    candidates: bool = True
    """Where the rule only re-ranks the base's candidates (``rerank``, ``plausible``), score
    the pair at the candidates only on models that can (llama.cpp); the plain loop only (not
    speculative decoding, the server's running batch or the black-box loop)."""

    def __post_init__(self) -> None:
        for name in ("overlap", "stacked", "prefix_cache", "one_pass", "candidates"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"engine option {name!r} must be true or false, got {getattr(self, name)!r}"
                )
        _require_int(self.prefix_min_tokens, "prefix_min_tokens", 1)
        if self.stacked and self.prefix_cache:
            raise ConfigError(
                "engine options stacked and prefix_cache do not compose (each wraps the "
                "shared model its own way); choose one"
            )
        draft = self.speculative
        if draft in (0, "0", "", False):
            draft = None
        draft = None if draft is None else parse_draft_length(draft)
        object.__setattr__(self, "speculative", draft)

    @classmethod
    def parse(cls, value: EngineOptions | Mapping[str, Any] | None) -> EngineOptions:
        """Options from a mapping (a recipe's ``engine:``), an instance, or ``None``."""
        if value is None:
            return cls()
        if isinstance(value, EngineOptions):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"engine options must be a mapping, got {value!r}")
        return cls().updated(**value)

    def updated(self, **changes: Any) -> EngineOptions:
        """A copy with ``changes`` applied; ``None`` values are ignored; unknown keys refused."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown engine option(s) {unknown}; known: {sorted(known)}")
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def wraps_models(self) -> tuple[bool, bool, int]:
        """What changes the loaded models' wrappers (``stacked``, ``prefix_cache`` and its
        length): options equal here run on the same model objects."""
        return (self.stacked, self.prefix_cache, self.prefix_min_tokens)


DEFAULT_CONFIG = GenerationConfig()
__all__ = ["DEFAULT_CONFIG", "EngineOptions", "GenerationConfig", "parse_draft_length"]
