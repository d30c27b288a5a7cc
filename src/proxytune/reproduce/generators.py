"""Candidate task generators for screening: procedural, offline, a pure function of the seed.

- ``pyexpr``: what a short Python expression evaluates to, answered with its ``repr``
  (``sorted('banana')[2]`` -> ``'a'``), made from templates: the coder models' home domain.
- ``unit_conversion`` (``How many centimeters are in 7 meters?``) and ``case_conversion``
  (an identifier from snake_case to camelCase or back): content the base already knows;
- reasoning-gym generators (the ``reasoning`` extra): each question as the library writes it,
  its answer as the library scores it.

Every generator returns ``n`` distinct examples, each with ``question`` and ``answer`` (a
string) and, for a task scored with ``first-line-contains``, the task's other possible answers.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from ..extras import require

Example = dict[str, Any]

_WORD_TEXT = (
    "banana apple cherry mango grape lemon melon peach plum kiwi orange papaya python "
    "rocket planet silver garden window bottle ladder pencil candle tunnel yellow summer "
    "winter spring autumn forest island bridge castle dragon engine guitar jacket kettle"
)
_WORDS = tuple(_WORD_TEXT.split())
_SHORT = [w for w in _WORDS if len(w) <= 6]

_SAFE = {
    "sorted": sorted,
    "len": len,
    "max": max,
    "min": min,
    "sum": sum,
    "abs": abs,
    "list": list,
    "range": range,
    "str": str,
    "int": int,
    "set": set,
    "reversed": reversed,
}


def _templates(rng: random.Random) -> str:
    """One expression, its parts drawn from ``rng``."""
    w = rng.choice(_WORDS)
    s = rng.choice(_SHORT)
    c = rng.choice(sorted(set(w)))
    i = rng.randrange(len(w))
    j = rng.randint(i + 1, len(w))
    a, b = rng.randint(10, 99), rng.randint(2, 9)
    xs = rng.sample(range(1, 30), rng.randint(3, 5))
    k = rng.randrange(len(xs))
    return rng.choice(
        (
            f"sorted('{w}')[{i}]",
            f"'{w}'[{i}]",
            f"'{w}'[-{i + 1}]",
            f"'{w}'[{i}:{j}]",
            f"'{w}'.count('{c}')",
            f"'{w}'.find('{c}')",
            f"'{w}'.upper()[{i}]",
            f"'{s}'[::-1]",
            f"len('{w}')",
            f"'{w}'.replace('{c}', '')",
            f"'-'.join('{s[:3]}')",
            f"{a} // {b}",
            f"{a} % {b}",
            f"{b} ** 2 - {a}",
            f"{xs}[{k}]",
            f"{xs}[-1] + {xs}[0]",
            f"max({xs}) - min({xs})",
            f"sum({xs})",
            f"sorted({xs})[{k}]",
            f"len({xs} + {xs[:2]})",
            f"len(range({b}, {a}, {b}))",
            f"'{w}' < '{s}'",
            f"{xs[0]} in {xs[1:]}",
            f"'{c}' in '{s}'",
            f"len(set('{w}'))",
            f"str({a})[::-1]",
            f"'{s}' * 2",
            f"'{w}'.startswith('{w[:2]}')",
            f"[x * 2 for x in {xs}][{k}]",
            f"'{w}'.index('{c}') + {b}",
        )
    )


def _pyexpr_one(rng: random.Random) -> Example:
    expr = _templates(rng)
    # our own template over a few safe builtins: nothing from outside is evaluated
    value = eval(expr, {"__builtins__": _SAFE})
    return {
        "question": f"What does {expr} evaluate to?",
        "expression": expr,
        "answer": repr(value),
    }


def make_pyexpr(n: int, seed: int) -> list[Example]:
    """``n`` distinct expressions (no two alike) with answers of at most 12 characters."""
    return distinct(_pyexpr_one, n, seed, "expression", keep=lambda ex: len(ex["answer"]) <= 12)


# --- conversions (added after the first screen: see docs/reproduction.md) -------------------

_UNITS = (
    ("meters", "centimeters", 100),
    ("meters", "millimeters", 1000),
    ("kilometers", "meters", 1000),
    ("centimeters", "millimeters", 10),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
    ("feet", "inches", 12),
    ("yards", "feet", 3),
    ("dozens", "items", 12),
)


def _unit_one(rng: random.Random) -> Example:
    big, small, factor = rng.choice(_UNITS)
    n = rng.randint(2, 60)
    return {"question": f"How many {small} are in {n} {big}?", "answer": str(n * factor)}


def make_unit_conversion(n: int, seed: int) -> list[Example]:
    """``n`` distinct unit conversions (``How many centimeters are in 7 meters?`` -> 700)."""
    return distinct(_unit_one, n, seed)


def _case_one(rng: random.Random) -> Example:
    words = rng.sample(_WORDS, rng.randint(2, 3))
    snake = "_".join(words)
    camel = words[0] + "".join(w.capitalize() for w in words[1:])
    if rng.random() < 0.5:
        return {"question": f"Write the name {snake} in camelCase.", "answer": camel}
    return {"question": f"Write the name {camel} in snake_case.", "answer": snake}


def make_case_conversion(n: int, seed: int) -> list[Example]:
    """``n`` distinct identifier conversions between snake_case and camelCase."""
    return distinct(_case_one, n, seed)


def distinct(
    one: Callable[[random.Random], Example],
    n: int,
    seed: int,
    key: str = "question",
    keep: Callable[[Example], bool] = lambda ex: True,
) -> list[Example]:
    """``n`` examples drawn by ``one`` from ``random.Random(seed)``, no two with the same
    ``key`` and each passing ``keep``."""
    rng = random.Random(seed)
    out: list[Example] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ConfigError(f"cannot make {n} distinct examples; ask for fewer")
        ex = one(rng)
        if ex[key] not in seen and keep(ex):
            seen.add(ex[key])
            out.append(ex)
    return out


# --- reasoning-gym ---------------------------------------------------------------------------

GYM_VERSION = "0.1.25"


def gym(name: str, contains: bool = False) -> Callable[[int, int], list[Example]]:
    """A generator over reasoning-gym's ``name`` dataset: ``n`` distinct questions with seed
    ``seed``; with ``contains``, each row also lists the task's other answers seen."""

    def make(n: int, seed: int) -> list[Example]:
        require("reasoning_gym", "reasoning", f"the {name} task")
        import reasoning_gym

        rows: list[Example] = []
        seen: set[str] = set()
        size = 2 * n + 20
        for item in reasoning_gym.create_dataset(name, size=size, seed=seed):
            question = str(item["question"]).strip()
            if question in seen:
                continue
            seen.add(question)
            rows.append({"question": question, "answer": str(item["answer"]).strip()})
            if len(rows) == n:
                break
        if len(rows) < n:
            raise ConfigError(f"reasoning-gym {name!r} made {len(rows)} distinct of {n} asked")
        if contains:
            answers = sorted({r["answer"] for r in rows})
            for r in rows:
                r["alternatives"] = answers
        return rows

    make.__name__ = f"make_{name}"
    return make
