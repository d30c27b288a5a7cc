"""Per-request steering controls: ``alpha``, ``active_pairs`` and ``rule``, validated.

Every error is a :class:`~proxytune.errors.ConfigError` that names the field it is about in
its message (``alpha[1] must be a number ...``) and its ``param`` (``alpha[1]``), which the
server's 400 points at.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from ..config import EngineOptions, GenerationConfig
from ..errors import ConfigError
from ..prompts import Prompt
from ..rules import Rule
from ..rules.base import check_rule_size
from ..schedules import MAX_ABS_ALPHA, Constant, Schedule, as_schedule
from .members import Member, Pair
from .prepare import Prepared, prepare


def request_alphas(
    pairs: Sequence[Pair],
    alpha: Any = None,
    active_pairs: Sequence[int] | None = None,
) -> tuple[list[Schedule], list[bool]]:
    """Each pair's alpha schedule for one request, and whether the pair may run at all.

    ``alpha``: ``None`` (the pairs' own), one number or schedule mapping for every pair, or a
    list with one per pair. ``active_pairs``: indices of the pairs to run (``None``: all); a
    switched-off pair gets alpha 0 and never runs, whatever the rule.
    """
    if alpha is not None and not pairs:
        raise ConfigError(
            "alpha was given but this model has no expert/anti-expert pair", param="alpha"
        )
    if alpha is None:
        schedules = [p.alpha for p in pairs]
    elif isinstance(alpha, (list, tuple)):
        if len(alpha) != len(pairs):
            raise ConfigError(
                f"alpha: {len(alpha)} values given for {len(pairs)} pair(s)", param="alpha"
            )
        schedules = [_user_alpha(a, f"alpha[{i}]") for i, a in enumerate(alpha)]
    else:
        schedules = [_user_alpha(alpha, "alpha")] * len(pairs)
    active = [True] * len(pairs)
    if active_pairs is not None:
        for i in active_pairs:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(pairs):
                raise ConfigError(
                    f"active_pairs: {i!r} is not a pair index; this model has {len(pairs)} "
                    f"pair(s), indices 0..{len(pairs) - 1}",
                    param="active_pairs",
                )
        active = [i in set(active_pairs) for i in range(len(pairs))]
    schedules = [s if on else Constant(0.0) for s, on in zip(schedules, active, strict=True)]
    return schedules, active


def _user_alpha(value: Any, where: str) -> Schedule:
    """A request's alpha: a number or a schedule mapping, within +-``MAX_ABS_ALPHA``."""
    if not isinstance(value, (int, float, Mapping)):
        raise ConfigError(
            f"{where} must be a number or a schedule mapping, "
            f"got {value!r} ({type(value).__name__})",
            param=where,
        )
    schedule = as_schedule(value, where)
    for key in ("alpha", "start", "end"):
        v = getattr(schedule, key, 0.0)
        if abs(v) > MAX_ABS_ALPHA:
            raise ConfigError(
                f"{where} must be between {-MAX_ABS_ALPHA:g} and {MAX_ABS_ALPHA:g}, got {v!r}",
                param=where,
            )
    return schedule


class Steerable(Protocol):
    """What the engine's request handling reads of a tuner (``ProxyTuner`` is one)."""

    base: Member
    pairs: list[Pair]
    rule: Rule
    vocab_size: int
    options: EngineOptions

    @property
    def members(self) -> list[Member]: ...

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    def with_rule(self, rule: Any) -> Steerable: ...

    def snapshot(self) -> Steerable: ...


def prepare_request(
    tuner: Steerable,
    prompts: Sequence[Prompt],
    config: GenerationConfig,
    alpha: Any = None,
    active_pairs: Sequence[int] | None = None,
    rule: Any = None,
) -> Prepared:
    """One server request, validated and prepared: its alphas and active pairs
    (:func:`request_alphas`), its rule (:func:`request_rule`; default the tuner's), then
    :func:`~proxytune.engine.prepare.prepare`. A switched-off pair never runs. The tuner is
    read once (:meth:`~proxytune.tuner.ProxyTuner.snapshot`): pairs swapped meanwhile apply to
    the next request."""
    tuner = tuner.snapshot()
    schedules, active = request_alphas(tuner.pairs, alpha, active_pairs)
    pairs = [dataclasses.replace(p, alpha=s) for p, s in zip(tuner.pairs, schedules, strict=True)]
    chosen = tuner.rule if rule is None else request_rule(tuner, rule)
    eos = config.eos_token_ids if config.eos_token_ids is not None else tuner.eos_token_ids
    return prepare(tuner.base, pairs, list(prompts), config, tuner.vocab_size, eos, chosen, active)


def request_rule(tuner: Steerable, spec: Any) -> Rule:
    """A request's ``rule`` (a name or ``{name: ..., **settings}``), checked against the
    tuner's models. Rules that load models (``args``'s reward model) are refused: a request
    must not make the server read model files; put such a rule in the server's recipe."""
    if not isinstance(spec, str | Mapping):
        raise ConfigError(
            f"rule must be a rule name or a mapping with a 'name', got {spec!r}", param="rule"
        )
    check_rule_size(spec)  # before anything recurses into it
    try:
        built = tuner.with_rule(spec).rule
    except ConfigError as err:
        text = str(err)
        if text.startswith("rule"):
            raise ConfigError(text, param=err.param or "rule") from None
        raise ConfigError(f"rule: {text}", param="rule") from None
    loads = _rules_in(built) & LOADING_RULES
    if loads:
        raise ConfigError(
            f"rule: {sorted(loads)} loads a model and cannot be chosen per request; serve it "
            "from the recipe's rule instead",
            param="rule",
        )
    return built


LOADING_RULES = frozenset({"args"})
"""Rules whose settings name a model to load."""


def _rules_in(rule: Any) -> set[str]:
    """Names of ``rule`` and every rule nested in its settings."""
    names = {getattr(rule, "name", "")}
    if dataclasses.is_dataclass(rule):
        for f in dataclasses.fields(rule):
            value = getattr(rule, f.name)
            for item in value if isinstance(value, tuple | list) else (value,):
                if isinstance(item, Rule) and not isinstance(item, type):
                    names |= _rules_in(item)
    return names
