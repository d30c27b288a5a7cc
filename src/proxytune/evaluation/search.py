"""Choose alpha (and the rule) on a validation split; report the choice's test score apart.

The examples are split once, with a seed: ``validation_size`` of them for choosing, the rest
for testing. Every candidate setting is evaluated on the validation split (saved and
resumable like any evaluation, under ``OUT/validation``); the best by ``metric`` is then
evaluated, beside the base and expert, on the test split (``OUT/test``), which the choice never
saw. ``method="grid"`` tries every ``alphas`` x ``rules``; ``method="optuna"`` (needs the
optional ``optuna`` package) samples ``trials`` alphas in ``alpha_range`` with TPE.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..extras import require
from .runner import EvalReport, evaluate
from .systems import System, standard_systems
from .tasks import Task

if TYPE_CHECKING:
    from ..tuner import ProxyTuner


@dataclass
class SearchResult:
    """The validation scores of every setting tried, the best one, and its test scores."""

    metric: str
    trials: list[dict[str, Any]]
    """``{"system", "alpha", "rule", "validation"}`` per setting, in the order tried."""
    best: dict[str, Any]
    test: EvalReport
    out_dir: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def best_test_score(self) -> float | None:
        return self.test.score(self.best["system"], self.metric)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "trials": self.trials,
            "best": self.best,
            "best_test_score": self.best_test_score,
            "test": self.test.to_dict(),
            **self.extra,
        }

    def summary(self) -> str:
        lines = [
            f"# alpha search on {self.test.task}: {self.metric}",
            "",
            "| setting | validation |",
            "|---|---|",
        ]
        for t in self.trials:
            mark = " (best)" if t["system"] == self.best["system"] else ""
            value = t["validation"]
            lines.append(f"| {t['system']}{mark} | {'-' if value is None else f'{value:.4f}'} |")
        lines += ["", "Test split (never seen by the search):", "", self.test.table()]
        return "\n".join(lines)


def default_metric(task: Task, gold_only: bool = False) -> str:
    """The metric a search maximises unless told otherwise."""
    if gold_only:
        return "gold_logprob"
    if task.kind == "multiple_choice":
        return "acc"
    if task.kind == "code":
        return f"pass@{task.k[0]}"
    first = task.metrics[0] if task.metrics else "exact_match"
    return first.rpartition(":")[2]


def rule_label(rule: Any) -> str:
    """A short label for a rule spec: ``plausible(tau=0.1)``."""
    if rule is None:
        return ""
    if isinstance(rule, str):
        return rule
    if isinstance(rule, Mapping):
        settings = ",".join(f"{k}={v}" for k, v in rule.items() if k != "name")
        return f"{rule.get('name', 'rule')}({settings})"
    return getattr(rule, "name", type(rule).__name__)


def search(
    task: Task,
    tuner: ProxyTuner,
    out_dir: str | Path,
    *,
    validation_size: int,
    alphas: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0),
    rules: Sequence[Any] = (None,),
    metric: str | None = None,
    method: str = "grid",
    trials: int = 10,
    alpha_range: tuple[float, float] = (0.0, 2.0),
    seed: int = 0,
    tuned: Any = None,
    **evaluate_options: Any,
) -> SearchResult:
    """Pick the best alpha (and rule) on the validation split, then test it (module docstring).

    ``evaluate_options`` go to :func:`~proxytune.evaluation.runner.evaluate` (``limit``,
    ``batch_size``, ``resume``, ``progress``, ``gold_only``, ``settings``...).
    """
    if method not in ("grid", "optuna"):
        raise ConfigError(f"search method must be 'grid' or 'optuna', got {method!r}")
    gold_only = bool(evaluate_options.get("gold_only", False))
    metric = metric or default_metric(task, gold_only)
    out = Path(out_dir)
    common = {"validation_size": validation_size, "seed": seed, **evaluate_options}
    tried: dict[str, dict[str, Any]] = {}

    def run(alpha: float, rule: Any) -> float | None:
        label = rule_label(rule)
        name = f"proxy@{alpha:g}" + (f"+{label}" if label else "")
        if name not in tried:
            system = System(name, tuner, "proxy", float(alpha), rule)
            report = evaluate(task, [system], out / "validation", split="validation", **common)
            value = report.score(name, metric)
            if metric not in report.systems[0].metrics:
                raise ConfigError(
                    f"metric {metric!r} is not reported for task {task.name!r}; it reports "
                    f"{sorted(report.systems[0].metrics)}"
                )
            tried[name] = {"system": name, "alpha": float(alpha), "rule": rule, "validation": value}
        return tried[name]["validation"]

    extra: dict[str, Any] = {}
    if method == "grid":
        for rule in rules:
            for alpha in alphas:
                run(alpha, rule)
    else:
        extra["optuna_best_params"] = _optuna(run, rules, alpha_range, trials, seed)

    scored = [t for t in tried.values() if t["validation"] is not None]
    if not scored:
        raise ConfigError(f"no setting produced a {metric!r} score on the validation split")
    best = max(scored, key=lambda t: t["validation"])  # ties: the first tried
    references = [
        s
        for s in standard_systems(tuner, include=("base", "expert"), tuned=tuned)
        if s.name != best["system"]
    ]
    chosen = System(best["system"], tuner, "proxy", best["alpha"], best["rule"])
    test = evaluate(task, [*references, chosen], out / "test", split="test", **common)
    result = SearchResult(metric, list(tried.values()), best, test, str(out), extra)
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.json").write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    (out / "search.md").write_text(result.summary() + "\n")
    return result


def _optuna(
    run: Callable[[float, Any], float | None],
    rules: Sequence[Any],
    alpha_range: tuple[float, float],
    trials: int,
    seed: int,
) -> dict[str, Any]:
    """``trials`` of optuna's TPE sampler over alpha (in ``alpha_range``) and the rule;
    ``run`` scores one setting on validation. Returns the best parameters."""
    optuna = require("optuna", None, "method 'optuna'", hint="or use 'grid'")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))

    def objective(trial: Any) -> float:
        alpha = round(trial.suggest_float("alpha", *alpha_range), 3)
        index = trial.suggest_categorical("rule", list(range(len(rules))))
        value = run(alpha, rules[index])
        return float("-inf") if value is None else value

    study.optimize(objective, n_trials=trials)
    return dict(study.best_params)
