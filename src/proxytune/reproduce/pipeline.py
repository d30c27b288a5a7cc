"""``reproduce``: the paper's experiment in miniature, from nothing, resumable stage by stage.

Stages (each stamped in ``OUT/stages/NAME.json`` with the settings it depends on; a stage
whose stamp matches is skipped, one whose stamp differs is refused by name):

1. ``screen``: every candidate task measured untuned on its ``screen`` split (the base raw and
   3-shot, the small model raw); the selection rule (:mod:`.screen`) picks the tasks, and
   the closure each predicts is written to ``OUT/predictions.json`` before any training.
2. ``data``: the chosen tasks' disjoint splits (``OUT/data/TASK/``) and the joint training
   and validation files ``OUT/data/{train,validation}.jsonl``.
3. ``expert``: LoRA SFT of the small model (``OUT/expert``); trained again with one epoch
   more while it follows the taught format on under ``min_compliance`` of a task's
   validation items. The anti-expert is the small model untuned (the one-pass LoRA pair).
4. ``tuned``: the big model tuned directly on the same data with the expert's final recipe.
5. ``residual`` (only with the ``residual`` rule): the small model's LoRA trained on the
   residual objective (:mod:`..training.residual`) against the frozen big base, same recipe.
6. ``validation``: every rule over its grid (alpha x1.5, nudging's gamma halfway to 1, while
   a rule's best is its largest value) on each task's validation split; the best per task
   and rule.
7. ``test``: base, the 3-shot base, expert, tuned, ``proxy`` at alpha 1 and at its
   validated alpha, and each other rule at its validated alpha, on the test split.
8. ``analysis``: token-level records of what the proxy changed on test prompts.
9. ``report``: ``results.md`` / ``.csv`` / ``.json`` with 95% bootstrap intervals, paired
   differences, gap closed where there is a gap, predicted against measured, and
   ``alpha_sweep.png``; rewritten on every run from the stored results.

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

from ..analysis import write_report as write_analysis
from ..analysis.records import analyze as analyze_tokens
from ..errors import ConfigError
from ..evaluation import evaluate
from ..evaluation.rerank import RerankSystem
from ..evaluation.scoring import encode
from ..evaluation.store import ResultStore
from ..evaluation.systems import System
from ..specs import ModelSpec
from ..training import TrainConfig, train
from ..training.output import read_meta
from ..tuner import ProxyTuner
from .analysis import token_classes
from .config import (
    MAX_EXTENSIONS,
    PRIMARY_ALPHA,
    RULES,
    STAGES,
    ReproduceConfig,
    changed_settings,
    differences,
    next_value,
    settings_key,
    steering,
    sweep_grid,
)
from .report import write_results
from .screen import SCREEN_SYSTEMS, screened_from_scores, screening_table, select
from .tasks import SPLITS, TaskKind, eval_task, fewshot_prefix, make_splits, sft_rows

MARKER = "reproduce.json"

Log = Callable[[str], None]


class Experiment:
    """One output directory and the stages that fill it."""

    def __init__(self, config: ReproduceConfig, log: Log = print) -> None:
        self.config = config
        self.out = Path(config.out).expanduser()
        self.log = log
        self._models: dict[str, Any] = {}
        self._splits: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self._tasks: tuple[str, ...] | None = None
        self._w2s_made: dict[Any, Any] = {}  # the w2s candidates, shared by its betas

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

    # tasks -------------------------------------------------------------------------------

    def kind(self, task: str) -> TaskKind:
        return self.config.kind(task)

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks trained and reported (the screen's choice, once it has run)."""
        if self._tasks is None:
            if self.config.tasks is not None:
                self._tasks = self.config.run_tasks(None)
            else:
                stamp = self.done("screen")
                if stamp is None:
                    raise ConfigError("the screen stage has not run")
                self._tasks = self.config.run_tasks(stamp["result"]["chosen"])
        return self._tasks

    # stages --------------------------------------------------------------------------------

    def run(self, until: str = "report") -> dict[str, Any]:
        """Run (or skip) every stage up to ``until``; return the report's data."""
        if until not in STAGES:
            raise ConfigError(f"unknown stage {until!r}; stages are {', '.join(STAGES)}")
        self.open()
        last = STAGES.index(until)
        steps = [
            self.screen,
            self.make_data,
            self.train_expert,
            self.train_tuned,
            self.train_residual,
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

    def splits(self, task: str) -> dict[str, list[dict[str, Any]]]:
        """A task's splits, made once per run (a pure function of the settings)."""
        if task not in self._splits:
            sizes = self.config.split_sizes(task)
            self._splits[task] = make_splits(self.kind(task), sizes, self.config.seed)
        return self._splits[task]

    def prefix(self, task: str) -> str:
        """The 3-shot prompt's worked examples (the task's ``shots`` split)."""
        kind = self.kind(task)
        return fewshot_prefix(kind, self.splits(task)["shots"])

    def screen(self) -> None:
        """Measure every screened task untuned; choose; write the predictions."""
        with self.stage("screen") as info:
            if info["skipped"]:
                return
            base, small = self.single_tuner(self.config.big), self.single_tuner(self.config.small)
            screened: dict[str, Any] = {}
            for task in self.config.screened():
                kind = self.kind(task)
                splits = self.splits(task)
                for split in ("shots", "screen"):
                    _write_jsonl(self.data_file(task, split), splits[split])
                systems = [
                    System("base", base, "base"),
                    System("base-3shot", base, "other", prefix=self.prefix(task)),
                    System("small", small, "other"),
                ]
                assert [s.name for s in systems] == list(SCREEN_SYSTEMS)
                report = self._evaluate(task, "screen", systems)
                scores = {s.name: s.metrics for s in report.systems}
                tokens = max(
                    (len(encode(base, str(r["completion"]))) for r in splits["screen"]), default=0
                )
                screened[task] = screened_from_scores(
                    scores, "strict", kind.lenient, tokens, len(splits["screen"])
                )
            if self.config.tasks is None:
                chosen = select(screened, self.config.selection)
            else:
                chosen = [t for t in self.config.tasks if t in screened]
            self._models.clear()  # the screen's models; training needs the memory
            rows = {t: s.to_dict() for t, s in screened.items()}
            info["screened"] = rows
            info["chosen"] = chosen
            self._write_predictions(rows, chosen)
            # nothing to show proxy-tuning on: no chosen candidate and no task of the user's
            if self.config.tasks is None and not chosen and not self.config.file_kinds:
                raise ConfigError(
                    "no candidate task passed the selection rule (see "
                    f"{self.out / 'predictions.md'}); add candidates or a --task-file"
                )
            info["summary"] = (
                f"{len(screened)} screened; chosen: {', '.join(chosen) or 'none'}; predicted "
                + ", ".join(f"{t} {_pct(rows[t]['predicted_closure'])}" for t in chosen)
            )

    def _write_predictions(self, rows: dict[str, Any], chosen: list[str]) -> None:
        """``predictions.json`` / ``.md``: the screen and each chosen task's predicted gap
        closed, written before the expert stage (and never after it)."""
        data = {
            "written_before": "expert",
            "selection": self.config.selection.to_dict(),
            "screened": rows,
            "chosen": chosen,
            "predicted_closure": {t: rows[t]["predicted_closure"] for t in chosen},
        }
        (self.out / "predictions.json").write_text(json.dumps(data, indent=2) + "\n")
        text = [
            "# Screening and predictions (written before training)",
            "",
            "Untuned, greedy, one generation per item of each task's screen split. Predicted "
            "gap closed = (base lenient - base strict) / (expected tuned - base strict), "
            "expected tuned = max(base lenient, 3-shot lenient).",
            "",
            *screening_table(rows, chosen, self.config.selection),
        ]
        (self.out / "predictions.md").write_text("\n".join(text) + "\n", encoding="utf-8")

    def make_data(self) -> None:
        with self.stage("data") as info:
            if info["skipped"]:
                return
            counts = {}
            train: list[dict[str, str]] = []
            validation: list[dict[str, str]] = []
            for name in self.tasks:
                kind = self.kind(name)
                splits = self.splits(name)
                for split in SPLITS:
                    _write_jsonl(self.data_file(name, split), splits[split])
                train += sft_rows(kind, splits["train"])
                validation += sft_rows(kind, splits["validation"])
                counts[name] = {s: len(splits[s]) for s in SPLITS}
            random.Random(self.config.seed).shuffle(train)
            _write_jsonl(self.out / "data" / "train.jsonl", train)
            _write_jsonl(self.out / "data" / "validation.jsonl", validation)
            info["counts"] = counts
            info["summary"] = (
                ", ".join(
                    f"{t} {c['train']}/{c['validation']}/{c['test']}" for t, c in counts.items()
                )
                + f" (train/validation/test); {len(train)} training lines"
            )

    def _fit(
        self, stage: str, model: str, epochs: float, fresh: bool, base: str | None = None
    ) -> dict[str, Any]:
        """One LoRA training run of ``model`` into ``OUT/STAGE`` (with ``base``: the residual
        objective on that frozen base); its losses."""
        out = self.out / stage
        meta = read_meta(out)
        has_checkpoint = not fresh and meta is not None and any(out.glob("checkpoint-*"))
        self._check_started(stage, has_checkpoint)
        config = TrainConfig(
            model=model,
            data=str(self.out / "data" / "train.jsonl"),
            eval_data=str(self.out / "data" / "validation.jsonl"),
            out=str(out),
            objective="sft" if base is None else "residual",
            base=base,
            lora=True,
            lora_r=self.config.lora_r,
            lora_alpha=2.0 * self.config.lora_r,
            template="raw",
            epochs=epochs,
            learning_rate=self.config.learning_rate,
            batch_size=self.config.train_batch_size,
            eval_fraction=0.0,
            eval_steps=10**9,  # the validation loss before and after training only
            warmup=0.1,
            seed=self.config.seed,
            device=self.config.device,
            resume=has_checkpoint,
            overwrite=meta is not None and not has_checkpoint,
            progress=self.config.progress,
        )
        result = _with_every_core(train, config)
        losses, evals = result.train_losses, result.eval_losses
        return {
            "epochs": epochs,
            "train_loss_first_last": [losses[0], losses[-1]] if losses else None,
            "validation_loss_first_last": [evals[0], evals[-1]] if evals else None,
        }

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

    def compliance(self, adapter_stage: str, model: str, epochs: float) -> dict[str, float]:
        """Per task, the share of validation outputs of the LoRA in ``OUT/ADAPTER_STAGE``
        (alone, greedy) in the taught format, right or wrong."""
        tuner = self._alone(model, self.out / adapter_stage)  # not kept: retraining replaces it
        name = f"{adapter_stage}-e{epochs:g}"
        out = {}
        for task in self.tasks:
            self._evaluate(task, "validation", [System(name, tuner, "other")])
            rows = ResultStore(self.out / "eval" / task / "validation" / f"{name}.jsonl").load()
            follows = self.kind(task).follows_format
            outs = [(r.get("outputs") or [""])[0] for r in rows.values()]
            out[task] = sum(1 for o in outs if follows(o)) / max(1, len(outs))
        return out

    def train_expert(self) -> None:
        """Train the expert; one epoch more while it misses the format on validation."""
        with self.stage("expert") as info:
            if info["skipped"]:
                return
            # a retraining interrupted midway resumes at its own epochs, with the runs before
            progress = self.out / "stages" / "expert.progress.json"
            key = settings_key(self.config.stage_settings("expert"))
            known = json.loads(progress.read_text()) if progress.is_file() else {}
            if known.get("key") != key:
                known = {"epochs": self.config.epochs, "runs": []}
            epochs, runs, fresh = float(known["epochs"]), list(known["runs"]), False
            while True:
                run = self._fit("expert", self.config.small, epochs, fresh)
                run["compliance"] = self.compliance("expert", self.config.small, epochs)
                runs.append(run)
                worst = min(run["compliance"].values())
                if worst >= self.config.min_compliance or epochs + 1 > self.config.max_epochs:
                    break
                self.log(
                    f"[expert] {epochs:g} epoch(s): format followed on {100 * worst:.0f}% of a "
                    f"task's validation items (< {100 * self.config.min_compliance:.0f}%); "
                    f"training again with {epochs + 1:g}"
                )
                epochs, fresh = epochs + 1, True
                progress.write_text(json.dumps({"key": key, "epochs": epochs, "runs": runs}))
            info.update(runs=runs, epochs=epochs, compliance=runs[-1]["compliance"])
            info.update(
                {k: runs[-1][k] for k in ("train_loss_first_last", "validation_loss_first_last")}
            )
            info["summary"] = (
                f"LoRA of {self.config.small}, {epochs:g} epoch(s)"
                + _losses(runs[-1])
                + f", format {_pct(worst)} (worst task)"
            )

    def train_tuned(self) -> None:
        """Tune the big model directly with the expert's final recipe."""
        with self.stage("tuned") as info:
            if info["skipped"]:
                return
            epochs = float(self.done("expert")["result"]["epochs"])  # type: ignore[index]
            run = self._fit("tuned", self.config.big, epochs, fresh=False)
            info.update(run)
            info["summary"] = f"LoRA of {self.config.big}, {epochs:g} epoch(s)" + _losses(run)

    def train_residual(self) -> None:
        """For the ``residual`` rule: train the small model's LoRA on the residual loss (the
        proxy distribution at alpha 1, the big base and the anti-expert frozen) with the
        expert's final recipe."""
        if "residual" not in self.config.rules:
            return
        with self.stage("residual") as info:
            if info["skipped"]:
                return
            epochs = float(self.done("expert")["result"]["epochs"])  # type: ignore[index]
            run = self._fit("residual", self.config.small, epochs, False, base=self.config.big)
            info.update(run)
            info["summary"] = (
                f"residual LoRA of {self.config.small} on {self.config.big}, {epochs:g} "
                "epoch(s)" + _losses(run)
            )

    # models ------------------------------------------------------------------------------

    def _opts(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "device": self.config.device,
            "dtype": self.config.dtype,
            "backend": self.config.backend,
        }
        if self.config.backends()["big"] == "llamacpp":
            opts["kv_cells"] = self.config.kv_cells
        return opts

    def _alone(self, model: str, adapter: Path | None = None) -> Any:
        """``model`` (with ``adapter``) alone on the raw prompt."""
        path = None if adapter is None else str(adapter)
        spec = ModelSpec(model, adapter=path, prompt="raw", **self._opts())
        return ProxyTuner.from_specs(spec, options=self._engine_options())

    def single_tuner(self, model: str) -> Any:
        """``model`` alone on the raw prompt (screening), loaded once."""
        key = f"single:{model}"
        if key not in self._models:
            self._models[key] = self._alone(model)
        return self._models[key]

    def proxy_tuner(self, expert: str = "expert") -> Any:
        """Base = big model, expert = the LoRA trained in ``OUT/EXPERT`` (the expert, or the
        residual expert), anti-expert = the small model; every model reads the same raw prompt
        (the expert was tuned on it)."""
        key = f"proxy:{expert}"
        if key not in self._models:
            opts = self._opts()
            self._models[key] = ProxyTuner.from_specs(
                ModelSpec(self.config.big, prompt="raw", **opts),
                [
                    (
                        ModelSpec(
                            self.config.small,
                            adapter=str(self.out / expert),
                            prompt="raw",
                            **opts,
                        ),
                        ModelSpec(self.config.small, prompt="raw", **opts),
                        1.0,
                    )
                ],
                options=self._engine_options(),
            )
        return self._models[key]

    def _engine_options(self) -> dict[str, Any]:
        """Every system of a split runs on the same prompts: on llama.cpp each model restores
        a prompt it prefilled before instead of prefilling it again, and prefills a 3-shot
        system's shared examples once per batch (float rounding only)."""
        return {"prefix_cache": self.config.backends()["big"] == "llamacpp"}

    def tuned_tuner(self) -> Any:
        if "tuned" not in self._models:
            self._models["tuned"] = self._alone(self.config.big, self.out / "tuned")
        return self._models["tuned"]

    def _evaluate(self, task: str, split: str, systems: list[Any]) -> Any:
        kind = self.kind(task)
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

    def steered(self, name: str, rule: str, value: float, role: str = "other") -> Any:
        """The system of ``rule`` at its swept ``value`` (alpha, nudging's gamma or the
        rerank's beta) on the proxy tuner (the residual expert's, for ``residual``)."""
        tuner = self.proxy_tuner("residual" if rule == "residual" else "expert")
        if rule == "w2s":
            k = RULES["w2s"]["k"]
            return RerankSystem(
                name, tuner, beta=value, k=k, alpha=PRIMARY_ALPHA, role=role, made=self._w2s_made
            )
        alpha, spec = steering(rule, value)
        return System(name, tuner, role, alpha, spec)

    def validate(self) -> dict[str, Any]:
        """Each rule over its grid, extended (:func:`.config.next_value`) while its best is
        the largest value tried."""
        with self.stage("validation") as info:
            if info["skipped"]:
                return {}
            chosen: dict[str, dict[str, float]] = {}
            sweep: dict[str, dict[str, dict[str, float | None]]] = {}
            for task in self.tasks:
                primary = self.kind(task).primary
                chosen[task], sweep[task] = {}, {}
                for rule in self.config.rules:
                    alphas = list(sweep_grid(rule, self.config.alphas))
                    points: dict[str, float | None] = {}
                    for _ in range(MAX_EXTENSIONS + 1):
                        todo = [a for a in alphas if f"{a:g}" not in points]
                        systems = [self.steered(f"{rule}@{a:g}", rule, a, "proxy") for a in todo]
                        report = self._evaluate(task, "validation", systems)
                        points.update(
                            {f"{a:g}": report.score(f"{rule}@{a:g}", primary) for a in todo}
                        )
                        best = _best(alphas, points)
                        if best != max(alphas) or len(alphas) < 2:
                            break
                        alphas.append(next_value(rule, alphas))
                    sweep[task][rule] = points
                    chosen[task][rule] = float(_best(alphas, points))
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
        """base, base-3shot, expert, tuned, ``proxy`` at alpha 1, ``proxy@val`` at its
        validated alpha (when that is not 1) and every other rule at its validated alpha."""
        tuner = self.proxy_tuner()
        chosen = self.chosen_alphas()[task]
        systems = [
            System("base", tuner.alone("base"), "base"),
            System("base-3shot", tuner.alone("base"), "other", prefix=self.prefix(task)),
            System("expert", tuner.alone("expert[0]"), "expert"),
            System("tuned", self.tuned_tuner(), "tuned"),
            System("proxy", tuner, "proxy", PRIMARY_ALPHA, RULES["proxy"]),
        ]
        if chosen["proxy"] != PRIMARY_ALPHA:
            systems.append(self.steered("proxy@val", "proxy", chosen["proxy"]))
        for rule in self.config.rules:
            if rule != "proxy":
                systems.append(self.steered(rule, rule, chosen[rule]))
        return systems

    def test(self) -> None:
        with self.stage("test") as info:
            if info["skipped"]:
                return
            scores = {}
            for task in self.tasks:
                report = self._evaluate(task, "test", self.test_systems(task))
                scores[task] = {s.name: s.metrics for s in report.systems}
            info["scores"] = scores
            primary = {t: self.kind(t).primary for t in self.tasks}
            info["summary"] = "; ".join(
                f"{t} {primary[t]}: "
                + ", ".join(
                    f"{name} {m.get(primary[t]) or 0:.2f}"
                    for name, m in s.items()
                    if name in ("base", "base-3shot", "expert", "proxy", "tuned")
                )
                for t, s in scores.items()
            )

    def analyze(self) -> None:
        with self.stage("analysis") as info:
            if info["skipped"]:
                return
            n = self.config.analysis_examples
            classes: dict[str, Any] = {}
            for task in self.tasks:
                kind = self.kind(task)
                if kind.kind != "generate" or n == 0:
                    continue
                etask = eval_task(kind, str(self.data_file(task, "test")))
                examples = etask.examples()[:n]
                records = analyze_tokens(
                    self.proxy_tuner(),
                    [etask.render(ex) for ex in examples],
                    alpha=PRIMARY_ALPHA,
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


def _with_every_core(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with torch on every core: a llama.cpp model loaded earlier in the process
    (the screen, the compliance check) leaves torch on one thread for decoding."""
    import os

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def _best(alphas: list[float], points: dict[str, float | None]) -> float:
    """The alpha with the best score; ties go to the smaller alpha (the gentler steer)."""
    return max(alphas, key=lambda a: (points.get(f"{a:g}") or 0, -a))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _losses(run: dict[str, Any]) -> str:
    out = ""
    for label, key in (
        ("loss", "train_loss_first_last"),
        ("validation loss", "validation_loss_first_last"),
    ):
        if run.get(key):
            first, last = run[key]
            out += f", {label} {first:.3f} -> {last:.3f}"
    return out


def reproduce(config: ReproduceConfig, until: str = "report", log: Log = print) -> dict[str, Any]:
    """Run the experiment described by ``config`` (see the module docstring)."""
    return Experiment(config, log).run(until)
