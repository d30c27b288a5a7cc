"""The scheduler: a bounded queue in front of one worker thread that drives the running batch.

Requests are validated and rendered by the caller, then queued (:meth:`Scheduler.submit`). The
worker admits queued requests between decode steps, in arrival order, as long as the batch has room
for all of a request's rows; it runs one step of the running batch
(:class:`~proxytune.engine.continuous.ContinuousBatch`) at a time and hands each request its new
tokens through the request's ``sink``. A request's sink receives, in order: lists of
:class:`~proxytune.results.StepUpdate` (one list per step), then exactly one :class:`Finished`
(``error`` set if it failed or was cancelled by shutdown). Cancelled requests (the client went away)
are dropped between steps and get no further events.

Work that must run on the models outside the batch (scoring an ``echo`` prompt) is handed to
the worker with :meth:`Scheduler.call`: it runs between two steps, so one thread drives the
models.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..config import parse_draft_length
from ..engine.continuous import ContinuousBatch
from ..engine.requests import Job, RequestCore
from ..engine.serial import EngineLoop
from ..errors import ConfigError
from .metrics import Metrics

if TYPE_CHECKING:
    from ..tuner import ProxyTuner

log = logging.getLogger("proxytune.server")


class QueueFull(Exception):
    """The queue is full: the client should retry later (HTTP 429)."""


class ShuttingDown(Exception):
    """The server is draining: no new work (HTTP 503)."""


@dataclass(frozen=True)
class Finished:
    """The last event of a request."""

    error: BaseException | None = None


Sink = Callable[[Any], None]


@dataclass(eq=False)
class _Ticket:
    job: Job
    sink: Sink
    queued_at: float


def check_speculative(tuner: ProxyTuner, k: int | str, continuous: bool | None) -> int | str:
    """The server's ``speculative`` option, checked once at startup."""
    if continuous:
        raise ConfigError(
            "speculative decoding runs each request on the tuner's own loop, so it cannot be "
            "combined with continuous batching: leave continuous unset (or False)"
        )
    if tuner.blackbox:
        raise ConfigError(
            "speculative decoding needs full logits from a local base of the pair's tokenizer; "
            "this tuner has an API base or a pair of another tokenizer: leave speculative unset"
        )
    if not tuner.pairs:
        raise ConfigError("speculative decoding drafts with an expert: this tuner has no pair")
    return parse_draft_length(k)


class Scheduler:
    """Owns the models' running batch; one worker thread, any number of submitting threads.

    ``continuous``: decode requests together in one
    :class:`~proxytune.engine.continuous.ContinuousBatch` (default where the tuner decodes
    locally), or run each on the tuner's own loop, :class:`~proxytune.engine.serial.EngineLoop`
    (default for black-box tuners). ``speculative`` (a draft length or ``"auto"``) decodes every
    request speculatively, on the tuner's own loop.
    """

    def __init__(
        self,
        tuner: ProxyTuner,
        max_batch_size: int = 32,
        max_queue: int = 64,
        kl: bool = True,
        metrics: Metrics | None = None,
        continuous: bool | None = None,
        speculative: int | str | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        if speculative is None:  # the tuner's engine options (a recipe's, the CLI's)
            speculative = tuner.options.speculative
        if speculative is not None:
            speculative = check_speculative(tuner, speculative, continuous)
            continuous = False
        if continuous is None:  # black-box bases and cross-tokenizer pairs run their own loop
            continuous = not tuner.blackbox
        self.batch: RequestCore = (
            ContinuousBatch(tuner, kl=kl) if continuous else EngineLoop(tuner, speculative)
        )
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._waiting: deque[_Ticket] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._running: dict[Job, _Ticket] = {}
        self._cond = threading.Condition()
        self._draining = False
        self._deadline = float("inf")  # when close() cuts what is left
        self._stop = False
        self._thread: threading.Thread | None = None
        self.observers: list[Callable[[Any], None]] = []
        """Called on the worker with each step's ``StepStats`` (the drift monitor)."""

    # state, read from any thread -------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def rows(self) -> int:
        return sum(t.job.n_rows for t in list(self._running.values()))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def draining(self) -> bool:
        return self._draining

    # lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="proxytune-scheduler", daemon=True
            )
            self._thread.start()

    def close(self, timeout: float = 30.0) -> int:
        """Stop taking work, let queued and running requests finish for up to ``timeout``
        seconds (or until :meth:`hurry`), then cancel whatever is left (its sinks get
        ``Finished(ShuttingDown)``). Returns how many requests it cut that way; calling it
        again returns 0."""
        with self._cond:
            self._draining = True
            self._deadline = min(self._deadline, time.monotonic() + timeout)
            self._cond.notify_all()
            while (self._waiting or self._running or self._calls) and self.alive:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.1))
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, timeout))
        with self._cond:
            left_over = [*self._waiting, *self._running.values()]
            calls = list(self._calls)
            self._waiting.clear()
            self._running.clear()
            self._calls.clear()
        cut = [t for t in left_over if not t.job.cancelled]
        for ticket in cut:
            self._send(ticket, Finished(ShuttingDown("the server shut down before finishing")))
        calls_cut = 0
        for _, future in calls:  # an echo's scoring: its request gets a 503
            if future.set_running_or_notify_cancel():
                future.set_exception(ShuttingDown("the server shut down before finishing"))
                calls_cut += 1
        return len(cut) + calls_cut

    def hurry(self) -> None:
        """End a :meth:`close` now (any thread): what is still running is cut at once."""
        with self._cond:
            self._deadline = time.monotonic()
            self._cond.notify_all()

    # requests ---------------------------------------------------------------------------------

    def submit(self, job: Job, sink: Sink) -> None:
        """Queue ``job``; raises :class:`QueueFull` or :class:`ShuttingDown` instead."""
        if job.n_rows > self.max_batch_size:
            raise ValueError(f"{job.n_rows} rows never fit a batch of {self.max_batch_size}")
        with self._cond:
            if self._draining or not self.alive:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self._waiting.append(_Ticket(job, sink, time.monotonic()))
            self._cond.notify_all()

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` on the worker thread between two steps; its result (or error) arrives in
        the returned future. Raises :class:`QueueFull` or :class:`ShuttingDown` instead."""
        future: Future[Any] = Future()
        with self._cond:
            if self._draining or not self.alive:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) + len(self._calls) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self._calls.append((fn, future))
            self._cond.notify_all()
        return future

    def cancel(self, job: Job) -> None:
        """Drop ``job`` (any thread): out of the queue now, out of the batch at the next step."""
        job.cancel()
        with self._cond:
            for ticket in list(self._waiting):
                if ticket.job is job:
                    self._waiting.remove(ticket)
            self._cond.notify_all()

    # the worker -------------------------------------------------------------------------------

    def _take(self) -> list[_Ticket]:
        """Queued requests that fit in the batch now, in arrival order (no overtaking)."""
        taken: list[_Ticket] = []
        rows = self.batch.live_rows
        while self._waiting:
            ticket = self._waiting[0]
            if ticket.job.cancelled:
                self._waiting.popleft()
                continue
            if rows + ticket.job.n_rows > self.max_batch_size or not self.batch.can_join:
                break
            self._waiting.popleft()
            rows += ticket.job.n_rows
            taken.append(ticket)
        return taken

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while (
                        not self._stop
                        and not self._waiting
                        and not self._calls
                        and not self.batch.live_rows
                    ):
                        self._reap()  # a job cancelled since the last step leaves now
                        self.batch.retire()  # free the caches of cancelled rows while idle
                        self._cond.wait()
                    if self._stop:
                        return
                    admitted = self._take()
                    self._running.update((t.job, t) for t in admitted)
                    calls = list(self._calls)
                    self._calls.clear()
                self._work(admitted, calls)
                del admitted, calls  # a finished request's models must not outlive it here

    def _work(self, admitted: list[_Ticket], calls: list[tuple[Callable[[], Any], Any]]) -> None:
        """Run the waiting calls, then one step with ``admitted`` joining."""
        for fn, future in calls:
            _run(fn, future)
        if calls and not admitted and not self._waiting and not self.batch.live_rows:
            return  # only calls were waiting: nothing to step
        try:
            updates = self.batch.step([t.job for t in admitted])
            self._admitted(admitted)
            self._dispatch(updates)
        except Exception as err:  # a bug or a broken model: fail the batch, keep serving
            log.exception("decode step failed; failing %d request(s)", self.running)
            self._fail_all(err)

    def _reap(self) -> None:
        """Drop cancelled jobs from :attr:`running` (with ``_cond`` held, on the worker thread).

        A client may cancel after the last step's :meth:`_dispatch` looked at its job: the job
        then has no live rows, so the worker would go idle with it still counted as running (a
        phantom in ``/health`` and the gauges, and a shutdown that waits its full timeout)."""
        gone = [job for job in self._running if job.cancelled]
        for job in gone:
            del self._running[job]
        if gone:
            self._cond.notify_all()

    def _admitted(self, tickets: list[_Ticket]) -> None:
        """Requeue what the batch deferred (at the front, in order); count the rest in."""
        deferred = self.batch.deferred
        with self._cond:
            for job in reversed(deferred):
                ticket = self._running.pop(job, None)
                if ticket is not None:
                    self._waiting.appendleft(ticket)
        now = time.monotonic()
        for ticket in tickets:
            if ticket.job not in deferred:
                self.metrics.queue_wait.observe(now - ticket.queued_at)
                self.metrics.prompt_tokens.inc(sum(ticket.job.prompt_tokens))

    def _dispatch(self, updates: list[tuple[Job, Any]]) -> None:
        stats, m = self.batch.stats, self.metrics
        if stats.rows:
            m.steps.inc()
            m.batch_rows.observe(stats.rows)
            m.generation_tokens.inc(len(updates))
        if stats.kl_rows:
            m.kl.add(stats.kl_sum, stats.kl_rows)
        for observe in self.observers:
            observe(stats)
        for job in stats.fallbacks:
            assert job.fell_back is not None
            m.fallbacks.inc(reason=job.fell_back.reason, to=job.fell_back.to)
        if stats.drafts_proposed:
            m.drafts_proposed.inc(stats.drafts_proposed)
            m.drafts_accepted.inc(stats.drafts_accepted)
        # only this thread changes _running while it runs, so reading it unlocked is safe
        tickets = dict(self._running)
        with self._cond:
            done = [
                t
                for job, t in tickets.items()
                if job.cancelled or job.error is not None or job.rows_left == 0
            ]
            for ticket in done:
                del self._running[ticket.job]
            self._cond.notify_all()
        per_job: dict[Job, list[Any]] = {}
        for job, update in updates:
            per_job.setdefault(job, []).append(update)
        for job, ups in per_job.items():
            if job in tickets and not job.cancelled and job.error is None:
                self._send(tickets[job], ups)
        for ticket in done:
            if ticket.job.cancelled:
                continue
            if ticket.job.error is not None:
                m.failures.inc()
            self._send(ticket, Finished(ticket.job.error))

    def _fail_all(self, err: BaseException) -> None:
        with self._cond:
            tickets = list(self._running.values())
            self._running.clear()
            self.batch.reset()
            self._cond.notify_all()
        for ticket in tickets:
            self.metrics.failures.inc()
            if not ticket.job.cancelled:
                self._send(ticket, Finished(err))

    def _send(self, ticket: _Ticket, event: Any) -> None:
        try:
            ticket.sink(event)
        except Exception:  # the receiving side is gone (its event loop closed)
            ticket.job.cancel()


def _run(fn: Callable[[], Any], future: Future[Any]) -> None:
    """``fn()`` into ``future`` (its error too: a bad call fails its request alone)."""
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except BaseException as err:
        future.set_exception(err)
