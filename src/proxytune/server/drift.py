"""Drift: per pair, what steering does to the base, watched against a baseline.

Every steered token the continuous batch measures three things (``arithmetic.steering_stats``):
``kl`` (``KL(steered || base)``, nats), ``changed`` (1 where the steered top token is not the
base's) and ``entropy`` (of the steered distribution, nats). Per pair (by name) the monitor
keeps running totals (exported as counters) and a window over the last ``window`` steered
tokens. A baseline, captured on a reference prompt set (``proxytune monitor baseline``), gives
each pair's expected means; a window mean that moves from its baseline by more than its
threshold, relative to the baseline (``|mean - base| > t * max(base, floor)``), raises an alert
in ``/health`` and ``/metrics`` once the window holds ``min_tokens`` tokens.
"""

from __future__ import annotations

import json
import math
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.continuous import ContinuousBatch
from ..errors import ConfigError
from .metrics import Metrics

STATS = ("kl", "changed", "entropy")
FLOORS = {"kl": 0.01, "changed": 0.01, "entropy": 0.05}
"""Below these a baseline counts as this much (a relative threshold of ~0 means nothing)."""
DEFAULT_THRESHOLD = 0.5


@dataclass
class _Window:
    """One pair's totals and its last ``size`` tokens' sums (``[kl, changed, entropy, n]``)."""

    size: int
    steps: deque[list[float]] = field(default_factory=deque)
    sums: list[float] = field(default_factory=lambda: [0.0] * 4)
    totals: list[float] = field(default_factory=lambda: [0.0] * 4)

    def add(self, step: list[float]) -> None:
        self.steps.append(list(step))
        for i, v in enumerate(step):
            self.sums[i] += v
            self.totals[i] += v
        while len(self.steps) > 1 and self.sums[3] - self.steps[0][3] >= self.size:
            for i, v in enumerate(self.steps.popleft()):
                self.sums[i] -= v

    def clear(self) -> None:
        self.steps.clear()
        self.sums = [0.0] * 4

    @property
    def tokens(self) -> int:
        return int(self.sums[3])

    def means(self) -> dict[str, float]:
        n = self.sums[3]
        return {s: (self.sums[i] / n if n else math.nan) for i, s in enumerate(STATS)}


class DriftMonitor:
    """Running per-pair steering statistics and their alert state (thread-safe)."""

    def __init__(
        self,
        baseline: Mapping[str, Mapping[str, float]] | None = None,
        thresholds: Mapping[str, float] | None = None,
        window: int = 512,
        min_tokens: int = 64,
    ) -> None:
        if window < 1 or min_tokens < 1:
            raise ConfigError("drift-window and drift-min-tokens must be >= 1")
        self.baseline = {k: dict(v) for k, v in (baseline or {}).items()}
        self.thresholds = dict(thresholds or dict.fromkeys(STATS, DEFAULT_THRESHOLD))
        unknown = sorted(set(self.thresholds) - set(STATS))
        if unknown:
            raise ConfigError(f"drift thresholds: unknown statistic(s) {unknown}; known: {STATS}")
        self.window, self.min_tokens = window, min_tokens
        self._pairs: dict[str, _Window] = {}
        self._lock = threading.Lock()

    def observe(self, pairs: Mapping[str, list[float]]) -> None:
        """One step's sums per pair name (``StepStats.pairs``)."""
        with self._lock:
            for name, step in pairs.items():
                self._pairs.setdefault(name, _Window(self.window)).add(step)

    def reset(self, name: str) -> None:
        """Forget pair ``name``'s window (it was replaced: judge the new pair on its own)."""
        with self._lock:
            if name in self._pairs:
                self._pairs[name].clear()

    def alerts(self) -> dict[str, list[str]]:
        """Per pair with a baseline: the statistics out of bounds now."""
        out: dict[str, list[str]] = {}
        with self._lock:
            for name, base in self.baseline.items():
                w = self._pairs.get(name)
                if w is None or w.tokens < self.min_tokens:
                    continue
                means = w.means()
                out[name] = [
                    s
                    for s, t in self.thresholds.items()
                    if s in base and abs(means[s] - base[s]) > t * max(base[s], FLOORS[s])
                ]
        return out

    def health(self) -> dict[str, Any]:
        """What ``/health`` says: ``alert`` where any pair drifted, its window and baseline."""
        alerts = self.alerts()
        with self._lock:
            pairs = {
                name: {
                    "tokens": w.tokens,
                    "window": w.means(),
                    "baseline": self.baseline.get(name),
                    "alerts": alerts.get(name, []),
                }
                for name, w in self._pairs.items()
            }
        state = "alert" if any(alerts.values()) else "ok"
        return {"state": state, "pairs": pairs}

    # metrics ----------------------------------------------------------------------------------

    def register(self, metrics: Metrics) -> None:
        """Export the totals, the window means, the baseline and the alerts."""

        def totals(i: int) -> Any:
            with self._lock:
                return {(("pair", n),): w.totals[i] for n, w in self._pairs.items()}

        for i, (name, what) in enumerate(
            [
                ("proxytune_pair_kl_nats_sum", "Sum of KL(steered || base) over steered tokens"),
                ("proxytune_pair_changed_tokens_total", "Steered tokens whose top token differs"),
                ("proxytune_pair_entropy_nats_sum", "Sum of the steered entropy over tokens"),
                ("proxytune_pair_steered_tokens_total", "Tokens steered by the pair"),
            ]
        ):
            metrics.labeled_gauge(name, f"{what}, per pair.", lambda i=i: totals(i), kind="counter")
        metrics.labeled_gauge(
            "proxytune_pair_window_mean",
            "Per pair and statistic (kl, changed, entropy): the mean over the drift window.",
            self._window_means,
        )
        metrics.labeled_gauge(
            "proxytune_drift_baseline",
            "Per pair and statistic: the baseline mean (--drift-baseline).",
            lambda: {
                (("pair", n), ("stat", s)): v
                for n, base in self.baseline.items()
                for s, v in base.items()
                if s in STATS
            },
        )
        metrics.labeled_gauge(
            "proxytune_drift_alert",
            "Per pair and statistic: 1 where the window mean left its baseline's bounds.",
            self._alert_flags,
        )
        metrics.gauge(
            "proxytune_drift_alerting",
            "1 while any pair's steering has drifted from its baseline.",
            lambda: float(any(self.alerts().values())),
        )

    def _window_means(self) -> dict[Any, float]:
        with self._lock:
            return {
                (("pair", n), ("stat", s)): v
                for n, w in self._pairs.items()
                if w.tokens
                for s, v in w.means().items()
            }

    def _alert_flags(self) -> dict[Any, float]:
        alerts = self.alerts()
        return {
            (("pair", n), ("stat", s)): float(s in alerts.get(n, []))
            for n in self.baseline
            for s in self.thresholds
        }


# configuration ----------------------------------------------------------------------------


def parse_thresholds(values: Iterable[str]) -> dict[str, float]:
    """``--drift-threshold`` values: ``0.5`` (every statistic) or ``kl=0.5`` (one)."""
    out = dict.fromkeys(STATS, DEFAULT_THRESHOLD)
    for value in values:
        stat, _, number = value.rpartition("=")
        stats = [stat] if stat else list(STATS)
        if stat and stat not in STATS:
            raise ConfigError(f"drift-threshold {value!r}: the statistics are {list(STATS)}")
        try:
            t = float(number)
        except ValueError:
            t = -1.0
        if not t > 0:
            raise ConfigError(
                f"drift-threshold {value!r}: give a positive number (0.5: 50% off the "
                "baseline), optionally as STAT=NUMBER"
            )
        out.update(dict.fromkeys(stats, t))
    return out


def load_baseline(path: str | Path) -> dict[str, dict[str, float]]:
    """A baseline file written by ``proxytune monitor baseline``: per pair, each stat's mean."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        pairs = data["pairs"]
        return {str(name): {s: float(v[s]) for s in STATS if s in v} for name, v in pairs.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(
            f"drift-baseline {str(path)!r} is not a baseline file ({type(err).__name__}: "
            f"{err}); write one with 'proxytune monitor baseline'"
        ) from None


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> ``{(name, labels): value}`` (enough for our own ``/metrics``)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        labels = tuple(
            (k, v.strip('"'))
            for k, _, v in (item.partition("=") for item in rest.rstrip("}").split(","))
            if k
        )
        out[(name, labels)] = float(value)
    return out


def baseline_between(before: str, after: str) -> dict[str, dict[str, float]]:
    """Per pair, the mean of each statistic over the tokens steered between two scrapes of
    ``/metrics`` (``before`` and ``after``)."""
    a, b = parse_metrics(after), parse_metrics(before)
    names = {dict(k)["pair"] for (n, k) in a if n == "proxytune_pair_steered_tokens_total"}
    metrics = (
        "proxytune_pair_kl_nats_sum",
        "proxytune_pair_changed_tokens_total",
        "proxytune_pair_entropy_nats_sum",
        "proxytune_pair_steered_tokens_total",
    )
    sums = {
        pair: [
            a.get((m, (("pair", pair),)), 0.0) - b.get((m, (("pair", pair),)), 0.0) for m in metrics
        ]
        for pair in names
    }
    return means(sums)


def baseline_offline(
    tuner: Any, prompts: list[str], max_tokens: int
) -> dict[str, dict[str, float]]:
    """The same baseline computed in process on ``tuner``: each prompt decoded greedily in the
    server's continuous batch (row-wise exact, so it equals what a server of ``tuner`` measures)."""
    import torch

    batch = ContinuousBatch(tuner)
    config = tuner.config(max_new_tokens=max_tokens, temperature=0)
    sums: dict[str, list[float]] = {}
    jobs = [batch.prepare([p], config) for p in prompts]
    with torch.inference_mode():
        while jobs or batch.live_rows:
            batch.step(jobs)
            jobs = []
            for name, step in batch.stats.pairs.items():
                total = sums.setdefault(name, [0.0] * 4)
                for i, v in enumerate(step):
                    total[i] += v
    return means(sums)


def means(sums: Mapping[str, list[float]]) -> dict[str, dict[str, float]]:
    """``{pair: [kl, changed, entropy, tokens]}`` sums -> each pair's means and token count."""
    out = {}
    for pair in sorted(sums):
        *totals, n = sums[pair]
        if n > 0:
            out[pair] = {s: v / n for s, v in zip(STATS, totals, strict=True)} | {"tokens": n}
    return out
