"""Batch jobs over a Ray cluster: each actor holds one loaded tuner, batches go to free actors.

The driver reads the input, skips what the output already holds and writes results as batches
come back (:func:`proxytune.jobs.run_jobs` with :func:`ray_executor`), so a Ray job resumes
after a killed driver exactly as a local one does. Each actor builds its own tuner from a
picklable ``build()`` (the command line passes its model options), so no weights travel. An
actor that dies mid-batch is restarted and the batch is run again (Ray's ``max_restarts`` /
``max_task_retries``): nothing is lost, and since a batch's lines are written only once it
returns, nothing is written twice. Greedy and seeded results equal the single-process run:
every line is generated as it would be alone.

>>> pool = ray_executor(build, actors=2)  # doctest: +SKIP
>>> run_jobs(None, "in.jsonl", "out.jsonl", executor=pool)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .errors import ConfigError
from .extras import require
from .jobs import Batch, Executor, generate_batch

RESTARTS = 3
"""How often a dead actor is restarted (and its batch retried) before the job fails."""


class _TunerActor:
    """Holds one tuner; runs batches on it (the body of the Ray actor)."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self.tuner = build()

    def run(self, batch: Batch, settings: dict[str, Any]) -> Any:
        return generate_batch(self.tuner, batch, settings)


def connect(address: str | None, cpus: int | None = None) -> Any:
    """``ray`` connected to ``address`` (``None``: a local cluster started here, with ``cpus``
    CPUs), or a one-line error."""
    ray = require("ray", "ray", "--ray", package="ray")
    if ray.is_initialized():
        return ray
    if address is not None:
        _check_reachable(address)
    try:
        if address is None:
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except Exception as err:  # connection refused, bad address, version mismatch
        where = "a local Ray instance" if address is None else f"the Ray cluster at {address!r}"
        raise ConfigError(
            f"could not start or reach {where}: {type(err).__name__}: {err}; check the address "
            "(ray start --head prints it) or leave it out for a local cluster"
        ) from None
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse a ``host:port`` (or ``ray://host:port``) nobody answers on, at once: Ray itself
    keeps retrying for minutes."""
    import socket

    where = address.removeprefix("ray://")
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and other forms: let Ray resolve them
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise ConfigError(
            f"no Ray cluster answers at {address!r} ({err}); start one with `ray start --head` "
            "and give the address it prints, or leave --ray-address out for a local cluster"
        ) from None


def _pool(
    actor_class: type,
    build: Callable[[], Any],
    actors: int,
    address: str | None,
    cpus_per_actor: float,
    gpus_per_actor: float,
) -> tuple[Any, list[Any]]:
    """``ray`` and ``actors`` Ray actors of ``actor_class(build)``, restarted when they die."""
    if actors < 1:
        raise ConfigError(f"--ray-actors must be >= 1, got {actors}")
    ray = connect(address, cpus=None if address else max(1, int(actors * cpus_per_actor)))
    remote = ray.remote(
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
        max_restarts=RESTARTS,
        max_task_retries=RESTARTS,
    )(actor_class)
    return ray, [remote.remote(build) for _ in range(actors)]


def _spread(
    ray: Any,
    pool: list[Any],
    work: Sequence[Any],
    call: Callable[[Any, Any], Any],
    lines: Callable[[Any], str],
) -> Iterator[tuple[Any, Any]]:
    """Hand each item of ``work`` to a free actor (``call(actor, item)`` returns the task's
    object ref); yield ``(item, result)`` as each comes back."""
    queue = list(work)
    running: dict[Any, tuple[Any, Any]] = {}
    free = list(pool)
    while queue or running:
        while free and queue:
            actor, item = free.pop(), queue.pop(0)
            running[call(actor, item)] = (item, actor)
        ready, _ = ray.wait(list(running), num_returns=1)
        item, actor = running.pop(ready[0])
        free.append(actor)
        try:
            outcome = ray.get(ready[0])
        except ray.exceptions.RayError as err:
            raise ConfigError(
                f"a Ray actor failed {RESTARTS + 1} times on a batch ({lines(item)}): "
                f"{type(err).__name__}: {err}"
            ) from None
        yield item, outcome


def ray_executor(
    build: Callable[[], Any],
    actors: int = 2,
    *,
    address: str | None = None,
    cpus_per_actor: float = 1,
    gpus_per_actor: float = 0,
) -> Executor:
    """Run batches on ``actors`` Ray actors, each holding the tuner ``build()`` returns."""
    ray, pool = _pool(_TunerActor, build, actors, address, cpus_per_actor, gpus_per_actor)

    def run(work: Sequence[tuple[Batch, dict[str, Any]]]) -> Iterator[tuple[Batch, Any]]:
        for (batch, _), outcome in _spread(
            ray,
            pool,
            work,
            lambda actor, item: actor.run.remote(*item),
            lambda item: f"lines {item[0][0].line}-{item[0][-1].line}",
        ):
            yield batch, outcome

    return run


# evaluation ------------------------------------------------------------------------------


class _EvalActor:
    """Holds the tuners of an evaluation (``build()`` -> ``(tuner, tuned or None)``) and
    scores batches of any of its systems (the body of the Ray actor)."""

    def __init__(self, build: Callable[[], tuple[Any, Any]]) -> None:
        self.tuner, self.tuned = build()
        self.alone: dict[str, Any] = {}

    def run(self, job: Any, system: tuple[str, str, Any, Any, str], batch: list[Any]) -> Any:
        # lazy: torch loads in the Ray worker that scores, not in the driver
        from .evaluation.runner import score_batch
        from .evaluation.systems import System

        name, role, alpha, rule, source = system
        chosen = System(name, self._tuner(source), role, alpha, rule)
        return score_batch(job.scorer(), job, chosen, batch)

    def _tuner(self, source: str) -> Any:
        if source == PROXY:
            return self.tuner
        if source == TUNED:
            return self.tuned
        if source not in self.alone:
            self.alone[source] = self.tuner.alone(source)
        return self.alone[source]


PROXY, TUNED = "proxy", "tuned"


def system_source(system: Any, tuner: Any, tuned: Any = None) -> str:
    """Which of an evaluation's tuners ``system`` runs on: ``proxy`` (``tuner``), ``tuned``,
    or the role of the ``tuner`` member it runs alone (``base``, ``expert[0]``)."""
    if system.tuner is tuner:
        return PROXY
    if tuned is not None and system.tuner is tuned:
        return TUNED
    if not system.tuner.pairs:
        alone = system.tuner.base
        for member in tuner.members:
            if member.model is alone.model and member.prompt == alone.prompt:
                return str(member.role)
    raise ConfigError(f"system {system.name!r} runs on a tuner the Ray actors do not hold")


def ray_eval_runner(
    build: Callable[[], tuple[Any, Any]],
    source: Callable[[Any], str],
    actors: int = 2,
    *,
    address: str | None = None,
    cpus_per_actor: float = 1,
    gpus_per_actor: float = 0,
) -> Any:
    """A :data:`~proxytune.evaluation.runner.BatchRunner` over ``actors`` Ray actors, each
    holding the tuners ``build()`` returns; ``source(system)`` names a system's tuner
    (:func:`system_source`). Results equal the local run's: each batch is scored as it would be
    here, and written by the driver once it returns."""
    ray, pool = _pool(_EvalActor, build, actors, address, cpus_per_actor, gpus_per_actor)

    def run(job: Any, system: Any, batches: list[Any]) -> Iterator[tuple[Any, Any]]:
        job_ref = ray.put(job)
        spec = (system.name, system.role, system.alpha, system.rule, source(system))
        yield from _spread(
            ray,
            pool,
            batches,
            lambda actor, batch: actor.run.remote(job_ref, spec, batch),
            lambda batch: f"{system.name}, examples {batch[0]['id']}..{batch[-1]['id']}",
        )

    return run
