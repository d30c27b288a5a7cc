"""``generate --input FILE --output FILE``: a batch job (:func:`proxytune.jobs.run_jobs`), on
this process's models or on Ray actors that each load their own (:mod:`proxytune.distributed`)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..distributed import ray_executor
from ..jobs import run_jobs
from .options import Opt

if TYPE_CHECKING:
    from ..tuner import ProxyTuner


@dataclass(frozen=True)
class BatchJobOptions:
    """A batch job: prompts from a JSONL file, results to another, resumable."""

    input_file: Annotated[
        Path | None,
        Opt("--input", help="A JSONL file of prompts (a batch job; see proxytune.jobs)."),
    ] = None
    output_file: Annotated[
        Path | None,
        Opt("--output", help="With --input: the JSONL results, written as they come; resumed."),
    ] = None
    batch_size: Annotated[int, Opt(help="With --input: lines generated together.")] = 8
    stop_on_error: Annotated[
        bool, Opt(help="With --input: stop at the first bad line (default: record it, go on).")
    ] = False
    ray_actors: Annotated[
        int, Opt(help="With --input: run the batches on N Ray actors, each with its own models.")
    ] = 0
    ray_address: Annotated[
        str | None, Opt(help="With --ray-actors: a Ray cluster (default: a local one).")
    ] = None

    def check(self, prompts: list[str] | None) -> None:
        """Prompts or a job, and the job's options together."""
        if (self.input_file is None) != (self.output_file is None):
            raise typer.BadParameter("--input and --output go together (a batch job)")
        if self.input_file is not None and prompts:
            raise typer.BadParameter("give prompts or --input FILE, not both")
        if self.input_file is None and not prompts:
            raise typer.BadParameter("give at least one prompt, or --input FILE --output FILE")
        if self.on_ray and self.input_file is None:
            raise typer.BadParameter("--ray-actors and --ray-address run batch jobs: add --input")

    @property
    def on_ray(self) -> bool:
        return bool(self.ray_actors or self.ray_address)


def run_batch_job(
    job: BatchJobOptions, build: Callable[[], ProxyTuner], settings: dict[str, Any]
) -> None:
    """Run ``job`` with ``settings`` as every line's defaults on the tuner ``build`` loads, here
    or (``--ray-actors``) once on each Ray actor; a progress bar on stderr, a summary line."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    assert job.input_file is not None and job.output_file is not None
    tuner, executor = None, None
    if job.on_ray:
        executor = ray_executor(build, max(job.ray_actors, 1), address=job.ray_address)
    else:
        tuner = build()
    columns = ("lines", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("lines", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        summary = run_jobs(
            tuner,
            job.input_file,
            job.output_file,
            batch_size=job.batch_size,
            stop_on_error=job.stop_on_error,
            defaults=settings,
            progress=advance,
            executor=executor,
        )
    print(
        f"{summary.done} lines done, {summary.failed} failed, {summary.skipped} already in "
        f"{job.output_file} ({summary.tokens} tokens)",
        file=sys.stderr,
    )
