"""Which kinds of token steering acts on: the paper found proxy-tuning changes style and
reasoning tokens far more than knowledge tokens; here tokens are split into numbers, words,
format (punctuation, separators, whitespace) and end (end-of-sequence and other special
tokens), and counted where steering changed the greedy choice."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ..analysis.records import SequenceRecord

CLASSES = ("number", "word", "format", "end")


_SPECIAL = re.compile(r"<\|[^|<>]+\|>|</s>|<eos>")


def token_class(text: str) -> str:
    """``end`` (a special token such as end-of-sequence), ``number`` (has a digit), ``word``
    (has a letter) or ``format`` (neither)."""
    if _SPECIAL.fullmatch(text.strip()):
        return "end"
    if any(c.isdigit() for c in text):
        return "number"
    if any(c.isalpha() for c in text):
        return "word"
    return "format"


def token_classes(records: Sequence[SequenceRecord]) -> dict[str, Any]:
    """Per class: how many generated tokens, how many steering made the top choice (the base
    alone would have picked another), and the mean absolute shift in nats."""
    tokens = [t for r in records for t in r.tokens]
    all_by = Counter(token_class(t.token) for t in tokens)
    changed = [t for t in tokens if t.promoted_to_top]
    changed_by = Counter(token_class(t.token) for t in changed)
    shift: dict[str, float | None] = {}
    for c in CLASSES:
        shifts = [abs(t.shift) for t in tokens if token_class(t.token) == c]
        shift[c] = sum(shifts) / len(shifts) if shifts else None
    return {
        "tokens": len(tokens),
        "changed": len(changed),
        "tokens_by_class": {c: all_by.get(c, 0) for c in CLASSES},
        "changed_by_class": {c: changed_by.get(c, 0) for c in CLASSES},
        "mean_abs_shift_by_class": shift,
        "examples_changed": [
            {"token": t.token, "base_top": t.top_base[0][0] if t.top_base else None}
            for t in changed[:15]
        ],
    }
