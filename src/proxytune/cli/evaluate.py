"""``proxytune eval``: score base, expert, proxy-tuned (per alpha) and tuned models on a task."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer

from ..distributed import ray_eval_runner, system_source
from ..evaluation.commands import run_eval
from ..extras import require
from ._app import app
from .options import (
    LoadOptions,
    MaxNewTokensOption,
    ModelOptions,
    Opt,
    PlainEngineFlags,
    PromptOption,
    SteeringOptions,
    SweepModelOptions,
    TemperatureOption,
    build_tuner,
    grouped,
    sampling_settings,
)


@dataclass(frozen=True)
class EvalOptions:
    """How the evaluation runs: where to, on what, how alpha is chosen, and what it is
    compared with (:func:`~proxytune.evaluation.commands.run_eval`)."""

    out: Annotated[str | None, Opt(help="Results folder (default runs/eval/TASK).")] = None
    limit: Annotated[int | None, Opt(help="Only the first N examples.")] = None
    batch_size: Annotated[int, Opt(help="Examples per batch.")] = 8
    resume: Annotated[bool, Opt(help="Reuse saved per-example results.")] = True
    progress: Annotated[bool, Opt(help="Show progress bars.")] = True
    workers: Annotated[int, Opt(help="Code tasks: programs run at once.")] = 2
    gold_only: Annotated[
        bool, Opt(help="Only the teacher-forced likelihood of the gold answers (no generation).")
    ] = False
    max_new_tokens: MaxNewTokensOption = None
    temperature: TemperatureOption = None
    n: Annotated[int | None, Opt(help="Samples per example (pass@k needs n >= k).")] = None
    seed: Annotated[int | None, Opt(help="Sampling seed, and the validation split's.")] = None
    k: Annotated[str | None, Opt(help="Code tasks: the k of pass@k, e.g. '1,5'.")] = None
    fewshot: Annotated[int | None, Opt(help="Worked examples in each prompt.")] = None
    search: Annotated[
        str | None, Opt(help="Choose alpha on a validation split: grid | optuna.")
    ] = None
    validation_size: Annotated[
        int, Opt(help="Examples held out for choosing alpha (the rest are the test split).")
    ] = 0
    metric: Annotated[str | None, Opt(help="Metric the search maximises.")] = None
    trials: Annotated[int, Opt(help="optuna trials.")] = 10
    as_json: Annotated[bool, Opt("--json", help="Print the summary as JSON.")] = False
    against: Annotated[
        Path | None,
        Opt(help="An earlier run's folder: compare example by example (a regression gate)."),
    ] = None
    gate_metric: Annotated[
        str | None, Opt(help="With --against: exit 1 when this metric drops in any system.")
    ] = None
    max_drop: Annotated[
        float, Opt(help="With --gate-metric: the drop allowed before the gate fails.")
    ] = 0.0

    def run_options(self) -> dict[str, Any]:
        """:func:`~proxytune.evaluation.commands.run_eval`'s keywords."""
        given = asdict(self)
        for name in ("max_new_tokens", "temperature", "n", "k", "fewshot"):
            given.pop(name)
        overrides: dict[str, Any] = {"fewshot": self.fewshot}
        if self.k is not None:
            overrides["k"] = tuple(int(x) for x in self.k.split(","))
        sampling = {name: getattr(self, name) for name in ("max_new_tokens", "temperature", "n")}
        settings = sampling_settings(**sampling, seed=self.seed)
        return {**given, "settings": settings, "task_overrides": overrides, "seed": self.seed or 0}


@app.command("eval")
@grouped
def eval_command(
    *,
    task: Annotated[
        str, typer.Argument(help="Built-in task (gsm_symbolic, ...), a task .yaml or a .jsonl.")
    ],
    models: SweepModelOptions,
    tuned: Annotated[
        str | None, Opt(help="A directly tuned model: the reference for gap closed.")
    ] = None,
    tuned_prompt: PromptOption = "auto",
    systems: Annotated[str, Opt(help="Which of base,expert,proxy to run.")] = "base,expert,proxy",
    steering: SteeringOptions,
    load: LoadOptions,
    engine: PlainEngineFlags,
    evaluation: EvalOptions,
    ray_actors: Annotated[
        int, Opt(help="Score batches on N Ray actors, each holding the models (ray extra).")
    ] = 0,
    ray_address: Annotated[
        str | None, Opt(help="With --ray-actors: a Ray cluster (default: a local one).")
    ] = None,
) -> None:
    """Score base, expert, proxy-tuned (per alpha) and tuned models on a task; gap closed."""
    if evaluation.gate_metric is not None and evaluation.against is None:  # before models load
        raise typer.BadParameter("--gate-metric needs --against OLD_RUN (the run to compare with)")
    if evaluation.search == "optuna":  # before any model loads
        require("optuna", None, "--search optuna", hint="or use --search grid")
    tuned_options = {
        "base_prompt": tuned_prompt,
        "device": load.device or "auto",
        "dtype": load.dtype or "auto",
        "trust_remote_code": load.trust_remote_code,
    }
    build = partial(eval_tuners, models, load, engine.overrides(), tuned, tuned_options)
    runner = None
    if ray_actors or ray_address:  # Ray is checked (and the actors start) before models load
        runner = ray_eval_runner(
            build,
            lambda system: system_source(system, tuner, tuned_tuner),
            max(ray_actors, 1),
            address=ray_address,
        )
    tuner, tuned_tuner = build()
    raise typer.Exit(
        run_eval(
            tuner,
            task,
            alphas=models.sweep,
            systems=[s.strip() for s in systems.split(",") if s.strip()],
            tuned=tuned_tuner,
            rule=steering.spec(tuner),
            runner=runner,
            **evaluation.run_options(),
        )
    )


def eval_tuners(
    models: ModelOptions,
    load: LoadOptions,
    engine: dict[str, Any],
    tuned: str | None,
    tuned_options: dict[str, Any],
) -> tuple[Any, Any]:
    """The evaluation's tuner and its directly tuned reference (or ``None``): what the
    command loads, and what each Ray actor loads for itself."""
    tuner = build_tuner(models, load, engine=engine)
    if tuned is None:
        return tuner, None
    # lazy: torch stays off the CLI's start (`proxytune --help` imports every command module)
    from ..tuner import ProxyTuner

    return tuner, ProxyTuner.from_pretrained(tuned, **tuned_options)
