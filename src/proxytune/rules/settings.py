"""Typed, validated rule settings: one converter per kind of value.

A rule's settings are dataclass fields declared with :func:`setting`; each field carries a
converter ``(value, where) -> value`` that checks the value and normalises it (a YAML list to a
tuple, ``"0.5"`` stays an error). ``where`` is the dotted path of the setting in the user's
input (``rule.inner.tau``), so every error names the key to fix.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import field
from typing import Any

import regex

from ..errors import ConfigError
from ..schedules import MAX_ABS_ALPHA

Convert = Callable[[Any, str], Any]


def setting(default: Any, help: str, convert: Convert, *, factory: bool = False) -> Any:
    """A rule setting: its default, a one-line help text and its converter."""
    meta = {"help": help, "convert": convert}
    if factory:
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def _kind(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def number(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> Convert:
    """A finite number in ``[lo, hi]`` (either end open or absent)."""

    def convert(value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {_kind(value)}", param=where)
        value = float(value)
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        too_high = hi is not None and (value >= hi if hi_open else value > hi)
        if not math.isfinite(value) or too_low or too_high:
            left = "(" if lo_open or lo is None else "["
            right = ")" if hi_open or hi is None else "]"
            span = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
            raise ConfigError(
                f"{where} must be a finite number in {span}, got {value!r}", param=where
            )
        return value

    return convert


def integer(lo: int | None = None) -> Convert:
    """An integer ``>= lo``."""

    def convert(value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {_kind(value)}", param=where)
        if lo is not None and value < lo:
            raise ConfigError(f"{where} must be an integer >= {lo}, got {value}", param=where)
        return value

    return convert


def boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {_kind(value)}", param=where)
    return value


def choice(*options: str) -> Convert:
    def convert(value: Any, where: str) -> str:
        if value not in options:
            raise ConfigError(f"{where} must be one of {list(options)}, got {value!r}", param=where)
        return value

    return convert


def optional(inner: Convert) -> Convert:
    """``None`` or a value that ``inner`` accepts."""
    return lambda value, where: None if value is None else inner(value, where)


def text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a non-empty string, got {_kind(value)}", param=where)
    return value


def _sequence(value: Any, where: str) -> Sequence[Any]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise ConfigError(f"{where} must be a list, got {_kind(value)}", param=where)
    return value


def list_of(item: Convert) -> Convert:
    """A list (tuple) whose items ``item`` accepts; errors name the index."""

    def convert(value: Any, where: str) -> tuple[Any, ...]:
        return tuple(item(v, f"{where}[{i}]") for i, v in enumerate(_sequence(value, where)))

    return convert


def token_id(value: Any, where: str) -> int:
    """A token id: an integer, or a string of digits (JSON object keys are strings)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    return integer(0)(value, where)


def mapping_of(key: Convert, item: Convert) -> Convert:
    """A mapping (dict) checked key by key."""

    def convert(value: Any, where: str) -> dict[Any, Any]:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {_kind(value)}", param=where)
        out: dict[Any, Any] = {}
        for k, v in value.items():
            try:
                name = key(k, f"{where} key {k!r}")
            except ConfigError as err:  # about the mapping itself, not one of its items
                raise ConfigError(str(err), param=where) from None
            out[name] = item(v, f"{where}[{k!r}]")
        return out

    return convert


ROLE = re.compile(r"^(base|expert|anti_expert)(\[(\d+)\])?$")


def role_key(value: Any, where: str) -> str:
    """``base``, ``expert``, ``anti_expert`` (every pair) or ``expert[i]`` / ``anti_expert[i]``."""
    if not isinstance(value, str) or not ROLE.match(value) or value.startswith("base["):
        raise ConfigError(
            f"{where}: not a model role; use 'base', 'expert', 'anti_expert', 'expert[i]' or "
            "'anti_expert[i]'",
            param=where,
        )
    return value


def alphas(value: Any, where: str) -> float | tuple[float, ...]:
    """One alpha for every pair, or a list with one alpha per pair, each within
    +-:data:`~proxytune.schedules.MAX_ABS_ALPHA` (as a request's ``alpha``)."""
    one = number(-MAX_ABS_ALPHA, MAX_ABS_ALPHA)
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list_of(one)(value, where)
    return one(value, where)


def pattern(value: Any, where: str) -> str:
    """A regular expression (checked by compiling it)."""
    value = text(value, where)
    try:
        regex.compile(value, flags=regex.VERSION0)  # the engine that matches it
    except regex.error as err:
        raise ConfigError(
            f"{where} is not a valid regular expression: {err}", param=where
        ) from None
    return value


def prompt_rules(value: Any, where: str) -> tuple[dict[str, Any], ...]:
    """Context rules: ``[{keyword: str | regex: str, alpha: a | [a_0, a_1, ...]}, ...]``."""
    items = _sequence(value, where)
    if not items:
        raise ConfigError(f"{where} needs at least one {{keyword|regex, alpha}} entry", param=where)
    out = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(
                f"{at} must be a mapping like {{keyword: 'sql', alpha: 1.5}}", param=at
            )
        unknown = sorted(set(item) - {"keyword", "regex", "alpha"})
        if unknown:
            raise ConfigError(
                f"{at}: unknown key(s) {unknown}; known: alpha, keyword, regex", param=at
            )
        kinds = [k for k in ("keyword", "regex") if k in item]
        if len(kinds) != 1:
            raise ConfigError(f"{at} needs exactly one of 'keyword' or 'regex'", param=at)
        if "alpha" not in item:
            raise ConfigError(f"{at} needs an 'alpha' (a number, or one per pair)", param=at)
        kind = kinds[0]
        check = pattern if kind == "regex" else text
        out.append(
            {kind: check(item[kind], f"{at}.{kind}"), "alpha": alphas(item["alpha"], f"{at}.alpha")}
        )
    return tuple(out)
