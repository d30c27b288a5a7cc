"""``reproduce``: the paper's experiment in miniature, from nothing, resumable stage by stage.

Stages (each stamped in ``OUT/stages/NAME.json`` with the settings it depends on; a stage
whose stamp matches is skipped, one whose stamp differs is refused by name):

1. ``data``: disjoint train / validation / test splits per task (``OUT/data/TASK/``) and
   the joint training file ``OUT/data/train.jsonl`` (every task's train split).
2. ``expert``: LoRA SFT of the small model (``OUT/expert``); the anti-expert is the small
   model untuned, so the pair runs as the one-pass LoRA pair.
3. ``tuned``: the big model tuned directly on the same data, same recipe (``OUT/tuned``).
4. ``validation``: every rule at every alpha on each task's validation split; the best alpha
   per task and rule by the task's primary metric.
5. ``test``: base, expert, tuned and each rule at its chosen alpha on the test split.
6. ``analysis``: token-level records of what the proxy changed on test prompts.
7. ``report``: ``results.md`` / ``.csv`` / ``.json`` with 95% bootstrap intervals and gap
   closed, and ``alpha_sweep.png``; rewritten on every run from the stored results.

Evaluation itself resumes inside a stage (per system and batch, :mod:`..evaluation.store`).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .config import RULES, ReproduceConfig, changed_settings, differences, settings_key
from .tasks import SPLITS, eval_task, make_splits, sft_rows, task_kind

STAGES = ("data", "expert", "tuned", "validation", "test", "analysis", "report")
MARKER = "reproduce.json"

Log = Callable[[str], None]


class Experiment:
    """One output directory and the stages that fill it."""

    def __init__(self, config: ReproduceConfig, log: Log = print) -> None:
        self.config = config
        self.out = Path(config.out).expanduser()
        self.log = log
        self._models: dict[str, Any] = {}

    # bookkeeping ---------------------------------------------------------------------------

    def open(self) -> None:
        """Create ``OUT`` or check that it holds this experiment (never another one)."""
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {str(self.out)!r} is a file; give a directory")
        marker = self.out / MARKER
        if self.out.is_dir() and any(self.out.iterdir()) and not marker.is_file():
            raise ConfigError(
                f"--out {str(self.out)!r} is not empty and holds no reproduction "
                f"({MARKER} is missing); give a new or empty directory"
            )
        finished = list((self.out / "stages").glob("*.json"))
        if marker.is_file() and finished:  # without finished stages there is nothing to keep
            try:
                old = json.loads(marker.read_text(encoding="utf-8"))["settings"]["data"]
            except (ValueError, KeyError, TypeError):
                raise ConfigError(
                    f"{str(marker)!r} is damaged; give another --out (the results there are "
                    "kept as they are)"
                ) from None
            changed = differences(old, self.config.stage_settings("data"))
            if changed:
                raise ConfigError(
                    f"--out {str(self.out)!r} holds another experiment (data settings "
                    f"differ: {'; '.join(changed[:4])}); give another --out"
                )
        self.out.mkdir(parents=True, exist_ok=True)
        marker.write_text(
            json.dumps(
                {
                    "settings": {"data": self.config.stage_settings("data")},
                    "config": self.config.to_dict(),
                },
                indent=2,
                default=str,
            ),
            encoding="utf-8",
        )

    def stamp_path(self, stage: str) -> Path:
        return self.out / "stages" / f"{stage}.json"

    def done(self, stage: str) -> dict[str, Any] | None:
        """The stamp of a finished stage with these settings; refuses one with others."""
        path = self.stamp_path(stage)
        if not path.is_file():
            return None
        try:
            stamp = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise ConfigError(
                f"{str(path)!r} is damaged; delete it to run stage {stage!r} again"
            ) from None

        changed = changed_settings(stamp, self.config.stage_settings(stage))
        if changed is not None:
            raise ConfigError(
                f"stage {stage!r} in {str(self.out)!r} was finished with other settings "
                f"({changed}); results are never mixed: give another --out "
                "(or put the old settings back)"
            )
        return stamp

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Run the body unless the stage is done; stamp it with its wall time and summary."""
        info: dict[str, Any] = {"skipped": False}
        stamp = self.done(name)
        if stamp is not None:
            info.update(skipped=True, **stamp.get("result", {}))
            self.log(f"[{name}] done earlier ({stamp['seconds']:.0f} s): skipped")
            yield info
            return
        start = time.perf_counter()
        yield info
        seconds = time.perf_counter() - start
        settings = self.config.stage_settings(name)
        result = {k: v for k, v in info.items() if k != "skipped"}
        path = self.stamp_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "stage": name,
                    "key": settings_key(settings),
                    "settings": settings,
                    "seconds": seconds,
                    "result": result,
                },
                indent=2,
                default=str,
            ),
            encoding="utf-8",
        )
        tmp.replace(path)
        summary = info.get("summary", "")
        self.log(f"[{name}] {summary}{'; ' if summary else ''}{seconds:.0f} s")

    # stages --------------------------------------------------------------------------------

    def run(self, until: str = "report") -> dict[str, Any]:
        """Run (or skip) every stage up to ``until``; return the report's data."""
        if until not in STAGES:
            raise ConfigError(f"unknown stage {until!r}; stages are {', '.join(STAGES)}")
        self.open()
        last = STAGES.index(until)
        steps = [
            self.make_data,
            self.train_expert,
            self.train_tuned,
            self.validate,
            self.test,
            self.analyze,
            self.report,
        ]
        result: dict[str, Any] = {}
        for step in steps[: last + 1]:
            result = step() or result
        return result

    def data_file(self, task: str, split: str) -> Path:
        return self.out / "data" / task / f"{split}.jsonl"

    def make_data(self) -> None:
        with self.stage("data") as info:
            if info["skipped"]:
                return
            counts = {}
            train: list[dict[str, str]] = []
            for name in self.config.tasks:
                kind = task_kind(name)
                splits = make_splits(kind, self.config.split_sizes(name), self.config.seed)
                for split in SPLITS:
                    _write_jsonl(self.data_file(name, split), splits[split])
                train += sft_rows(kind, splits["train"])
                counts[name] = {s: len(splits[s]) for s in SPLITS}
            random.Random(self.config.seed).shuffle(train)
            _write_jsonl(self.out / "data" / "train.jsonl", train)
            info["counts"] = counts
            info["summary"] = (
                ", ".join(
                    f"{t} {c['train']}/{c['validation']}/{c['test']}" for t, c in counts.items()
                )
                + f" (train/validation/test); {len(train)} training lines"
            )

    def _train(self, stage: str, model: str) -> None:
        from ..training import TrainConfig, train
        from ..training.output import read_meta

        out = self.out / stage
        with self.stage(stage) as info:
            if info["skipped"]:
                return
            meta = read_meta(out)
            has_checkpoint = meta is not None and any(out.glob("checkpoint-*"))
            self._check_started(stage, has_checkpoint)
            config = TrainConfig(
                model=model,
                data=str(self.out / "data" / "train.jsonl"),
                out=str(out),
                lora=True,
                lora_r=self.config.lora_r,
                lora_alpha=2.0 * self.config.lora_r,
                template="raw",
                epochs=self.config.epochs,
                learning_rate=self.config.learning_rate,
                batch_size=self.config.train_batch_size,
                eval_fraction=0.0,
                warmup=0.1,
                seed=self.config.seed,
                device=self.config.device,
                resume=has_checkpoint,
                overwrite=meta is not None and not has_checkpoint,
                progress=self.config.progress,
            )
            result = train(config)
            losses = result.train_losses
            info["train_loss_first_last"] = [losses[0], losses[-1]] if losses else None
            info["summary"] = f"LoRA of {model}" + (
                f", loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else ""
            )

    def _check_started(self, stage: str, resuming: bool) -> None:
        """Record the settings an interrupted stage started with; resume only under those."""
        path = self.out / "stages" / f"{stage}.started.json"
        settings = self.config.stage_settings(stage)
        if resuming and path.is_file():
            started = json.loads(path.read_text(encoding="utf-8"))
            changed = changed_settings(started, settings)
            if changed is not None:
                raise ConfigError(
                    f"stage {stage!r} was interrupted in {str(self.out / stage)!r} under other "
                    f"settings ({changed}); put them back to resume it, or give another --out"
                )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps({"key": settings_key(settings), "settings": settings}, default=str),
            encoding="utf-8",
        )

    def train_expert(self) -> None:
        self._train("expert", self.config.small)

    def train_tuned(self) -> None:
        self._train("tuned", self.config.big)

    # models ------------------------------------------------------------------------------

    def proxy_tuner(self) -> Any:
        """Base = big model, expert = the trained LoRA, anti-expert = the small model; every
        model reads the same raw prompt (the expert was tuned on it)."""
        if "proxy" not in self._models:
            from ..specs import ModelSpec
            from ..tuner import ProxyTuner

            opts = {
                "device": self.config.device,
                "dtype": self.config.dtype,
                "backend": self.config.backend,
            }
            self._models["proxy"] = ProxyTuner.from_specs(
                ModelSpec(self.config.big, prompt="raw", **opts),
                [
                    (
                        ModelSpec(
                            self.config.small,
                            adapter=str(self.out / "expert"),
                            prompt="raw",
                            **opts,
                        ),
                        ModelSpec(self.config.small, prompt="raw", **opts),
                        1.0,
                    )
                ],
            )
        return self._models["proxy"]

    def tuned_tuner(self) -> Any:
        if "tuned" not in self._models:
            from ..specs import ModelSpec
            from ..tuner import ProxyTuner

            self._models["tuned"] = ProxyTuner.from_specs(
                ModelSpec(
                    self.config.big,
                    adapter=str(self.out / "tuned"),
                    prompt="raw",
                    device=self.config.device,
                    dtype=self.config.dtype,
                    backend=self.config.backend,
                )
            )
        return self._models["tuned"]

    def _evaluate(self, task: str, split: str, systems: list[Any]) -> Any:
        from ..evaluation import evaluate

        kind = task_kind(task)
        try:
            return evaluate(
                eval_task(kind, str(self.data_file(task, split))),
                systems,
                self.out / "eval" / task / split,
                batch_size=self.config.eval_batch_size,
                progress=self.config.progress,
                write_summary=False,
            )
        except ConfigError as err:
            if "other settings" not in str(err):
                raise
            raise ConfigError(
                f"{str(err).split(' (changed')[0]}: results are never mixed; give another --out"
            ) from None

    # evaluation stages -------------------------------------------------------------------

    def validate(self) -> dict[str, Any]:
        from ..evaluation.systems import System

        with self.stage("validation") as info:
            if info["skipped"]:
                return {}
            tuner = self.proxy_tuner()
            chosen: dict[str, dict[str, float]] = {}
            sweep: dict[str, dict[str, dict[str, float | None]]] = {}
            for task in self.config.tasks:
                kind = task_kind(task)
                systems = [
                    System(f"{rule}@{a:g}", tuner, "proxy", float(a), RULES[rule])
                    for rule in self.config.rules
                    for a in self.config.alphas
                ]
                report = self._evaluate(task, "validation", systems)
                chosen[task], sweep[task] = {}, {}
                for rule in self.config.rules:
                    points = {
                        f"{a:g}": report.score(f"{rule}@{a:g}", kind.primary)
                        for a in self.config.alphas
                    }
                    sweep[task][rule] = points
                    # the best score; ties go to the smaller alpha (the gentler steer)
                    best = max(self.config.alphas, key=lambda a, p=points: (p[f"{a:g}"] or 0, -a))
                    chosen[task][rule] = float(best)
            info["chosen"] = chosen
            info["sweep"] = sweep
            info["summary"] = "; ".join(
                f"{t}: proxy alpha {c['proxy']:g}" for t, c in chosen.items()
            )
        return {}

    def chosen_alphas(self) -> dict[str, dict[str, float]]:
        stamp = self.done("validation")
        if stamp is None:
            raise ConfigError("the validation stage has not run")
        return stamp["result"]["chosen"]

    def test_systems(self, task: str) -> list[Any]:
        from ..evaluation.systems import System

        tuner = self.proxy_tuner()
        chosen = self.chosen_alphas()[task]
        systems = [
            System("base", tuner.alone("base"), "base"),
            System("expert", tuner.alone("expert[0]"), "expert"),
            System("tuned", self.tuned_tuner(), "tuned"),
        ]
        for rule in self.config.rules:
            systems.append(
                System(
                    rule, tuner, "proxy" if rule == "proxy" else "other", chosen[rule], RULES[rule]
                )
            )
        return systems

    def test(self) -> None:
        with self.stage("test") as info:
            if info["skipped"]:
                return
            scores = {}
            for task in self.config.tasks:
                report = self._evaluate(task, "test", self.test_systems(task))
                scores[task] = {s.name: s.metrics for s in report.systems}
            info["scores"] = scores
            primary = {t: task_kind(t).primary for t in self.config.tasks}
            info["summary"] = "; ".join(
                f"{t} {primary[t]}: "
                + ", ".join(
                    f"{name} {m.get(primary[t]) or 0:.2f}"
                    for name, m in s.items()
                    if name in ("base", "expert", "proxy", "tuned")
                )
                for t, s in scores.items()
            )

    def analyze(self) -> None:
        from ..analysis import write_report as write_analysis
        from ..analysis.records import analyze as analyze_tokens
        from .analysis import token_classes

        with self.stage("analysis") as info:
            if info["skipped"]:
                return
            n = self.config.analysis_examples
            classes: dict[str, Any] = {}
            for task in self.config.tasks:
                kind = task_kind(task)
                if kind.kind != "generate" or n == 0:
                    continue
                etask = eval_task(kind, str(self.data_file(task, "test")))
                examples = etask.examples()[:n]
                records = analyze_tokens(
                    self.proxy_tuner(),
                    [etask.render(ex) for ex in examples],
                    alpha=self.chosen_alphas()[task]["proxy"],
                    batch_size=self.config.eval_batch_size,
                    progress=self.config.progress,
                    **etask.settings(),
                )
                write_analysis(records, self.out / "analysis" / task)
                classes[task] = token_classes(records)
            info["classes"] = classes
            info["summary"] = "; ".join(
                f"{t}: {c['changed']} tokens changed, {c['changed_by_class']}"
                for t, c in classes.items()
            )

    def report(self) -> dict[str, Any]:
        """Always rewritten: the tables are derived from the stored results alone."""
        from .report import write_results

        start = time.perf_counter()
        data = write_results(self)
        seconds = time.perf_counter() - start
        self.log(f"[report] tables in {self.out / 'results.md'}; {seconds:.0f} s")
        return data


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def reproduce(config: ReproduceConfig, until: str = "report", log: Log = print) -> dict[str, Any]:
    """Run the experiment described by ``config`` (see the module docstring)."""
    return Experiment(config, log).run(until)
