"""Rule specs at the edges: ``key=value`` arguments from the command line, and listings.

A spec is what :func:`~proxytune.rules.make_rule` takes: a name, or ``{name: ..., **settings}``
where a nested rule (``inner``) is itself a spec.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from ..errors import ConfigError
from .base import RULES

ORDER = [
    "proxy",
    "product",
    "mixture",
    "nudging",
    "pairs",
    "base",
    "gated",
    "context",
    "rerank",
    "plausible",
    "union",
    "tokens",
    "args",
]
"""The listing order of ``proxytune rules``: combinations, then alphas, then filters."""


def parse_rule_args(args: Sequence[str], name: str | None = None) -> dict[str, Any]:
    """``["tau=0.2", "inner.k=5"]`` -> ``{"tau": 0.2, "inner": {"k": 5}}`` (plus ``name``).

    Values are read as YAML, so ``0.2`` is a number, ``[1, 2]`` a list and ``{expert: 0.7}``
    a mapping; quote a value to keep it a string. Dots in a key reach into a nested rule.
    """
    spec: dict[str, Any] = {} if name is None else {"name": name}
    for arg in args:
        key, sep, raw = arg.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--rule-arg {arg!r}: write it as key=value, e.g. tau=0.1")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--rule-arg {arg!r}: the value is not valid YAML ({err})") from None
        *path, last = key.strip().split(".")
        node = spec
        for part in path:
            child = node.get(part)
            if isinstance(child, str):  # inner=rerank then inner.k=5
                child = {"name": child}
            node[part] = child = dict(child or {})
            node = child
        node[last] = value
    return spec


def merge_specs(spec: Any, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` laid over ``spec`` (a name or a mapping); nested mappings merge key by key,
    unless an override names a different rule (then it replaces the old one whole)."""
    out: dict[str, Any] = {"name": spec} if isinstance(spec, str) else dict(spec or {})
    for key, value in overrides.items():
        current = out.get(key)
        if isinstance(value, Mapping) and isinstance(current, (str, Mapping)):
            current = {"name": current} if isinstance(current, str) else current
            renamed = "name" in value and value["name"] != current.get("name")
            out[key] = dict(value) if renamed else merge_specs(current, value)
        else:
            out[key] = value
    return out


def describe(name: str | None = None) -> list[dict[str, Any]]:
    """Every rule (or one) as ``{name, summary, formula, cost, settings}`` for listings."""
    if name is not None and name not in RULES:
        raise ConfigError(f"unknown rule {name!r}; rules: {sorted(RULES)}")
    names = [n for n in ORDER if n in RULES] + sorted(set(RULES) - set(ORDER))
    out = []
    for n in names if name is None else [name]:
        cls = RULES[n]
        settings = [
            {"name": s, "default": default, "help": text}
            for s, default, text in cls.settings_help()
        ]
        out.append(
            {
                "name": n,
                "summary": cls.summary,
                "formula": cls.formula,
                "cost": cls.cost,
                "settings": settings,
            }
        )
    return out
