"""The fallback scheduler core: each request runs the tuner's own loop, interleaved by step.

:class:`~proxytune.engine.continuous.ContinuousBatch` runs requests in one batch so that they
share forwards. Tuners whose generation runs another loop (a black-box API base that returns
top-k log-probabilities, a pair of another tokenizer: ``tuner.blackbox``) are served by
:class:`EngineLoop` instead: every request is ``tuner.steps(...)`` itself, exactly what
``ProxyTuner.generate`` runs, and the worker advances every running request by one step in
turn. Requests make progress together and stay exact, but do not share forwards, and the
steering-KL metric is not measured.

The server's ``speculative`` option runs here too: every request is
``tuner.steps(..., speculative=K)`` (:mod:`proxytune.engine.speculative`), which lowers each
request's latency (fewer base forwards per token) at the price of continuous batching's sharing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..engine.continuous import Job, RequestCore, StepStats
from ..engine.prepare import Prepared
from ..engine.speculative import SpeculativeStats
from ..results import StepUpdate

if TYPE_CHECKING:
    from ..tuner import ProxyTuner


class EngineLoop(RequestCore):
    """Same interface as :class:`~proxytune.engine.continuous.ContinuousBatch`, for the
    scheduler.

    ``speculative``: a draft length or ``"auto"`` for every request (``None``: the plain
    loop); :attr:`speculation` sums the drafts of every request since start."""

    def __init__(self, tuner: ProxyTuner, speculative: int | str | None = None) -> None:
        self.tuner = tuner
        self.speculative = speculative
        self.speculation = SpeculativeStats()
        self.running: list[Job] = []
        self.stats = StepStats()
        self.deferred: list[Job] = []
        self.can_join = True

    def job(self, prepared: Prepared) -> Job:
        """A prepared request with its own iterator of the tuner's loop (the models run only
        as it is consumed)."""
        extra: dict[str, Any] = {}
        if self.speculative is not None:
            extra = {"speculative": self.speculative, "stats": self.speculation}
        return Job(prepared, steps=self.tuner.run(prepared, **extra))

    @property
    def live_rows(self) -> int:
        return sum(j.rows_left for j in self.running if not j.cancelled and j.error is None)

    def retire(self) -> None:
        """Close the iterators of finished, cancelled and failed jobs (that stops their work)."""
        keep = []
        for job in self.running:
            if job.cancelled or job.error is not None or job.rows_left == 0:
                job.steps.close()  # type: ignore[union-attr]
            else:
                keep.append(job)
        self.running = keep

    def reset(self) -> None:
        for job in self.running:
            job.steps.close()  # type: ignore[union-attr]
        self.running = []

    def step(self, new_jobs: Sequence[Job] = ()) -> list[tuple[Job, StepUpdate]]:
        """One step of every running request, in arrival order."""
        self.stats = StepStats()
        before = (self.speculation.proposed, self.speculation.accepted)
        self.retire()
        for job in new_jobs:
            if not job.cancelled:
                job.rows_left = job.n_rows
                self.running.append(job)
        out = []
        for job in self.running:
            try:
                updates = next(job.steps)  # type: ignore[arg-type]
            except Exception as err:  # its models or rule failed: this request alone
                job.error = (
                    err
                    if not isinstance(err, StopIteration)
                    else RuntimeError("the engine stopped before every row finished")
                )
                self.stats.failed.append(job)
                continue
            for u in updates:
                if u.finish_reason is not None:
                    job.rows_left -= 1
                out.append((job, u))
        self.stats.rows = len(out)
        self.stats.drafts_proposed = self.speculation.proposed - before[0]
        self.stats.drafts_accepted = self.speculation.accepted - before[1]
        return out
