"""``proxytune train``: fine-tune a small model into an expert (SFT or DPO, full or LoRA; or a
residual LoRA on top of a frozen big base, ``--objective residual --base BIG``)."""

from __future__ import annotations

from typing import Annotated

import typer

from ._app import app
from .options import Opt


def _th(name: str) -> str:
    """The help text of a ``TrainConfig`` field (one source for the API and the CLI)."""
    from ..training.config import TrainConfig

    return TrainConfig.__dataclass_fields__[name].metadata["help"]


@app.command()
def train(
    model: Annotated[str, Opt(help=_th("model"))],
    data: Annotated[str, Opt(help=_th("data"))],
    out: Annotated[str, Opt(help=_th("out"))],
    lora: Annotated[bool, Opt(help=_th("lora"))] = False,
    dpo: Annotated[bool, Opt(help="DPO on prompt/chosen/rejected lines (default: SFT).")] = False,
    objective: Annotated[str, Opt(help=_th("objective"))] = "sft",
    base: Annotated[str | None, Opt(help=_th("base"))] = None,
    base_top_k: Annotated[int, Opt(help=_th("base_top_k") + " 0: every token.")] = 64,
    epochs: Annotated[float | None, Opt(help="Passes over the data (default 1).")] = None,
    max_steps: Annotated[int | None, Opt(help=_th("max_steps"))] = None,
    eval_data: Annotated[str | None, Opt(help=_th("eval_data"))] = None,
    eval_fraction: Annotated[float, Opt(help=_th("eval_fraction"))] = 0.1,
    lr: Annotated[float | None, Opt("--lr", help=_th("learning_rate"))] = None,
    batch_size: Annotated[int, Opt(help=_th("batch_size"))] = 4,
    grad_accum: Annotated[int, Opt(help=_th("grad_accum"))] = 1,
    max_length: Annotated[int | None, Opt(help=_th("max_length"))] = None,
    overlong: Annotated[str, Opt(help=_th("overlong"))] = "refuse",
    template: Annotated[str, Opt(help=_th("template"))] = "auto",
    system: Annotated[str | None, Opt(help=_th("system"))] = None,
    lora_r: Annotated[int, Opt(help=_th("lora_r"))] = 16,
    lora_alpha: Annotated[float, Opt(help=_th("lora_alpha"))] = 32.0,
    lora_dropout: Annotated[float, Opt(help=_th("lora_dropout"))] = 0.05,
    lora_targets: Annotated[str, Opt(help=_th("lora_targets"))] = "all-linear",
    beta: Annotated[float, Opt(help=_th("beta"))] = 0.1,
    lr_scheduler: Annotated[str, Opt(help=_th("lr_scheduler"))] = "linear",
    warmup: Annotated[float, Opt(help=_th("warmup"))] = 0.0,
    weight_decay: Annotated[float, Opt(help=_th("weight_decay"))] = 0.0,
    seed: Annotated[int, Opt(help=_th("seed"))] = 0,
    logging_steps: Annotated[int | None, Opt(help=_th("logging_steps"))] = None,
    eval_steps: Annotated[int | None, Opt(help=_th("eval_steps"))] = None,
    save_steps: Annotated[int | None, Opt(help=_th("save_steps"))] = None,
    save_total_limit: Annotated[int, Opt(help=_th("save_total_limit"))] = 2,
    resume: Annotated[bool, Opt(help="Continue from the last checkpoint in --out.")] = False,
    resume_from: Annotated[str | None, Opt(help="Continue from this checkpoint.")] = None,
    overwrite: Annotated[bool, Opt(help=_th("overwrite"))] = False,
    device: Annotated[str, Opt(help=_th("device"))] = "auto",
    precision: Annotated[str, Opt(help=_th("precision"))] = "auto",
    gradient_checkpointing: Annotated[bool, Opt(help=_th("gradient_checkpointing"))] = False,
    trust_remote_code: Annotated[bool, Opt(help=_th("trust_remote_code"))] = False,
    allow_pickle: Annotated[bool, Opt(help=_th("allow_pickle"))] = False,
    quiet: Annotated[bool, Opt(help="No progress bar or log lines.")] = False,
) -> None:
    """Fine-tune a small model into an expert (SFT or DPO, full or LoRA)."""
    from ..training import TrainConfig
    from ..training import train as run_training

    if epochs is not None and max_steps is not None:
        raise typer.BadParameter("give --epochs or --max-steps, not both")
    if resume and resume_from:
        raise typer.BadParameter("give --resume or --resume-from, not both")
    result = run_training(
        TrainConfig(
            model=model,
            data=data,
            out=out,
            method="dpo" if dpo else "sft",
            objective=objective,
            base=base,
            base_top_k=base_top_k or None,
            lora=lora,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            lora_targets=lora_targets,
            beta=beta,
            eval_data=eval_data,
            eval_fraction=eval_fraction,
            epochs=epochs or 1.0,
            max_steps=max_steps,
            learning_rate=lr,
            lr_scheduler=lr_scheduler,
            warmup=warmup,
            weight_decay=weight_decay,
            batch_size=batch_size,
            grad_accum=grad_accum,
            max_length=max_length,
            overlong=overlong,
            template=template,
            system=system,
            seed=seed,
            logging_steps=logging_steps,
            eval_steps=eval_steps,
            save_steps=save_steps,
            save_total_limit=save_total_limit,
            resume=resume_from or resume,
            overwrite=overwrite,
            device=device,
            precision=precision,
            gradient_checkpointing=gradient_checkpointing,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
            progress=not quiet,
        )
    )
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
