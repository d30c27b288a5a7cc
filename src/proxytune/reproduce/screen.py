"""Screening: which candidate tasks can show what proxy-tuning transfers, decided by measuring
the untuned models before anything is trained, and the closure each chosen task predicts.

On each candidate's ``screen`` split (greedy, one generation each) the run measures the base
on the raw prompt (strict and lenient), the base with a 3-shot prompt, and the small model
untuned. :func:`select` applies :class:`SelectionRule`, fixed in code before any training:

- base strict <= 20%: there is a format to learn;
- expected tuned >= 60%, where expected tuned = the base's content accuracy once the format is
  out of the way: max(base lenient, 3-shot lenient);
- base lenient >= 0.8 x expected tuned: the raw base already knows the content;
- base lenient - small lenient >= 10 points: the big model knows more than the small one, so
  a proxy can beat its own expert;
- answers of at most 8 tokens (the gold answer in its shell, the base's tokenizer).

The prediction (the "format" hypothesis: the offset carries format, the base keeps its
content): proxy strict = base lenient, tuned = expected tuned, so

    predicted gap closed = (base lenient - base strict) / (expected tuned - base strict).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

SCREEN_SYSTEMS = ("base", "base-3shot", "small")


@dataclass(frozen=True)
class SelectionRule:
    """The thresholds a candidate must meet (fractions, not percent)."""

    max_base_strict: float = 0.20
    min_expected_tuned: float = 0.60
    min_lenient_share: float = 0.8
    min_lead_over_small: float = 0.10
    max_answer_tokens: int = 8
    choose: int = 3
    """How many tasks are chosen (the passing ones with the largest expected gap)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Screened:
    """One candidate's screening measurements (fractions of the screen split)."""

    base_strict: float
    base_lenient: float
    fewshot_strict: float
    fewshot_lenient: float
    small_strict: float
    small_lenient: float
    answer_tokens: int
    """The longest gold answer, in its shell, in the base's tokens."""
    n: int

    @property
    def expected_tuned(self) -> float:
        return max(self.base_lenient, self.fewshot_lenient)

    @property
    def predicted_closure(self) -> float | None:
        """(base lenient - base strict) / (expected tuned - base strict); ``None`` when there
        is no gap to close."""
        gap = self.expected_tuned - self.base_strict
        return None if gap <= 0 else (self.base_lenient - self.base_strict) / gap

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "expected_tuned": self.expected_tuned,
            "predicted_closure": self.predicted_closure,
        }


def failures(s: Screened, rule: SelectionRule) -> list[str]:
    """Why a candidate fails the rule (empty: it passes)."""
    out = []
    if s.base_strict > rule.max_base_strict:
        out.append(f"base strict {pct(s.base_strict)} > {pct(rule.max_base_strict)}")
    if s.expected_tuned < rule.min_expected_tuned:
        out.append(f"expected tuned {pct(s.expected_tuned)} < {pct(rule.min_expected_tuned)}")
    if s.base_lenient < rule.min_lenient_share * s.expected_tuned:
        out.append(
            f"base lenient {pct(s.base_lenient)} < {rule.min_lenient_share:g} x expected tuned"
        )
    if s.base_lenient - s.small_lenient < rule.min_lead_over_small:
        out.append(
            f"base lenient leads small by {pct(s.base_lenient - s.small_lenient)} < "
            f"{pct(rule.min_lead_over_small)}"
        )
    if s.answer_tokens > rule.max_answer_tokens:
        out.append(f"answers up to {s.answer_tokens} tokens > {rule.max_answer_tokens}")
    return out


def select(screened: Mapping[str, Screened], rule: SelectionRule) -> list[str]:
    """The passing candidates with the largest expected gap (expected tuned - base strict;
    ties by name), at most ``rule.choose`` of them."""
    passing = [t for t, s in screened.items() if not failures(s, rule)]
    passing.sort(key=lambda t: (-(screened[t].expected_tuned - screened[t].base_strict), t))
    return passing[: rule.choose]


def screened_from_scores(
    scores: Mapping[str, Mapping[str, float | None]],
    strict: str,
    lenient: str,
    answer_tokens: int,
    n: int,
) -> Screened:
    """A :class:`Screened` from ``{system: {metric: mean}}`` of :data:`SCREEN_SYSTEMS`."""

    def get(system: str, metric: str) -> float:
        return float(scores.get(system, {}).get(metric) or 0.0)

    return Screened(
        base_strict=get("base", strict),
        base_lenient=get("base", lenient),
        fewshot_strict=get("base-3shot", strict),
        fewshot_lenient=get("base-3shot", lenient),
        small_strict=get("small", strict),
        small_lenient=get("small", lenient),
        answer_tokens=answer_tokens,
        n=n,
    )


def screening_table(
    screened: Mapping[str, Mapping[str, Any]], chosen: Sequence[str], rule: SelectionRule
) -> list[str]:
    """Markdown lines: every candidate's measurements, verdict and prediction."""
    lines = [
        "| task | n | base strict | base lenient | 3-shot strict | 3-shot lenient | small "
        "lenient | answer tokens | expected tuned | predicted gap closed | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task, row in screened.items():
        s = Screened(**{k: row[k] for k in Screened.__dataclass_fields__})
        why = failures(s, rule)
        verdict = "chosen" if task in chosen else ("; ".join(why) or "passes, not chosen")
        lines.append(
            f"| {task} | {s.n} | {pct(s.base_strict)} | {pct(s.base_lenient)} | "
            f"{pct(s.fewshot_strict)} | {pct(s.fewshot_lenient)} | {pct(s.small_lenient)} | "
            f"{s.answer_tokens} | {pct(s.expected_tuned)} | {pct(s.predicted_closure)} | "
            f"{verdict} |"
        )
    return lines


def pct(value: float | None) -> str:
    """A share as a percentage with one decimal (``-`` for none)."""
    return "-" if value is None else f"{100 * value:.1f}%"
