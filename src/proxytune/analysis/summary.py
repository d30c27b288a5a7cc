"""Which tokens steering promotes: aggregates over token records.

The paper (Liu et al. 2024, section 6) found that proxy-tuning mostly raises reasoning and
style tokens ("Therefore", "Let", "\\n") rather than facts; :func:`promoted_tokens` gives the
same view for any model set and prompts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from .records import SequenceRecord, TokenRecord


def all_tokens(records: Sequence[SequenceRecord]) -> list[TokenRecord]:
    return [t for r in records for t in r.tokens]


def promoted_tokens(
    records: Sequence[SequenceRecord], n: int = 20, min_count: int = 1
) -> list[dict[str, Any]]:
    """The ``n`` token texts with the largest mean shift (log p_combined - log p_base) among
    those generated at least ``min_count`` times, with their counts and how often steering
    made them the top choice. Tokens are grouped by their own decoded text (``" The"`` and
    ``"The"`` are different tokens).
    """
    groups: dict[str, list[TokenRecord]] = defaultdict(list)
    for t in all_tokens(records):
        groups[t.token].append(t)
    rows = []
    for text, items in groups.items():
        if len(items) < min_count:
            continue
        rows.append(
            {
                "token": text,
                "count": len(items),
                "mean_shift": sum(t.shift for t in items) / len(items),
                "max_shift": max(t.shift for t in items),
                "mean_p_base": sum(t.p_base for t in items) / len(items),
                "mean_p_combined": sum(t.p_combined for t in items) / len(items),
                "promoted_to_top": sum(t.promoted_to_top for t in items),
            }
        )
    rows.sort(key=lambda r: (-r["mean_shift"], -r["count"], r["token"]))
    return rows[:n]


def summarize(records: Sequence[SequenceRecord], n: int = 20, min_count: int = 1) -> dict[str, Any]:
    """Totals over every token, and the most promoted tokens."""
    tokens = all_tokens(records)
    kls = [t.kl_base_combined for t in tokens if t.kl_base_combined is not None]
    return {
        "sequences": len(records),
        "tokens": len(tokens),
        "mean_shift": sum(t.shift for t in tokens) / len(tokens) if tokens else None,
        "mean_kl_base_combined": sum(kls) / len(kls) if kls else None,
        "promoted_to_top": sum(t.promoted_to_top for t in tokens),
        "share_promoted_to_top": (
            sum(t.promoted_to_top for t in tokens) / len(tokens) if tokens else None
        ),
        "most_promoted": promoted_tokens(records, n, min_count),
    }
