"""Answer extraction: pull the part of a model's output that a metric compares.

Pure functions on strings, chosen by name in a task definition (``extract: gsm``):

- ``none``: the output, stripped;
- ``first_line``: the first non-empty line;
- ``last_number``: the last number in the output (``1,234``, ``-5``, ``3.5``; ``None`` if none);
- ``gsm``: the number after a GSM8K ``####`` marker, else after "the answer is", else the last
  number;
- ``code``: the body of the first fenced code block, else the output unchanged;
- ``regex:PATTERN``: the first capture group (or the whole match) of the last match.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

from ..errors import ConfigError

# A number not glued to a word or a dot on its left: "-5", "1,234.5", "42" (not "x2", "3-5"'s
# minus). Thousands separators must come in groups of three, so "1,2,3" is three numbers.
NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<=\d-)\d+(?:\.\d+)?")
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2013": "-", "\uff0d": "-"})
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*\$?\s*(-?[\d,]+(?:\.\d+)?)", re.IGNORECASE)
_FENCE = re.compile(r"```[ \t]*[\w+-]*[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def numbers(text: str) -> list[str]:
    """Every number in ``text``, as written (unicode minus signs read as ``-``).

    >>> numbers("From 1,200 to -3.5, then 7.")
    ['1,200', '-3.5', '7']
    """
    return NUMBER.findall(text.translate(_MINUS_SIGNS))


def last_number(text: str) -> str | None:
    """The last number in ``text``, normalised (no commas, no trailing zeros), or ``None``.

    >>> last_number("It costs $1,000.50, or -2 after the refund.")
    '-2'
    """
    found = numbers(text)
    return normalize_number(found[-1]) if found else None


def gsm_answer(text: str) -> str | None:
    """A GSM8K answer: after ``####`` if present, else after "the answer is", else the last
    number. ``None`` when the output holds no number.

    >>> gsm_answer("3 + 4 = 7 apples\\n#### 7")
    '7'
    """
    marker = text.find("####")
    if marker >= 0:
        found = numbers(text[marker + 4 :])
        if found:
            return normalize_number(found[0])
    said = _ANSWER_IS.findall(text.translate(_MINUS_SIGNS))
    if said:
        value = normalize_number(said[-1])
        if value is not None:
            return value
    return last_number(text)


def normalize_number(text: str) -> str | None:
    """``"1,234.50"`` -> ``"1234.5"``, ``"-0"`` -> ``"0"``; ``None`` if ``text`` is no number."""
    cleaned = text.translate(_MINUS_SIGNS).replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def first_line(text: str) -> str:
    """The first non-empty line, stripped."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def code_block(text: str) -> str:
    """The body of the first fenced (```) code block; the text unchanged if it has none."""
    match = _FENCE.search(text)
    return match.group(1) if match else text


def regex_extractor(pattern: str) -> Callable[[str], str | None]:
    """The first group (or the whole match) of the *last* match of ``pattern``; ``None`` if none."""
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"extract regex {pattern!r} is not a valid pattern: {err}") from None

    def extract(text: str) -> str | None:
        matches = list(compiled.finditer(text))
        if not matches:
            return None
        last = matches[-1]
        return (last.group(1) if compiled.groups else last.group(0)).strip()

    return extract


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "none": str.strip,
    "first_line": first_line,
    "last_number": last_number,
    "gsm": gsm_answer,
    "code": code_block,
}


def get_extractor(name: str) -> Callable[[str], str | None]:
    """An extractor by name (see the module docstring)."""
    if name.startswith("regex:"):
        return regex_extractor(name.removeprefix("regex:"))
    if name not in EXTRACTORS:
        raise ConfigError(
            f"unknown extract {name!r}; use one of {sorted(EXTRACTORS)} or 'regex:PATTERN'"
        )
    return EXTRACTORS[name]
