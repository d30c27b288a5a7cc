"""``proxytune generate``: text from the proxy-tuned models (or each model alone, ``--compare``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._app import app
from .options import (
    AlphaOption,
    AntiExpertOption,
    ApiKeyEnvOption,
    BackendOption,
    BaseChunkOption,
    BaseEndpointOption,
    BaseModelOption,
    BaseOption,
    BaseSamplesOption,
    BaseTokenizerOption,
    BaseTopLogprobsOption,
    BaseUrlOption,
    CacheOption,
    CandidatesOption,
    CrossTokenizerOption,
    DeviceOption,
    DtypeOption,
    ExpertOption,
    GpuLayersOption,
    MaxNewTokensOption,
    MinCoverageOption,
    MinPOption,
    ModelOptions,
    NOption,
    OnePassOption,
    Opt,
    OverlapOption,
    PrefixCacheOption,
    PromptOption,
    RecipeOption,
    RepetitionPenaltyOption,
    RuleArgOption,
    RuleOption,
    SeedOption,
    SpeculativeOption,
    StackedOption,
    StopOption,
    TemperatureOption,
    ThreadsOption,
    TopKOption,
    TopLogprobsOption,
    TopPOption,
    TrustRemoteCodeOption,
    api_base,
    build_tuner,
    cross_mode,
    engine_overrides,
    parse_alphas,
    prompt_formats,
    rule_spec,
    sampling_settings,
)

if TYPE_CHECKING:
    from ..tuner import ProxyTuner


@app.command()
def generate(
    prompts: Annotated[
        list[str] | None, typer.Argument(help="Prompts ('-' reads one from stdin).")
    ] = None,
    recipe: RecipeOption = None,
    base: BaseOption = None,
    expert: ExpertOption = None,
    anti_expert: AntiExpertOption = None,
    alpha: AlphaOption = None,
    base_prompt: PromptOption = "auto",
    expert_prompt: PromptOption = "auto",
    anti_expert_prompt: PromptOption = "auto",
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    backend: BackendOption = None,
    threads: ThreadsOption = None,
    gpu_layers: GpuLayersOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
    max_new_tokens: MaxNewTokensOption = None,
    temperature: TemperatureOption = None,
    top_k: TopKOption = None,
    top_p: TopPOption = None,
    min_p: MinPOption = None,
    repetition_penalty: RepetitionPenaltyOption = None,
    stop: StopOption = None,
    seed: SeedOption = None,
    n: NOption = None,
    top_logprobs: TopLogprobsOption = None,
    cache: CacheOption = True,
    as_json: Annotated[
        bool, Opt("--json", help="One JSON object per result (with each model's prompt format).")
    ] = False,
    compare: Annotated[bool, Opt(help="Base alone, expert alone and proxy-tuned.")] = False,
    stream: Annotated[bool, Opt(help="Print text as it is generated.")] = False,
    rule: RuleOption = None,
    rule_arg: RuleArgOption = None,
    overlap: OverlapOption = None,
    speculative: SpeculativeOption = None,
    stacked: StackedOption = None,
    prefix_cache: PrefixCacheOption = None,
    one_pass: OnePassOption = None,
    candidates: CandidatesOption = None,
    base_url: BaseUrlOption = None,
    base_model: BaseModelOption = None,
    base_top_logprobs: BaseTopLogprobsOption = None,
    base_tokenizer: BaseTokenizerOption = None,
    api_key_env: ApiKeyEnvOption = "OPENAI_API_KEY",
    base_chunk: BaseChunkOption = "auto",
    base_samples: BaseSamplesOption = None,
    base_endpoint: BaseEndpointOption = "completions",
    cross_tokenizer: CrossTokenizerOption = False,
    min_coverage: MinCoverageOption = None,
    input_file: Annotated[
        Path | None,
        Opt("--input", help="A JSONL file of prompts (a batch job; see proxytune.jobs)."),
    ] = None,
    output_file: Annotated[
        Path | None,
        Opt("--output", help="With --input: the JSONL results, written as they come; resumed."),
    ] = None,
    batch_size: Annotated[int, Opt(help="With --input: lines generated together.")] = 8,
    stop_on_error: Annotated[
        bool, Opt(help="With --input: stop at the first bad line (default: record it, go on).")
    ] = False,
    ray_actors: Annotated[
        int,
        Opt(help="With --input: run the batches on N Ray actors, each with its own models."),
    ] = 0,
    ray_address: Annotated[
        str | None, Opt(help="With --ray-actors: a Ray cluster (default: a local one).")
    ] = None,
) -> None:
    """Generate text with proxy-tuning (the embedded default when no model is given)."""
    if (input_file is None) != (output_file is None):
        raise typer.BadParameter("--input and --output go together (a batch job)")
    if input_file is not None and prompts:
        raise typer.BadParameter("give prompts or --input FILE, not both")
    if input_file is None and not prompts:
        raise typer.BadParameter("give at least one prompt, or --input FILE --output FILE")
    if (ray_actors or ray_address) and input_file is None:
        raise typer.BadParameter("--ray-actors and --ray-address run batch jobs: add --input")
    prompts = [sys.stdin.read() if p == "-" else p for p in prompts or ()]
    settings = sampling_settings(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        stop=stop,
        seed=seed,
        n=n,
        use_cache=None if cache else False,
    )
    if top_logprobs is not None:
        settings.update(logprobs=True, top_logprobs=top_logprobs)
    from ..config import GenerationConfig

    GenerationConfig().updated(**settings)  # bad settings: one line, before any model loads
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
        alphas=tuple(parse_alphas(alpha)),
        base_prompt=base_prompt,
        expert_prompt=expert_prompt,
        anti_expert_prompt=anti_expert_prompt,
        device=device,
        dtype=dtype,
        backend=backend,
        threads=threads,
        gpu_layers=gpu_layers,
        trust_remote_code=trust_remote_code,
        base_api=api_base(
            base_url,
            model=base_model,
            top_logprobs=base_top_logprobs or top_logprobs,
            tokenizer=base_tokenizer,
            api_key_env=api_key_env,
            chunk=base_chunk,
            samples=base_samples,
            prompt=base_prompt,
            endpoint=base_endpoint,
        ),
        cross_tokenizer=cross_mode(cross_tokenizer, min_coverage),
        engine=engine,
    )
    if input_file is not None and (ray_actors or ray_address):
        from functools import partial

        from ..distributed import ray_executor

        assert output_file is not None
        build = partial(load_tuner, models, rule, tuple(rule_arg or ()))
        pool = ray_executor(build, max(ray_actors, 1), address=ray_address)
        _batch_job(None, input_file, output_file, settings, batch_size, stop_on_error, pool)
        return
    tuner = load_tuner(models, rule, tuple(rule_arg or ()))
    if input_file is not None:
        assert output_file is not None
        _batch_job(tuner, input_file, output_file, settings, batch_size, stop_on_error)
        return
    stats: Any = None
    if tuner.blackbox:  # an API base or a pair of another tokenizer: the bill
        from ..engine.blackbox import BlackBoxStats

        stats = BlackBoxStats()
    elif tuner.options.speculative:
        from ..engine.speculative import SpeculativeStats

        stats = SpeculativeStats()
    extra = {} if stats is None else {"stats": stats}
    if compare:
        _compare(tuner, prompts, settings, as_json, extra if tuner.options.speculative else {})
    elif stream and not as_json:
        for p in prompts:
            deltas = (
                (u.delta for step in tuner.steps([p], **extra, **settings) for u in step)
                if extra
                else tuner.stream(p, **settings)
            )
            for delta in deltas:
                sys.stdout.write(delta)
                sys.stdout.flush()
            sys.stdout.write("\n")
    else:
        formats = prompt_formats(tuner)
        for r in tuner.generate(prompts, **extra, **settings):
            if as_json:
                row = {"prompt": prompts[r.prompt_index], **r.to_dict(), "prompt_formats": formats}
                print(json.dumps(row))
            else:
                print(r.text)
    if tuner.blackbox and not compare:
        print(f"black-box: {stats.summary()}", file=sys.stderr)
    elif tuner.options.speculative and stats is not None:
        print(
            f"speculative: {stats.accepted}/{stats.proposed} drafts accepted "
            f"({stats.acceptance_rate:.0%}), {stats.tokens_per_round:.2f} tokens per verification",
            file=sys.stderr,
        )


def load_tuner(models: ModelOptions, rule: str | None, rule_arg: tuple[str, ...]) -> ProxyTuner:
    """The tuner the options name, under the chosen rule (also what each Ray actor runs)."""
    tuner = build_tuner(models)
    chosen_rule = rule_spec(tuner, rule, rule_arg)
    return tuner if chosen_rule is None else tuner.with_rule(chosen_rule)


def _batch_job(
    tuner: ProxyTuner | None,
    source: Path,
    target: Path,
    settings: dict[str, Any],
    batch_size: int,
    stop_on_error: bool,
    executor: Any = None,
) -> None:
    """``--input``/``--output``: :func:`proxytune.jobs.run_jobs` with a progress bar."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from ..jobs import run_jobs

    columns = ("lines", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("lines", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        summary = run_jobs(
            tuner,
            source,
            target,
            batch_size=batch_size,
            stop_on_error=stop_on_error,
            defaults=settings,
            progress=advance,
            executor=executor,
        )
    print(
        f"{summary.done} lines done, {summary.failed} failed, {summary.skipped} already in "
        f"{target} ({summary.tokens} tokens)",
        file=sys.stderr,
    )


def _run_systems(
    systems: dict[str, tuple[ProxyTuner, dict[str, str]]],
    prompts: list[str],
    settings: dict[str, Any],
    proxy_extra: dict[str, Any],
) -> dict[str, list[Any]]:
    """Each system's results, with live progress on stderr (tokens so far and tokens/s per
    system), so that stdout (a table or ``--json``) stays clean."""
    import time

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    rows = len(prompts) * int(settings.get("n") or 1)
    budget = rows * int(settings.get("max_new_tokens") or 0) or None
    columns = (
        TextColumn("{task.description:>6}"),
        BarColumn(),
        TextColumn("{task.completed:>5.0f} tokens  {task.fields[rate]}"),
        TimeElapsedColumn(),
    )
    outputs: dict[str, list[Any]] = {}
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        for name, (system, _) in systems.items():
            task = progress.add_task(name, total=budget, rate="")
            started = time.perf_counter()
            count = 0

            def advance(updates: list[Any], task: Any = task, started: float = started) -> None:
                nonlocal count
                count += len(updates)
                rate = f"{count / max(time.perf_counter() - started, 1e-9):.1f} tok/s"
                progress.update(task, advance=len(updates), rate=rate)

            extra = proxy_extra if name == "proxy" else {}
            outputs[name] = system.generate(prompts, on_step=advance, **extra, **settings)
            progress.update(task, total=count, completed=count)
    return outputs


def _systems(tuner: ProxyTuner) -> dict[str, tuple[ProxyTuner, dict[str, str]]]:
    """``--compare``'s systems: each tuner, and the prompt format of each model it runs."""
    formats = prompt_formats(tuner)
    systems = {"base": (tuner.alone("base"), {"base": formats["base"]})}
    if tuner.pairs:
        first = tuner.pairs[0]
        role = (first.expert or first.anti_expert).role  # type: ignore[union-attr]
        systems["expert"] = (tuner.alone(role), {role: formats[role]})
    systems["proxy"] = (tuner, formats)
    return systems


def _compare(
    tuner: ProxyTuner,
    prompts: list[str],
    settings: dict[str, Any],
    as_json: bool,
    proxy_extra: dict[str, Any],
) -> None:
    """Each system on every prompt: a table, or one JSON object per prompt whose results carry
    the prompt formats of their models (``"prompt_formats": {"base": "raw", ...}``)."""
    systems = _systems(tuner)
    outputs = _run_systems(systems, prompts, settings, proxy_extra)
    if as_json:
        for i, p in enumerate(prompts):
            rows = {
                name: [
                    {**r.to_dict(), "prompt_formats": systems[name][1]}
                    for r in out
                    if r.prompt_index == i
                ]
                for name, out in outputs.items()
            }
            print(
                json.dumps(
                    {"prompt": p, **{k: v[0] if len(v) == 1 else v for k, v in rows.items()}}
                )
            )
        return
    from rich.console import Console
    from rich.table import Table

    caption = "prompt formats: " + ", ".join(
        f"{role} {fmt!r}" for role, fmt in prompt_formats(tuner).items()
    )
    table = Table("prompt", *systems, show_lines=True, caption=caption)
    for i, p in enumerate(prompts):
        table.add_row(
            p,
            *(
                "\n---\n".join(r.text for r in out if r.prompt_index == i)
                for out in outputs.values()
            ),
        )
    Console().print(table)
