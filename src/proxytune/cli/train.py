"""``proxytune train``: fine-tune a small model into an expert (SFT or DPO, full or LoRA; or a
residual LoRA on top of a frozen big base, ``--objective residual --base BIG``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Annotated

import typer

from ..training import train as run_training
from ..training.config import TrainConfig
from ._app import app
from .options import Opt, grouped


def _th(name: str) -> str:
    """The help text of a ``TrainConfig`` field (one source for the API and the CLI)."""
    return TrainConfig.__dataclass_fields__[name].metadata["help"]


@dataclass(frozen=True)
class TrainOptions:
    """``train``'s options: :class:`~proxytune.training.TrainConfig`'s fields, most under the
    same name and help."""

    model: Annotated[str, Opt(help=_th("model"))]
    data: Annotated[str, Opt(help=_th("data"))]
    out: Annotated[str, Opt(help=_th("out"))]
    lora: Annotated[bool, Opt(help=_th("lora"))] = False
    dpo: Annotated[bool, Opt(help="DPO on prompt/chosen/rejected lines (default: SFT).")] = False
    objective: Annotated[str, Opt(help=_th("objective"))] = "sft"
    base: Annotated[str | None, Opt(help=_th("base"))] = None
    base_top_k: Annotated[int, Opt(help=_th("base_top_k") + " 0: every token.")] = 64
    epochs: Annotated[float | None, Opt(help="Passes over the data (default 1).")] = None
    max_steps: Annotated[int | None, Opt(help=_th("max_steps"))] = None
    eval_data: Annotated[str | None, Opt(help=_th("eval_data"))] = None
    eval_fraction: Annotated[float, Opt(help=_th("eval_fraction"))] = 0.1
    lr: Annotated[float | None, Opt("--lr", help=_th("learning_rate"))] = None
    batch_size: Annotated[int, Opt(help=_th("batch_size"))] = 4
    grad_accum: Annotated[int, Opt(help=_th("grad_accum"))] = 1
    max_length: Annotated[int | None, Opt(help=_th("max_length"))] = None
    overlong: Annotated[str, Opt(help=_th("overlong"))] = "refuse"
    template: Annotated[str, Opt(help=_th("template"))] = "auto"
    system: Annotated[str | None, Opt(help=_th("system"))] = None
    lora_r: Annotated[int, Opt(help=_th("lora_r"))] = 16
    lora_alpha: Annotated[float, Opt(help=_th("lora_alpha"))] = 32.0
    lora_dropout: Annotated[float, Opt(help=_th("lora_dropout"))] = 0.05
    lora_targets: Annotated[str, Opt(help=_th("lora_targets"))] = "all-linear"
    beta: Annotated[float, Opt(help=_th("beta"))] = 0.1
    lr_scheduler: Annotated[str, Opt(help=_th("lr_scheduler"))] = "linear"
    warmup: Annotated[float, Opt(help=_th("warmup"))] = 0.0
    weight_decay: Annotated[float, Opt(help=_th("weight_decay"))] = 0.0
    seed: Annotated[int, Opt(help=_th("seed"))] = 0
    logging_steps: Annotated[int | None, Opt(help=_th("logging_steps"))] = None
    eval_steps: Annotated[int | None, Opt(help=_th("eval_steps"))] = None
    save_steps: Annotated[int | None, Opt(help=_th("save_steps"))] = None
    save_total_limit: Annotated[int, Opt(help=_th("save_total_limit"))] = 2
    resume: Annotated[bool, Opt(help="Continue from the last checkpoint in --out.")] = False
    resume_from: Annotated[str | None, Opt(help="Continue from this checkpoint.")] = None
    overwrite: Annotated[bool, Opt(help=_th("overwrite"))] = False
    device: Annotated[str, Opt(help=_th("device"))] = "auto"
    precision: Annotated[str, Opt(help=_th("precision"))] = "auto"
    gradient_checkpointing: Annotated[bool, Opt(help=_th("gradient_checkpointing"))] = False
    trust_remote_code: Annotated[bool, Opt(help=_th("trust_remote_code"))] = False
    allow_pickle: Annotated[bool, Opt(help=_th("allow_pickle"))] = False
    quiet: Annotated[bool, Opt(help="No progress bar or log lines.")] = False

    def config(self) -> TrainConfig:
        """The run's :class:`~proxytune.training.TrainConfig` (the options that are spelt
        otherwise on the command line translated)."""
        if self.epochs is not None and self.max_steps is not None:
            raise typer.BadParameter("give --epochs or --max-steps, not both")
        if self.resume and self.resume_from:
            raise typer.BadParameter("give --resume or --resume-from, not both")
        given = asdict(self)
        for name in ("dpo", "lr", "quiet", "resume_from"):
            given.pop(name)
        given.update(
            method="dpo" if self.dpo else "sft",
            base_top_k=self.base_top_k or None,
            epochs=self.epochs or 1.0,
            learning_rate=self.lr,
            resume=self.resume_from or self.resume,
            progress=not self.quiet,
        )
        return TrainConfig(**given)


@app.command()
@grouped
def train(*, options: TrainOptions) -> None:
    """Fine-tune a small model into an expert (SFT or DPO, full or LoRA)."""
    result = run_training(options.config())
    what = "a LoRA adapter" if result.lora else "the model"
    print(f"saved {what} to {result.out} (trained on the {result.expert_prompt} prompt format)")
    for name, losses in (("train", result.train_losses), ("eval", result.eval_losses)):
        if losses:
            print(f"  {name} loss {losses[0]:.4g} -> {losses[-1]:.4g}")
    anti = result.base_model
    print(
        "use it as an expert:\n  proxytune generate --base BIG_MODEL "
        f"--expert {result.out} --anti-expert {anti} --expert-prompt {result.expert_prompt} "
        "'your prompt'"
    )
