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


def ray_executor(
    build: Callable[[], Any],
    actors: int = 2,
    *,
    address: str | None = None,
    cpus_per_actor: float = 1,
    gpus_per_actor: float = 0,
) -> Executor:
    """Run batches on ``actors`` Ray actors, each holding the tuner ``build()`` returns."""
    if actors < 1:
        raise ConfigError(f"--ray-actors must be >= 1, got {actors}")
    ray = connect(address, cpus=None if address else max(1, int(actors * cpus_per_actor)))
    remote = ray.remote(
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
        max_restarts=RESTARTS,
        max_task_retries=RESTARTS,
    )(_TunerActor)
    pool = [remote.remote(build) for _ in range(actors)]

    def run(work: Sequence[tuple[Batch, dict[str, Any]]]) -> Iterator[tuple[Batch, Any]]:
        queue = list(work)
        running: dict[Any, tuple[Batch, Any]] = {}
        free = list(pool)
        while queue or running:
            while free and queue:
                actor = free.pop()
                batch, settings = queue.pop(0)
                running[actor.run.remote(batch, settings)] = (batch, actor)
            ready, _ = ray.wait(list(running), num_returns=1)
            batch, actor = running.pop(ready[0])
            free.append(actor)
            try:
                outcome = ray.get(ready[0])
            except ray.exceptions.RayError as err:
                raise ConfigError(
                    f"a Ray actor failed {RESTARTS + 1} times on a batch (lines "
                    f"{batch[0].line}-{batch[-1].line}): {type(err).__name__}: {err}"
                ) from None
            yield batch, outcome

    return run
