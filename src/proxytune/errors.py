"""Errors that name the problem and the fix."""

from __future__ import annotations


class ProxyTuneError(Exception):
    """Base class for every error proxytune raises on bad input or bad state."""


class ConfigError(ProxyTuneError, ValueError):
    """A setting is out of range or inconsistent (alpha, temperature, top_p, ...).

    ``param``: the setting it is about where there is one (``temperature``, ``alpha[1]``,
    ``rule.tau``, ``prompt``), for a caller that points at it (the server's 400 names it)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelLoadError(ProxyTuneError):
    """A model or tokenizer could not be found or loaded."""


class VocabularyMismatchError(ProxyTuneError):
    """The models' tokenizers do not define the same tokens."""


class PromptTooLongError(ProxyTuneError, ValueError):
    """A prompt does not fit in a model's context window."""


class NumericalError(ProxyTuneError, FloatingPointError):
    """A model produced NaN or infinite logits."""


class EmbeddedModelError(ProxyTuneError):
    """The embedded default models could not be fetched, verified or converted."""
