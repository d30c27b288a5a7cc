"""``proxytune eval``: score base, expert, proxy-tuned (per alpha) and tuned models on a task."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer

from ._app import app
from .options import (
    AntiExpertOption,
    BackendOption,
    BaseOption,
    CandidatesOption,
    DeviceOption,
    DtypeOption,
    ExpertOption,
    GpuLayersOption,
    MaxNewTokensOption,
    ModelOptions,
    OnePassOption,
    Opt,
    OverlapOption,
    PrefixCacheOption,
    PromptOption,
    RecipeOption,
    RuleArgOption,
    RuleOption,
    SpeculativeOption,
    StackedOption,
    SweepAlphaOption,
    TemperatureOption,
    ThreadsOption,
    TrustRemoteCodeOption,
    build_tuner,
    engine_overrides,
    parse_alphas,
    rule_spec,
    sampling_settings,
)


@app.command("eval")
def eval_command(
    task: Annotated[
        str, typer.Argument(help="Built-in task (gsm_symbolic, ...), a task .yaml or a .jsonl.")
    ],
    recipe: RecipeOption = None,
    base: BaseOption = None,
    expert: ExpertOption = None,
    anti_expert: AntiExpertOption = None,
    alpha: SweepAlphaOption = None,
    base_prompt: PromptOption = "auto",
    expert_prompt: PromptOption = "auto",
    anti_expert_prompt: PromptOption = "auto",
    tuned: Annotated[
        str | None, Opt(help="A directly tuned model: the reference for gap closed.")
    ] = None,
    tuned_prompt: PromptOption = "auto",
    systems: Annotated[str, Opt(help="Which of base,expert,proxy to run.")] = "base,expert,proxy",
    rule: RuleOption = None,
    rule_arg: RuleArgOption = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    backend: BackendOption = None,
    threads: ThreadsOption = None,
    gpu_layers: GpuLayersOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
    overlap: OverlapOption = None,
    speculative: SpeculativeOption = None,
    stacked: StackedOption = None,
    prefix_cache: PrefixCacheOption = None,
    one_pass: OnePassOption = None,
    candidates: CandidatesOption = None,
    out: Annotated[str | None, Opt(help="Results folder (default runs/eval/TASK).")] = None,
    limit: Annotated[int | None, Opt(help="Only the first N examples.")] = None,
    batch_size: Annotated[int, Opt(help="Examples per batch.")] = 8,
    resume: Annotated[bool, Opt(help="Reuse saved per-example results.")] = True,
    progress: Annotated[bool, Opt(help="Show progress bars.")] = True,
    workers: Annotated[int, Opt(help="Code tasks: programs run at once.")] = 2,
    gold_only: Annotated[
        bool, Opt(help="Only the teacher-forced likelihood of the gold answers (no generation).")
    ] = False,
    max_new_tokens: MaxNewTokensOption = None,
    temperature: TemperatureOption = None,
    n: Annotated[int | None, Opt(help="Samples per example (pass@k needs n >= k).")] = None,
    seed: Annotated[int | None, Opt(help="Sampling seed, and the validation split's.")] = None,
    k: Annotated[str | None, Opt(help="Code tasks: the k of pass@k, e.g. '1,5'.")] = None,
    fewshot: Annotated[int | None, Opt(help="Worked examples in each prompt.")] = None,
    search: Annotated[
        str | None, Opt(help="Choose alpha on a validation split: grid | optuna.")
    ] = None,
    validation_size: Annotated[
        int, Opt(help="Examples held out for choosing alpha (the rest are the test split).")
    ] = 0,
    metric: Annotated[str | None, Opt(help="Metric the search maximises.")] = None,
    trials: Annotated[int, Opt(help="optuna trials.")] = 10,
    as_json: Annotated[bool, Opt("--json", help="Print the summary as JSON.")] = False,
    against: Annotated[
        Path | None,
        Opt(help="An earlier run's folder: compare example by example (a regression gate)."),
    ] = None,
    gate_metric: Annotated[
        str | None, Opt(help="With --against: exit 1 when this metric drops in any system.")
    ] = None,
    max_drop: Annotated[
        float, Opt(help="With --gate-metric: the drop allowed before the gate fails.")
    ] = 0.0,
    ray_actors: Annotated[
        int, Opt(help="Score batches on N Ray actors, each holding the models (ray extra).")
    ] = 0,
    ray_address: Annotated[
        str | None, Opt(help="With --ray-actors: a Ray cluster (default: a local one).")
    ] = None,
) -> None:
    """Score base, expert, proxy-tuned (per alpha) and tuned models on a task; gap closed."""
    from ..evaluation.commands import run_eval

    alphas = parse_alphas(alpha, unique=True)
    if gate_metric is not None and against is None:  # before any model loads
        raise typer.BadParameter("--gate-metric needs --against OLD_RUN (the run to compare with)")
    if search == "optuna":  # before any model loads
        from ..extras import require

        require("optuna", None, "--search optuna", hint="or use --search grid")
    engine = engine_overrides(
        overlap=overlap,
        speculative=speculative,
        stacked=stacked,
        prefix_cache=prefix_cache,
        one_pass=one_pass,
        candidates=candidates,
    )
    models = ModelOptions(
        recipe=recipe,
        base=base,
        experts=tuple(expert or ()),
        anti_experts=tuple(anti_expert or ()),
        base_prompt=base_prompt,
        expert_prompt=expert_prompt,
        anti_expert_prompt=anti_expert_prompt,
        device=device,
        dtype=dtype,
        backend=backend,
        threads=threads,
        gpu_layers=gpu_layers,
        trust_remote_code=trust_remote_code,
        engine=engine,
    )
    tuned_options = {
        "base_prompt": tuned_prompt,
        "device": device or "auto",
        "dtype": dtype or "auto",
        "trust_remote_code": trust_remote_code,
    }
    build = partial(eval_tuners, models, tuned, tuned_options)
    runner = None
    if ray_actors or ray_address:  # Ray is checked (and the actors start) before models load
        from ..distributed import ray_eval_runner, system_source

        runner = ray_eval_runner(
            build,
            lambda system: system_source(system, tuner, tuned_tuner),
            max(ray_actors, 1),
            address=ray_address,
        )
    tuner, tuned_tuner = build()
    overrides: dict[str, Any] = {"fewshot": fewshot}
    if k is not None:
        overrides["k"] = tuple(int(x) for x in k.split(","))
    raise typer.Exit(
        run_eval(
            tuner,
            task,
            alphas=alphas,
            systems=[s.strip() for s in systems.split(",") if s.strip()],
            tuned=tuned_tuner,
            rule=rule_spec(tuner, rule, rule_arg or ()),
            out=out,
            limit=limit,
            batch_size=batch_size,
            resume=resume,
            progress=progress,
            workers=workers,
            gold_only=gold_only,
            settings=sampling_settings(
                max_new_tokens=max_new_tokens, temperature=temperature, n=n, seed=seed
            ),
            task_overrides=overrides,
            search=search,
            validation_size=validation_size,
            metric=metric,
            trials=trials,
            seed=seed or 0,
            as_json=as_json,
            against=against,
            gate_metric=gate_metric,
            max_drop=max_drop,
            runner=runner,
        )
    )


def eval_tuners(
    models: ModelOptions, tuned: str | None, tuned_options: dict[str, Any]
) -> tuple[Any, Any]:
    """The evaluation's tuner and its directly tuned reference (or ``None``): what the
    command loads, and what each Ray actor loads for itself."""
    tuner = build_tuner(models)
    if tuned is None:
        return tuner, None
    from ..tuner import ProxyTuner

    return tuner, ProxyTuner.from_pretrained(tuned, **tuned_options)
