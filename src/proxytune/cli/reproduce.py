"""``proxytune reproduce``: the paper's experiment in miniature, stage by stage, resumable."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Annotated, Any

from ._app import app
from .options import DeviceOption, DtypeOption, Opt, grouped, parse_alphas


@dataclass(frozen=True)
class StudyOptions:
    """What the experiment studies: tasks, models, splits, alphas, rules and training."""

    tasks: Annotated[
        str | None, Opt(help="Tasks to run as given, e.g. 'pyexpr,gcd' (default: screened).")
    ] = None
    candidates: Annotated[
        str | None, Opt(help="Tasks screened for the selection rule (default: all built-in).")
    ] = None
    task_file: Annotated[
        list[str] | None, Opt(help="Your own task (YAML, docs/reproduction.md); repeatable.")
    ] = None
    small: Annotated[str | None, Opt(help="Small model (expert = its LoRA; anti-expert = it).")] = (
        None
    )
    big: Annotated[str | None, Opt(help="Big model (the base; tuned = its LoRA).")] = None
    split: Annotated[
        list[str] | None, Opt(help="Split sizes TASK=TRAIN,VALIDATION,TEST (repeatable).")
    ] = None
    alpha: Annotated[
        list[str] | None,
        Opt(
            "--alpha",
            "--alphas",
            help="Validation sweep: repeat --alpha, or '0.5,1,2' (--alphas: the old spelling).",
        ),
    ] = None
    rules: Annotated[str | None, Opt(help="Rules compared, e.g. 'proxy,product,plausible'.")] = None
    seed: Annotated[int | None, Opt(help="Seed of the data, splits and training.")] = None
    epochs: Annotated[float | None, Opt(help="Training epochs (expert and tuned).")] = None
    learning_rate: Annotated[float | None, Opt(help="LoRA learning rate.")] = None
    eval_batch_size: Annotated[int | None, Opt(help="Examples per evaluation batch.")] = None
    analysis_examples: Annotated[
        int | None, Opt(help="Test prompts replayed token by token per task (0: none).")
    ] = None

    def config_options(self) -> dict[str, Any]:
        """:func:`~proxytune.reproduce.command.build_config`'s keywords (``None``: the
        preset's), ``split`` aside."""
        given = asdict(self)
        del given["split"], given["task_file"], given["alpha"]
        given["task_files"] = tuple(self.task_file or ()) or None
        given["alphas"] = tuple(parse_alphas(self.alpha)) or None
        return given


@app.command()
@grouped
def reproduce(
    *,
    out: Annotated[str, Opt(help="Experiment folder (created; reused to resume).")] = (
        "runs/reproduce"
    ),
    preset: Annotated[
        str, Opt(help="cpu (embedded models, 2 cores) | gpu (Llama-2 7B/13B) | tiny.")
    ] = "cpu",
    study: StudyOptions,
    until: Annotated[str, Opt(help="Stop after this stage (data ... report).")] = "report",
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    backend: Annotated[
        str | None,
        Opt(help="Evaluate on auto (llama.cpp where installed) | transformers | llamacpp."),
    ] = None,
    progress: Annotated[bool, Opt(help="Show progress bars.")] = True,
) -> None:
    """Reproduce the paper's experiment in miniature: make the data, train the expert and the
    directly tuned reference, evaluate, and write the tables (docs/reproduction.md).
    Run it again to resume; finished stages are skipped."""
    # lazy: torch stays off the CLI's start (`proxytune --help` imports every command module)
    from ..reproduce.command import build_config
    from ..reproduce.pipeline import reproduce as run_reproduction

    config = build_config(
        preset,
        out,
        list(study.split or ()),
        **study.config_options(),
        device=device,
        dtype=dtype,
        backend=backend,
        progress=progress,
    )
    run_reproduction(config, until=until)
    print(f"results: {config.out}/results.md")
