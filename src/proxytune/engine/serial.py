"""The other request core: each request runs the tuner's own loop, interleaved by step.

:class:`~.continuous.ContinuousBatch` runs requests in one batch so that they
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

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from ..results import StepUpdate
from .controls import Steerable
from .crosstok import VocabMap
from .fallback import FellBack, continuation, fallback_target
from .plain import decode
from .prepare import Prepared
from .requests import Job, RequestCore, StepStats
from .speculative import SpeculativeStats


class RunsItsLoop(Steerable, Protocol):
    """A tuner that decodes a prepared request in its own loop (``ProxyTuner`` is one)."""

    cross_maps: dict[int, VocabMap]
    """Pair index -> the map of a pair of another tokenizer."""

    def run(
        self, prepared: Prepared, *, speculative: int | str | None = None, stats: Any = None
    ) -> Iterator[list[StepUpdate]]: ...


class EngineLoop(RequestCore):
    """The :class:`~.requests.RequestCore` of tuners whose requests cannot share a batch.

    ``speculative``: a draft length or ``"auto"`` for every request (``None``: the plain
    loop); :attr:`speculation` sums the drafts of every request since start."""

    def __init__(self, tuner: RunsItsLoop, speculative: int | str | None = None) -> None:
        self.tuner = tuner
        self.speculative = speculative
        self.speculation = SpeculativeStats()
        self.running: list[Job] = []
        self.generated: dict[Job, dict[int, list[int]]] = {}
        """Per running job and row: the ids emitted so far (what a fallback continues)."""
        self.finished: dict[Job, set[int]] = {}
        """Per running job: its rows that finished."""
        self.stats = StepStats()
        self.deferred: list[Job] = []

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

    @property
    def can_join(self) -> bool:
        """Always: every request runs its own loop."""
        return True

    def retire(self) -> None:
        """Close the iterators of finished, cancelled and failed jobs (that stops their work)."""
        keep = []
        for job in self.running:
            if job.cancelled or job.error is not None or job.rows_left == 0:
                job.steps.close()  # type: ignore[union-attr]
                self.generated.pop(job, None)
                self.finished.pop(job, None)
            else:
                keep.append(job)
        self.running = keep

    def reset(self) -> None:
        for job in self.running:
            job.steps.close()  # type: ignore[union-attr]
        self.running = []
        self.generated, self.finished = {}, {}

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
            except StopIteration:
                job.error = RuntimeError("the engine stopped before every row finished")
                self.stats.failed.append(job)
                continue
            except Exception as err:  # its models or rule failed: this request alone...
                try:  # ...unless its fallback can finish it
                    updates = self._fall_back(job, err)
                except Exception as again:
                    err, updates = again, None
                if updates is None:
                    job.error = err
                    self.stats.failed.append(job)
                    continue
            mine = self.generated.setdefault(job, {})
            for u in updates:
                mine.setdefault(u.row, []).append(u.token_id)
                if u.finish_reason is not None:
                    job.rows_left -= 1
                    self.finished.setdefault(job, set()).add(u.row)
                out.append((job, u))
        self.stats.rows = len(out)
        self.stats.drafts_proposed = self.speculation.proposed - before[0]
        self.stats.drafts_accepted = self.speculation.accepted - before[1]
        return out

    def _fall_back(self, job: Job, err: BaseException) -> list[StepUpdate] | None:
        """Continue ``job``'s unfinished rows on its fallback model alone (from the tokens they
        emitted) and return that loop's first step; ``None`` where its policy is ``fail`` or no
        model can take over (an API base, a pair of another tokenizer)."""
        if job.fallback == "fail" or job.fell_back is not None:
            return None
        p = job.prepared
        target = fallback_target(p, job.fallback, None, set(self.tuner.cross_maps))
        if target is None:
            return None
        index, member = target
        generated, done = self.generated.get(job, {}), self.finished.get(job, set())
        rows = [r for r in range(p.n_rows) if r not in done]
        step = max((len(ids) for ids in generated.values()), default=0)
        job.steps.close()  # type: ignore[union-attr]
        job.steps = _remapped(decode(continuation(p, member, rows, generated)), rows, p.config.n)
        job.fell_back = FellBack.of("base" if index is None else "expert", err, step)
        self.stats.fallbacks.append(job)
        return next(job.steps)


def _remapped(
    steps: Iterator[list[StepUpdate]], rows: list[int], n: int
) -> Iterator[list[StepUpdate]]:
    """A continuation's updates under the rows they continue (row ``i`` there is ``rows[i]``)."""
    try:
        for updates in steps:
            yield [
                dataclasses.replace(
                    u, row=rows[u.row], prompt_index=rows[u.row] // n, sample_index=rows[u.row] % n
                )
                for u in updates
            ]
    finally:
        steps.close()
