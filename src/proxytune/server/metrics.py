"""A small Prometheus registry: counters, gauges and histograms in the text format (0.0.4).

Thread-safe (the scheduler thread and the event loop both record). No dependency: the format
is a few lines of text per sample.

>>> m = Metrics()
>>> m.requests.inc(endpoint="/v1/completions", status="200")
>>> 'proxytune_requests_total{endpoint="/v1/completions",status="200"} 1' in m.render()
True
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

Labels = tuple[tuple[str, str], ...]


def _labels(labels: Labels, extra: Labels = ()) -> str:
    items = [*labels, *extra]
    if not items:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in items)
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, lock: threading.Lock) -> None:
        self.name, self.help, self.lock = name, help, lock

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """A monotonically increasing total, optionally per label set."""

    kind = "counter"

    def __init__(self, name: str, help: str, lock: threading.Lock) -> None:
        super().__init__(name, help, lock)
        self.values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        with self.lock:
            return self.values.get(tuple(sorted(labels.items())), 0.0)

    def samples(self) -> list[str]:
        if not self.values:
            return [f"{self.name} 0"]
        return [f"{self.name}{_labels(k)} {_number(v)}" for k, v in sorted(self.values.items())]


class Gauge(_Metric):
    """A value read from a callback at scrape time (queue depth, rows in the batch)."""

    kind = "gauge"

    def __init__(self, name: str, help: str, lock: threading.Lock, read: Callable[[], float]):
        super().__init__(name, help, lock)
        self.read = read

    def samples(self) -> list[str]:
        return [f"{self.name} {_number(float(self.read()))}"]


class LabeledGauge(_Metric):
    """Values per label set, read from a callback at scrape time (per-pair statistics)."""

    kind = "gauge"

    def __init__(
        self,
        name: str,
        help: str,
        lock: threading.Lock,
        read: Callable[[], dict[Labels, float]],
        kind: str = "gauge",
    ) -> None:
        super().__init__(name, help, lock)
        self.read, self.kind = read, kind

    def samples(self) -> list[str]:
        return [f"{self.name}{_labels(k)} {_number(v)}" for k, v in sorted(self.read().items())]


class Histogram(_Metric):
    """Cumulative buckets, sum and count, optionally per label set."""

    kind = "histogram"

    def __init__(
        self, name: str, help: str, lock: threading.Lock, buckets: Sequence[float]
    ) -> None:
        super().__init__(name, help, lock)
        self.buckets = tuple(sorted(buckets))
        self.series: dict[Labels, list[float]] = {}  # bucket counts..., sum, count

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            s = self.series.setdefault(key, [0.0] * (len(self.buckets) + 2))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    s[i] += 1
            s[-2] += value
            s[-1] += 1

    def count(self, **labels: str) -> float:
        with self.lock:
            s = self.series.get(tuple(sorted(labels.items())))
            return s[-1] if s else 0.0

    def samples(self) -> list[str]:
        out = []
        for key, s in sorted(self.series.items()):
            for bound, n in zip(self.buckets, s, strict=False):
                out.append(
                    f"{self.name}_bucket{_labels(key, (('le', _number(bound)),))} {_number(n)}"
                )
            out.append(f"{self.name}_bucket{_labels(key, (('le', '+Inf'),))} {_number(s[-1])}")
            out.append(f"{self.name}_sum{_labels(key)} {_number(s[-2])}")
            out.append(f"{self.name}_count{_labels(key)} {_number(s[-1])}")
        return out


class Summary(_Metric):
    """A sum and a count (no quantiles): ``rate(sum) / rate(count)`` is a windowed mean."""

    kind = "summary"

    def __init__(self, name: str, help: str, lock: threading.Lock) -> None:
        super().__init__(name, help, lock)
        self.sum = 0.0
        self.count = 0.0

    def add(self, total: float, count: float) -> None:
        with self.lock:
            self.sum += total
            self.count += count

    def mean(self) -> float:
        with self.lock:
            return self.sum / self.count if self.count else 0.0

    def samples(self) -> list[str]:
        return [f"{self.name}_sum {_number(self.sum)}", f"{self.name}_count {_number(self.count)}"]


class Metrics:
    """Everything the server exports at ``/metrics``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._all: list[_Metric] = []
        self._add_request_metrics(self.lock)
        self._add_decode_metrics(self.lock)

    def _add_request_metrics(self, lock: threading.Lock) -> None:
        """Requests: counts, tokens, latencies, the queue."""
        self.requests = self._add(
            Counter("proxytune_requests_total", "HTTP requests by endpoint and status.", lock)
        )
        self.cancelled = self._add(
            Counter(
                "proxytune_requests_cancelled_total",
                "Generation requests cancelled because the client went away.",
                lock,
            )
        )
        self.prompt_tokens = self._add(
            Counter("proxytune_prompt_tokens_total", "Prompt tokens (base model) admitted.", lock)
        )
        self.generation_tokens = self._add(
            Counter("proxytune_generation_tokens_total", "Tokens generated (all rows).", lock)
        )
        self.latency = self._add(
            Histogram(
                "proxytune_request_duration_seconds",
                "Time from a generation request's arrival to its last byte.",
                lock,
                LATENCY_BUCKETS,
            )
        )
        self.ttft = self._add(
            Histogram(
                "proxytune_time_to_first_token_seconds",
                "Time from a generation request's arrival to its first token.",
                lock,
                LATENCY_BUCKETS,
            )
        )
        self.queue_wait = self._add(
            Histogram(
                "proxytune_queue_wait_seconds",
                "Time a request waited in the queue before joining the batch.",
                lock,
                LATENCY_BUCKETS,
            )
        )

    def _add_decode_metrics(self, lock: threading.Lock) -> None:
        """Decoding: steps, batch rows, steering KL, speculative drafts, failures, fallbacks."""
        self.steps = self._add(
            Counter("proxytune_decode_steps_total", "Decode steps run by the scheduler.", lock)
        )
        self.batch_rows = self._add(
            Histogram(
                "proxytune_batch_rows", "Rows decoded together in one step.", lock, BATCH_BUCKETS
            )
        )
        self.kl = self._add(
            Summary(
                "proxytune_steering_kl_nats",
                "KL(steered || base) of each steered token's distribution (at least one pair "
                "active), in nats: sum and count.",
                lock,
            )
        )
        self.kl_mean = self._add(
            Gauge(
                "proxytune_steering_kl_nats_mean",
                "Mean KL(steered || base) per steered token since start, in nats.",
                lock,
                lambda: self.kl.mean(),
            )
        )
        self.drafts_proposed = self._add(
            Counter(
                "proxytune_speculative_drafts_proposed_total",
                "Speculative draft tokens tested against the proxy-tuned distribution.",
                lock,
            )
        )
        self.drafts_accepted = self._add(
            Counter(
                "proxytune_speculative_drafts_accepted_total",
                "Speculative draft tokens accepted (accepted / proposed: the acceptance rate).",
                lock,
            )
        )
        self.failures = self._add(
            Counter(
                "proxytune_generation_failures_total",
                "Requests failed by an error in the models or the combination.",
                lock,
            )
        )
        self.fallbacks = self._add(
            Counter(
                "proxytune_fallbacks_total",
                "Requests that finished on their fallback after their pair failed, by reason "
                "(non_finite, error) and fallback (base, expert).",
                lock,
            )
        )

    def _add(self, metric):  # type: ignore[no-untyped-def]
        self._all.append(metric)
        return metric

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        """Register a gauge whose value is read at scrape time."""
        self._add(Gauge(name, help, self.lock, read))

    def labeled_gauge(
        self,
        name: str,
        help: str,
        read: Callable[[], dict[Labels, float]],
        kind: str = "gauge",
    ) -> None:
        """Register values per label set, all read at scrape time (``kind``: their type:
        ``counter`` for totals the callback keeps)."""
        self._add(LabeledGauge(name, help, self.lock, read, kind))

    def render(self) -> str:
        """The Prometheus text exposition of every metric."""
        lines: list[str] = []
        for metric in self._all:
            if isinstance(metric, Gauge | LabeledGauge):
                samples = metric.samples()  # reads outside the lock: callbacks may take it
            else:
                with self.lock:
                    samples = metric.samples()
            lines += metric.header() + samples
        return "\n".join(lines) + "\n"
