"""Run a task on a set of systems: per-example JSONL results, resumable, then the scores.

For each system the runner skips the examples already saved, runs the rest in batches
(generation, option likelihoods, or generated code in the sandbox), appends each batch to
``OUT/<system>.jsonl`` as soon as it is scored, and finally averages every metric over the
examples. With a ``tuned`` system and a ``base`` system it reports, per proxy system and
metric, the gap closed ``(proxy - base) / (tuned - base)``.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..errors import ConfigError, ProxyTuneError
from ..paths import need_file
from .extract import get_extractor
from .metrics import (
    gap_closed,
    get_generation_metric,
    mean,
    multiple_choice_scores,
    pass_at_k,
)
from .sandbox import run_programs
from .scoring import encode, render, score_sweep
from .store import ResultStore
from .systems import System
from .tasks import Task, code_program, option_continuations


@dataclass
class SystemResult:
    """One system's scores on one task."""

    name: str
    role: str
    alpha: float | None
    examples: int
    metrics: dict[str, float | None]
    path: str


@dataclass
class EvalReport:
    """Every system's scores, and the gap closed by each proxy system (needs base + tuned)."""

    task: str
    split: str
    out_dir: str
    systems: list[SystemResult]
    gap_closed: dict[str, dict[str, float | None]] = field(default_factory=dict)
    """``{proxy system: {metric: (proxy - base) / (tuned - base)}}``."""

    @property
    def metric_names(self) -> list[str]:
        names: list[str] = []
        for s in self.systems:
            names += [m for m in s.metrics if m not in names]
        return names

    def score(self, system: str, metric: str) -> float | None:
        for s in self.systems:
            if s.name == system:
                return s.metrics.get(metric)
        raise KeyError(system)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """A Markdown table: one row per system, one column per metric (and gap closed)."""
        metrics = self.metric_names
        head = ["system", "n", *metrics]
        gap_cols = [
            m for m in metrics if any(g.get(m) is not None for g in self.gap_closed.values())
        ]
        head += [f"gap closed ({m})" for m in gap_cols]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in self.systems:
            cells = [s.name, str(s.examples), *(_fmt(s.metrics.get(m)) for m in metrics)]
            gaps = self.gap_closed.get(s.name, {})
            cells += [_fmt_pct(gaps.get(m)) for m in gap_cols]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


Records = list[dict[str, Any]]


@dataclass(frozen=True)
class ScoringJob:
    """What a worker needs to score batches as :func:`evaluate` does (sent to Ray actors)."""

    task: Task
    decoding: dict[str, Any]
    gold_only: bool
    workers: int
    batch_size: int

    def scorer(self, systems: Sequence[System] = ()) -> _Scorer:
        """A scorer; ``systems`` that differ only in alpha then share one pass of the models."""
        return _Scorer(
            self.task, self.decoding, self.gold_only, self.workers, self.batch_size, systems
        )


BatchRunner = Callable[[ScoringJob, System, list[Records]], Iterator[tuple[Records, Records]]]
"""Scores ``system``'s batches, yielding ``(batch, records)`` as each is done, in any order
(:func:`proxytune.distributed.ray_eval_runner` spreads them over Ray actors)."""


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def evaluate(
    task: Task,
    systems: Sequence[System],
    out_dir: str | Path,
    *,
    split: str = "all",
    validation_size: int = 0,
    seed: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    resume: bool = True,
    progress: bool = True,
    workers: int = 2,
    gold_only: bool = False,
    settings: Mapping[str, Any] | None = None,
    write_summary: bool = True,
    runner: BatchRunner | None = None,
) -> EvalReport:
    """Evaluate every system on ``task``; results go to ``out_dir`` (see the module docstring).

    ``limit``: the first ``limit`` examples of the split. ``gold_only``: skip generation and
    report only the teacher-forced gold metrics (generate tasks with a ``gold`` template).
    ``settings`` override the task's decoding settings (``max_new_tokens``, ``n``, ...).
    ``runner``: where batches are scored (default: here, one after the other).
    """
    if not systems:
        raise ConfigError("no systems to evaluate")
    if gold_only and (task.kind != "generate" or task.gold is None):
        raise ConfigError(f"gold_only needs a generate task with a 'gold' template ({task.name!r})")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    examples = _examples(task, split, validation_size, seed, limit)
    decoding = _decoding(task, settings)
    out = Path(out_dir)
    job = ScoringJob(task, decoding, gold_only, workers, batch_size)
    scorer = job.scorer(systems)
    results = []
    for system in systems:
        store = ResultStore(out / f"{_safe(system.name)}.jsonl")
        store.open(
            {
                "task": task.name,
                "task_fingerprint": task.fingerprint(),
                "system": system.describe(),
                "decoding": decoding,
                "gold_only": gold_only,
            },
            resume=resume,
        )
        done = store.load()
        todo = [ex for ex in examples if ex["id"] not in done]
        bar = tqdm(
            total=len(examples),
            initial=len(examples) - len(todo),
            desc=f"{task.name} | {system.name}",
            unit="ex",
            disable=not progress,
        )
        batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
        scored = (runner or _run_here(scorer))(job, system, batches)
        for batch, records in scored:
            store.append(records)
            done.update({r["id"]: r for r in records})
            bar.update(len(batch))
        bar.close()
        rows = [done[ex["id"]] for ex in examples]
        results.append(
            SystemResult(
                name=system.name,
                role=system.role,
                alpha=system.alpha if isinstance(system.alpha, (int, float)) else None,
                examples=len(rows),
                metrics=aggregate(rows),
                path=str(store.path),
            )
        )
    report = EvalReport(task.name, split, str(out), results, gaps(results))
    if write_summary:
        # lazy: .report imports this module
        from .report import write_report

        write_report(report)
    return report


def _examples(
    task: Task, split: str, validation_size: int, seed: int, limit: int | None
) -> list[dict[str, Any]]:
    """The split's examples (the first ``limit``); refused where none is left."""
    examples = task.examples(split, validation_size, seed)
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise ConfigError(f"task {task.name!r} has no examples in split {split!r}")
    return examples


def _decoding(task: Task, settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The task's decoding settings with ``settings`` over them; several greedy samples are
    refused (they would all be the same)."""
    decoding = task.settings(**dict(settings or {}))
    if int(decoding.get("n", 1)) > 1 and not decoding.get("temperature"):
        raise ConfigError(
            f"n={decoding['n']} samples with greedy decoding are all the same; give a "
            "temperature > 0 (e.g. --temperature 0.8) to sample, or n=1"
        )
    return decoding


def _run_here(scorer: _Scorer) -> BatchRunner:
    """Score batches in this process, in order."""

    def run(
        job: ScoringJob, system: System, batches: list[Records]
    ) -> Iterator[tuple[Records, Records]]:
        for batch in batches:
            yield batch, score_batch(scorer, job, system, batch)

    return run


def score_batch(scorer: _Scorer, job: ScoringJob, system: System, batch: Records) -> Records:
    """``scorer.run``, with the task, system and examples named in its errors."""
    try:
        return scorer.run(system, batch)
    except ProxyTuneError as err:
        ids = [ex["id"] for ex in batch]
        raise type(err)(f"{job.task.name}, {system.name}, examples {ids}: {err}") from err


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """The mean of each per-example score over ``rows`` (missing values skipped)."""
    names: list[str] = []
    for r in rows:
        names += [m for m in r.get("scores", {}) if m not in names]
    return {m: mean(r.get("scores", {}).get(m) for r in rows) for m in names}


def gaps(results: Sequence[SystemResult]) -> dict[str, dict[str, float | None]]:
    """Gap closed per proxy system and metric, when there is one base and one tuned system."""
    base = next((r for r in results if r.role == "base"), None)
    tuned = next((r for r in results if r.role == "tuned"), None)
    if base is None or tuned is None:
        return {}
    return {
        r.name: {
            m: gap_closed(v, base.metrics.get(m), tuned.metrics.get(m))
            for m, v in r.metrics.items()
        }
        for r in results
        if r.role == "proxy"
    }


class _Scorer:
    """Turns a batch of examples into scored records for one system (per task kind)."""

    def __init__(
        self,
        task: Task,
        decoding: dict[str, Any],
        gold_only: bool,
        workers: int,
        batch_size: int,
        systems: Sequence[System] = (),
    ) -> None:
        self.task = task
        self.decoding = decoding
        self.gold_only = gold_only
        self.workers = workers
        self.batch_size = batch_size
        self.extract = get_extractor(task.extract)
        self.metrics = {m: load_metric(m, task.root) for m in task.metrics}
        # Systems that differ only in alpha share one pass of the models when scoring.
        self.groups: dict[str, list[System]] = {}
        by_key: dict[tuple[int, str], list[System]] = {}
        for s in systems:
            if isinstance(s.alpha, (int, float)) and s.tuner.pairs and not getattr(s, "prefix", ""):
                by_key.setdefault((id(s.tuner), repr(s.rule)), []).append(s)
        for group in by_key.values():
            if len(group) > 1:
                self.groups.update({s.name: group for s in group})
        self.memo: dict[tuple[str, str, str], Any] = {}

    def _score(self, system: System, prompts: list[str], conts: list[str]) -> list[Any]:
        """``system.score``; for a system of a same-models group, every alpha of the group is
        scored in the same pass and kept for the others."""
        group = self.groups.get(system.name)
        if group is None:
            return system.score(prompts, conts, batch_size=self.batch_size)
        keys = list(zip(prompts, conts, strict=True))
        missing = list(dict.fromkeys(k for k in keys if (system.name, *k) not in self.memo))
        if missing:
            tuner = system.tuner
            scored = score_sweep(
                tuner,
                [render(tuner, p) for p, _ in missing],
                [encode(tuner, c) for _, c in missing],
                [s.alpha for s in group],
                prompts=[p for p, _ in missing],
                rule=system.rule,
                batch_size=self.batch_size,
            )
            for member, results in zip(group, scored, strict=True):
                for key, result in zip(missing, results, strict=True):
                    self.memo[(member.name, *key)] = result
        found = {k: self.memo.pop((system.name, *k)) for k in dict.fromkeys(keys)}
        return [found[k] for k in keys]

    def run(self, system: System, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.task.kind == "multiple_choice":
            return self._choices(system, batch)
        if self.task.kind == "code":
            return self._code(system, batch)
        return self._generate(system, batch)

    def _samples(self, system: System, prompts: list[str]) -> list[list[Any]]:
        results = system.generate(prompts, **self.decoding)
        grouped: list[list[Any]] = [[] for _ in prompts]
        for r in results:
            grouped[r.prompt_index].append(r)
        return grouped

    def _generate(self, system: System, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        task = self.task
        prompts = [task.render(ex) for ex in batch]
        samples = [[] for _ in batch] if self.gold_only else self._samples(system, prompts)
        gold_scores = None
        if task.gold is not None:
            golds = [task.format(task.gold, ex) for ex in batch]
            gold_scores = self._score(system, prompts, golds)
        records = []
        for i, ex in enumerate(batch):
            texts = [r.text for r in samples[i]]
            answers = [self.extract(t) for t in texts]
            golds = task.golds(ex)
            scores: dict[str, float | None] = {}
            for fn in self.metrics.values():
                if texts:
                    per_sample = [fn(a, ex, golds) for a in answers]
                    for key in per_sample[0]:
                        scores[key] = mean(s.get(key) for s in per_sample)
            record: dict[str, Any] = {
                "id": ex["id"],
                "prompt": prompts[i],
                "outputs": texts,
                "finish_reasons": [r.finish_reason for r in samples[i]],
                "answers": answers,
                "golds": golds,
            }
            if gold_scores is not None:
                g = gold_scores[i]
                n_tok = max(len(g.token_ids), 1)
                scores["gold_logprob"] = g.logprob
                scores["gold_logprob_per_token"] = g.logprob / n_tok
                scores["gold_greedy"] = float(g.greedy)
                record["gold_tokens"] = len(g.token_ids)
            record["scores"] = scores
            records.append(record)
        return records

    def _choices(self, system: System, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        task = self.task
        prompts, conts, owner = [], [], []
        for i, ex in enumerate(batch):
            prompt = task.render(ex)
            for c in option_continuations(task, ex):
                prompts.append(prompt)
                conts.append(c)
                owner.append(i)
        scored = self._score(system, prompts, conts)
        records = []
        for i, ex in enumerate(batch):
            mine = [j for j, o in enumerate(owner) if o == i]
            logprobs = [scored[j].logprob for j in mine]
            lengths = [len(conts[j].encode("utf-8")) for j in mine]
            correct = task.correct(ex)
            scores = multiple_choice_scores(logprobs, lengths, correct)
            records.append(
                {
                    "id": ex["id"],
                    "prompt": task.render(ex),
                    "choices": task.options(ex),
                    "logprobs": logprobs,
                    "correct": correct,
                    "prediction": max(range(len(logprobs)), key=lambda k: (logprobs[k], -k)),
                    "scores": scores,
                }
            )
        return records

    def _code(self, system: System, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        task = self.task
        prompts = [task.render(ex) for ex in batch]
        samples = self._samples(system, prompts)
        marker = f"__proxytune_tests_done_{secrets.token_hex(8)}__"
        programs, owner = [], []
        for i, ex in enumerate(batch):
            for r in samples[i]:
                programs.append(code_program(task, ex, r.text, marker))
                owner.append(i)
        outcomes = run_programs(programs, task.timeout, self.workers, marker=marker)
        n = int(self.decoding.get("n", 1))
        records = []
        for i, ex in enumerate(batch):
            mine = [outcomes[j] for j, o in enumerate(owner) if o == i]
            c = sum(o.passed for o in mine)
            scores = {f"pass@{k}": pass_at_k(len(mine), c, k) for k in task.k if k <= len(mine)}
            records.append(
                {
                    "id": ex["id"],
                    "completions": [r.text for r in samples[i]],
                    "results": [{"status": o.status, "detail": o.detail} for o in mine],
                    "n": n,
                    "passed": c,
                    "scores": scores,
                }
            )
        return records


MetricFn = Callable[[str | None, Mapping[str, Any], Sequence[str]], dict[str, float | None]]


def load_metric(spec: str, root: str = "") -> MetricFn:
    """A generation metric by name, or a user function ``module:function`` /
    ``path/to/file.py:function`` (relative to the task file) called as ``fn(answer, example)``
    and returning a number, a bool, or a dict of named numbers."""
    if ":" not in spec:
        builtin = get_generation_metric(spec)
        return lambda answer, example, golds: {spec: builtin(answer, golds)}
    module_name, _, fn_name = spec.rpartition(":")
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser()
        if not path.is_absolute() and root:
            path = Path(root) / path
        need_file(path, "metric file")
        module_spec = importlib.util.spec_from_file_location(f"_metric_{path.stem}", path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ConfigError(f"metric {spec!r}: cannot import {module_name!r}: {err}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"metric {spec!r}: {module_name!r} has no function {fn_name!r}")

    def user(answer: str | None, example: Mapping[str, Any], golds: Sequence[str]):
        value = fn(answer, example)
        if isinstance(value, Mapping):
            return {str(k): None if v is None else float(v) for k, v in value.items()}
        return {fn_name: None if value is None else float(value)}

    return user


def _safe(name: str) -> str:
    """A system name as a file name: ``proxy@0.5`` stays, ``a/b`` becomes ``a_b``."""
    return re.sub(r"[^\w@.,=+-]", "_", name)
