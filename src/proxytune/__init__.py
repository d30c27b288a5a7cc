"""proxytune: decoding-time tuning of large language models.

``scores = log p_base + sum_i alpha_i * (log p_expert_i - log p_anti_expert_i)``

Heavy libraries (``transformers``) load only when a model does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import EngineOptions, GenerationConfig
from .errors import (
    ConfigError,
    EmbeddedModelError,
    ModelLoadError,
    NumericalError,
    PromptTooLongError,
    ProxyTuneError,
    VocabularyMismatchError,
)
from .prompts import PromptFormat
from .results import GenerationResult, StepUpdate, TokenLogprob
from .schedules import Constant, Linear
from .specs import ModelSpec

if TYPE_CHECKING:  # type checkers see the class; at run time it loads (with torch) on first use
    from .tuner import ProxyTuner

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    if name == "ProxyTuner":
        # lazy: torch, only on first use (`import proxytune` stays light)
        from .tuner import ProxyTuner

        return ProxyTuner
    raise AttributeError(f"module 'proxytune' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "Constant",
    "EmbeddedModelError",
    "EngineOptions",
    "GenerationConfig",
    "GenerationResult",
    "Linear",
    "ModelLoadError",
    "ModelSpec",
    "NumericalError",
    "PromptFormat",
    "PromptTooLongError",
    "ProxyTuneError",
    "ProxyTuner",
    "StepUpdate",
    "TokenLogprob",
    "VocabularyMismatchError",
]
