"""Metrics: per-example scores (averaged over a task), pass@k, and the gap closed.

Every metric scores one example; a task's score is the mean over its examples. Generation
metrics take ``(prediction, golds)`` where ``prediction`` is the extracted answer (``None`` if
nothing could be extracted) and ``golds`` the accepted answers.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from ..errors import ConfigError
from .extract import normalize_number

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_text(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalisation)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answers_equal(prediction: str | None, gold: str) -> bool:
    """Numbers compare by value (``"1,000.0" == "1000"``), anything else by normalised text."""
    if prediction is None:
        return False
    a, b = normalize_number(prediction), normalize_number(gold)
    if a is not None and b is not None:
        return a == b
    return normalize_text(prediction) == normalize_text(gold)


def exact_match(prediction: str | None, golds: Sequence[str]) -> float:
    """1 if the prediction equals any gold answer (see :func:`answers_equal`), else 0."""
    return float(any(answers_equal(prediction, g) for g in golds))


def contains(prediction: str | None, golds: Sequence[str]) -> float:
    """1 if any gold answer appears in the prediction (normalised text), else 0."""
    if prediction is None:
        return 0.0
    text = normalize_text(prediction)
    return float(any(normalize_text(g) and normalize_text(g) in text for g in golds))


def token_f1(prediction: str | None, golds: Sequence[str]) -> float:
    """The best SQuAD token F1 of the prediction against any gold answer."""
    if prediction is None:
        return 0.0
    pred = normalize_text(prediction).split()
    best = 0.0
    for gold in golds:
        ref = normalize_text(gold).split()
        if not pred or not ref:
            best = max(best, float(pred == ref))
            continue
        common = sum((Counter(pred) & Counter(ref)).values())
        if common:
            precision, recall = common / len(pred), common / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


GENERATION_METRICS: dict[str, Callable[[str | None, Sequence[str]], float]] = {
    "exact_match": exact_match,
    "contains": contains,
    "f1": token_f1,
}


def get_generation_metric(name: str) -> Callable[[str | None, Sequence[str]], float]:
    if name not in GENERATION_METRICS:
        raise ConfigError(
            f"unknown generation metric {name!r}; use one of {sorted(GENERATION_METRICS)} "
            "or a user function ('module:function' or 'path/to/file.py:function')"
        )
    return GENERATION_METRICS[name]


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator of Chen et al. (2021): ``1 - C(n-c, k) / C(n, k)``.

    ``n`` samples of which ``c`` passed; the chance that at least one of ``k`` samples drawn
    without replacement passes. Computed as a product, stable for large ``n``.

    >>> pass_at_k(5, 2, 2)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    0.7
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    fail_all = math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
    return round(1.0 - fail_all, 12)


def multiple_choice_scores(
    logprobs: Sequence[float], lengths: Sequence[int], correct: Iterable[int]
) -> dict[str, float]:
    """Per-example multiple-choice metrics from each option's summed log-likelihood.

    - ``acc``: the most likely option is a correct one;
    - ``acc_norm``: the same with log-likelihoods divided by each option's length in bytes;
    - ``mc2``: the probability mass on the correct options, normalised over all options
      (TruthfulQA's MC2 when several options are true).
    Ties share the credit: options tied for the best score count as a uniform random pick
    among them (so a rule that rules out every option, all ``-inf``, scores chance, not the
    first option's label). Options at ``-inf`` carry no mass in ``mc2`` unless all are.
    """
    right = set(correct)
    if not logprobs or not right:
        raise ValueError("multiple choice needs at least one option and one correct index")
    normed = [lp / max(n, 1) for lp, n in zip(logprobs, lengths, strict=True)]
    top = max(logprobs)
    # all options ruled out (-inf): no information, uniform mass
    weights = [1.0 if top == -math.inf else math.exp(lp - top) for lp in logprobs]
    return {
        "acc": _tied_best_share(logprobs, right),
        "acc_norm": _tied_best_share(normed, right),
        "mc2": sum(w for i, w in enumerate(weights) if i in right) / sum(weights),
    }


def _tied_best_share(scores: Sequence[float], right: set[int]) -> float:
    """The share of the options tied for the highest score that are correct (NaN counts as
    ``-inf``)."""
    scores = [-math.inf if math.isnan(s) else s for s in scores]
    top = max(scores)
    tied = [i for i, s in enumerate(scores) if s == top]
    return sum(i in right for i in tied) / len(tied)


def gap_closed(proxy: float | None, base: float | None, tuned: float | None) -> float | None:
    """``(proxy - base) / (tuned - base)``: the share of the base-to-tuned gap that proxy-tuning
    closes (1.0 = all of it; above 1 it beats the tuned model; below 0 it is worse than the
    base). ``None`` when a score is missing or the tuned model does not differ from the base.

    >>> round(gap_closed(26.4, 6.6, 32.4), 3)  # the paper's GSM8K, Llama-2 13B
    0.767
    """
    if proxy is None or base is None or tuned is None:
        return None
    if math.isclose(tuned, base, rel_tol=0.0, abs_tol=1e-12):
        return None
    return (proxy - base) / (tuned - base)


def mean(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are not ``None`` (``None`` if there are none)."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None
