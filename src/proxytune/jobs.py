"""Batch generation from a JSONL file into a JSONL file, resumable after a kill.

Input, one JSON object per line::

    {"id": "q1", "prompt": "Write a haiku about rain."}
    {"id": "q2", "messages": [{"role": "user", "content": "Hi"}], "alpha": 0.5, "seed": 3}

``prompt`` (a string) or ``messages`` (a chat); optional ``id`` (default: ``line-N``, N from
1), ``alpha`` (a number, one per pair, or a schedule) and any generation setting
(``max_new_tokens``, ``temperature``, ``seed``, ``n``, ``stop``, ...). Output, one object per
input line, written as soon as that line is done (in input order within a batch)::

    {"id": "q1", "results": [{"text": ..., "token_ids": [...], "finish_reason": ...}]}

A line that cannot be read or run becomes ``{"id": ..., "line": N, "error": "..."}`` and the
job goes on (or stops with ``stop_on_error``). Lines with the same settings are generated
together, ``batch_size`` at a time; greedy and seeded outputs do not depend on the batching.
Resuming: ids already in the output are skipped and a torn last line (a kill mid-write) is
cut off first; nothing else in the output is rewritten.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import GenerationConfig
from .errors import ConfigError, ProxyTuneError
from .evaluation.store import load_records
from .paths import need_file

if TYPE_CHECKING:
    from .tuner import ProxyTuner

SETTINGS = frozenset(f for f in GenerationConfig.__dataclass_fields__ if f != "eos_token_ids")
"""Generation settings a line may carry."""


@dataclass(frozen=True)
class JobLine:
    """One input line: its id, prompt and per-line settings (or the reason it is unusable)."""

    line: int
    id: str
    prompt: Any = None
    alpha: Any = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def key(self) -> str:
        """Lines with equal keys can be generated in one batch."""
        return json.dumps([self.alpha, dict(self.settings)], sort_keys=True, default=str)


def parse_line(text: str, number: int) -> JobLine:
    """One input line, checked; problems become :attr:`JobLine.error` naming the line."""
    default_id = f"line-{number}"
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as err:
        return JobLine(number, default_id, error=f"line {number}: not valid JSON ({err})")
    if not isinstance(data, Mapping):
        return JobLine(number, default_id, error=f"line {number}: expected a JSON object")
    raw_id = data.get("id", default_id)
    job_id = raw_id if isinstance(raw_id, str) else json.dumps(raw_id)
    prompt = data.get("prompt", data.get("messages"))
    if ("prompt" in data) == ("messages" in data):
        return JobLine(number, job_id, error=f"line {number}: give 'prompt' or 'messages'")
    if not isinstance(prompt, str | list) or not prompt:
        return JobLine(
            number, job_id, error=f"line {number}: 'prompt' must be a non-empty string "
            "and 'messages' a non-empty list of messages"
        )  # fmt: skip
    unknown = sorted(set(data) - {"id", "prompt", "messages", "alpha"} - SETTINGS)
    if unknown:
        return JobLine(
            number, job_id, error=f"line {number}: unknown key(s) {unknown}; settings: "
            f"{sorted(SETTINGS)}"
        )  # fmt: skip
    settings = {k: v for k, v in data.items() if k in SETTINGS}
    try:
        GenerationConfig().updated(**settings)
    except (ConfigError, TypeError) as err:
        return JobLine(number, job_id, error=f"line {number}: {err}")
    return JobLine(number, job_id, prompt, data.get("alpha"), settings)


def read_lines(path: Path) -> list[JobLine]:
    """Every non-blank input line, parsed; a repeated id is an error on its later line."""
    lines, seen = [], set()
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            job = parse_line(text, number)
            if job.error is None and job.id in seen:
                job = JobLine(number, job.id, error=f"line {number}: id {job.id!r} repeats")
            seen.add(job.id)
            lines.append(job)
    return lines


def finished_ids(path: Path) -> set[str]:
    """Ids already written to the output (:func:`~proxytune.evaluation.store.load_records`:
    a torn last line is cut off; a file this command did not write is refused)."""
    return set(load_records(path))


def batches(lines: Sequence[JobLine], size: int) -> Iterator[list[JobLine]]:
    """Runnable lines grouped by settings, in input order, ``size`` at a time."""
    groups: dict[str, list[JobLine]] = {}
    for job in lines:
        groups.setdefault(job.key, []).append(job)
    for group in groups.values():
        for start in range(0, len(group), size):
            yield group[start : start + size]


@dataclass
class Summary:
    """What a run did."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    tokens: int = 0


Batch = list[JobLine]
Outcome = list[dict[str, Any]] | ProxyTuneError
"""A batch's rows (one list of result rows per line, in the batch's order) or its error."""
Executor = Callable[[Sequence[tuple[Batch, dict[str, Any]]]], Iterator[tuple[Batch, Any]]]
"""Runs ``(batch, settings)`` pairs; yields each batch with, per line, its result rows (or a
:class:`ProxyTuneError` for the whole batch) as batches finish, in any order."""


def generate_batch(tuner: ProxyTuner, batch: Batch, settings: Mapping[str, Any]) -> Any:
    """One batch on ``tuner``: per line, its result rows; a bad setting is the error."""
    try:
        results = tuner.generate([j.prompt for j in batch], batch[0].alpha, **settings)
    except ProxyTuneError as err:
        return err
    return [[_row(r) for r in results if r.prompt_index == i] for i in range(len(batch))]


def local_executor(tuner: ProxyTuner) -> Executor:
    """Batches one after the other in this process."""

    def run(work: Sequence[tuple[Batch, dict[str, Any]]]) -> Iterator[tuple[Batch, Any]]:
        for batch, settings in work:
            yield batch, generate_batch(tuner, batch, settings)

    return run


def run_jobs(
    tuner: ProxyTuner | None,
    input_path: str | Path,
    output_path: str | Path,
    *,
    batch_size: int = 8,
    stop_on_error: bool = False,
    defaults: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    executor: Executor | None = None,
) -> Summary:
    """Generate every line of ``input_path`` not yet in ``output_path`` (see the module doc).

    ``defaults``: settings for lines that do not set them (the command line's);
    ``progress(done, total)`` is called after each batch; ``executor``: where batches run
    (default: on ``tuner``, here; :func:`proxytune.distributed.ray_executor`: Ray actors).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if executor is None:
        if tuner is None:
            raise ConfigError("give a tuner or an executor")
        executor = local_executor(tuner)
    source, target = Path(input_path).expanduser(), Path(output_path).expanduser()
    need_file(source, "input file")
    if target.exists() and source.resolve() == target.resolve():
        raise ConfigError("the output must be another file than the input")
    lines = read_lines(source)
    done = finished_ids(target)
    todo = [j for j in lines if j.id not in done]
    summary = Summary(skipped=len(lines) - len(todo))
    base = {k: v for k, v in (defaults or {}).items() if v is not None}
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("a", encoding="utf-8") as out:

        def write(row: Mapping[str, Any]) -> None:
            out.write(json.dumps(row) + "\n")
            out.flush()

        for job in (j for j in todo if j.error is not None):
            summary.failed += 1
            write({"id": job.id, "line": job.line, "error": job.error})
            if stop_on_error:
                raise ConfigError(f"{job.error} (stopped: --stop-on-error)")
        runnable = [j for j in todo if j.error is None]
        work = [(group, {**base, **group[0].settings}) for group in batches(runnable, batch_size)]
        for group, outcome in executor(work):
            if isinstance(outcome, ProxyTuneError):
                if stop_on_error:
                    raise outcome
                for job in group:
                    summary.failed += 1
                    write({"id": job.id, "line": job.line, "error": f"line {job.line}: {outcome}"})
            else:
                for job, rows in zip(group, outcome, strict=True):
                    summary.tokens += sum(r["completion_tokens"] for r in rows)
                    summary.done += 1
                    write({"id": job.id, "results": rows})
            if progress is not None:
                progress(summary.done + summary.failed, len(todo))
    return summary


def _row(result: Any) -> dict[str, Any]:
    """A result as written: ``prompt_index`` is dropped (it counts within a batch, which
    depends on how lines were grouped); ``sample_index`` stays."""
    row = result.to_dict()
    row.pop("prompt_index", None)
    return row


def iter_results(path: str | Path) -> Iterable[dict[str, Any]]:
    """The objects of an output file, in order."""
    with Path(path).expanduser().open(encoding="utf-8") as f:
        for text in f:
            if text.strip():
                yield json.loads(text)
