"""Bootstrap intervals for mean scores and for gap closed (pure functions over per-example
scores; the same resampled examples for every system, so the gap's interval is paired)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .metrics import gap_closed


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95% percentile-bootstrap interval."""

    value: float | None
    low: float | None
    high: float | None

    def percent(self) -> str:
        if self.value is None:
            return "-"
        if self.low is None or self.high is None:
            return f"{100 * self.value:.1f} [unstable]"
        return f"{100 * self.value:.1f} [{100 * self.low:.1f}, {100 * self.high:.1f}]"


def _resamples(n: int, draws: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(draws, n))


def mean_interval(scores: Sequence[float], draws: int = 2000, seed: int = 0) -> Estimate:
    """The mean of ``scores`` and its 95% bootstrap interval."""
    x = np.asarray(scores, dtype=float)
    if x.size == 0:
        return Estimate(None, None, None)
    means = x[_resamples(x.size, draws, seed)].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Estimate(float(x.mean()), float(low), float(high))


def diff_interval(
    a: Sequence[float], b: Sequence[float], draws: int = 2000, seed: int = 0
) -> Estimate:
    """``mean(a) - mean(b)`` on paired per-example scores, with its 95% paired-bootstrap
    interval (the same resampled examples for both)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.size != y.size or x.size == 0:
        return Estimate(None, None, None)
    return mean_interval(x - y, draws, seed)


def _resampled_gaps(
    p: np.ndarray, b: np.ndarray, t: np.ndarray, idx: np.ndarray
) -> tuple[float | None, np.ndarray, np.ndarray]:
    """Gap closed of the full scores, of each resample ``idx`` row (0 where undefined), and
    which resamples have a gap in the point estimate's direction."""
    point = gap_closed(float(p.mean()), float(b.mean()), float(t.mean()))
    pm, bm, tm = p[idx].mean(axis=1), b[idx].mean(axis=1), t[idx].mean(axis=1)
    direction = np.sign(t.mean() - b.mean())
    defined = (np.abs(tm - bm) > 1e-12) & (np.sign(tm - bm) == direction)
    gaps = np.where(defined, (pm - bm) / np.where(defined, tm - bm, 1.0), 0.0)
    return point, gaps, defined


def gap_interval(
    proxy: Sequence[float],
    base: Sequence[float],
    tuned: Sequence[float],
    draws: int = 2000,
    seed: int = 0,
) -> tuple[Estimate, int]:
    """Gap closed ``(P - B) / (T - B)`` on paired per-example scores, with its 95% bootstrap
    interval; also returns how many resamples had no gap in the point estimate's direction
    (``T - B`` zero or of the other sign). The ratio is unstable there, so the interval is
    left open (``None``) when more than 2.5% of the resamples are such."""
    p, b, t = (np.asarray(v, dtype=float) for v in (proxy, base, tuned))
    if not (p.size == b.size == t.size) or p.size == 0:
        return Estimate(None, None, None), 0
    point, gaps, defined = _resampled_gaps(p, b, t, _resamples(p.size, draws, seed))
    undefined = int((~defined).sum())
    if point is None or undefined > 0.025 * draws:
        return Estimate(point, None, None), undefined
    low, high = np.percentile(gaps[defined], [2.5, 97.5])
    return Estimate(point, float(low), float(high)), undefined


def mean_gap_interval(
    tasks: Sequence[tuple[Sequence[float], Sequence[float], Sequence[float]]],
    draws: int = 2000,
    seed: int = 0,
) -> Estimate:
    """The mean over tasks of gap closed, each task's ``(proxy, base, tuned)`` per-example
    scores paired within it, with a 95% stratified-bootstrap interval (every task resampled
    on its own, independently of the others). The interval is left open (``None``) when in
    over 2.5% of the resamples some task had no gap in its point estimate's direction."""
    if not tasks:
        return Estimate(None, None, None)
    rng = np.random.default_rng(seed)
    points, total = [], np.zeros(draws)
    defined = np.ones(draws, dtype=bool)
    for proxy, base, tuned in tasks:
        p, b, t = (np.asarray(v, dtype=float) for v in (proxy, base, tuned))
        if not (p.size == b.size == t.size) or p.size == 0:
            return Estimate(None, None, None)
        idx = rng.integers(0, p.size, size=(draws, p.size))
        point, gaps, ok = _resampled_gaps(p, b, t, idx)
        if point is None:
            return Estimate(None, None, None)
        points.append(point)
        total += gaps
        defined &= ok
    value = float(np.mean(points))
    if (~defined).sum() > 0.025 * draws:
        return Estimate(value, None, None)
    low, high = np.percentile(total[defined] / len(tasks), [2.5, 97.5])
    return Estimate(value, float(low), float(high))


def aligned(
    per_system: Mapping[str, Mapping[str, float | None]], ids: Sequence[str]
) -> dict[str, list[float]]:
    """Per system, the scores of ``ids`` in that order (a missing score counts as 0)."""
    return {name: [float(scores.get(i) or 0.0) for i in ids] for name, scores in per_system.items()}
