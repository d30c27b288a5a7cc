"""``TrainConfig``: every setting of a training run, each field with its help text."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ConfigError

METHODS = ("sft", "dpo")
OBJECTIVES = ("sft", "residual")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEFAULT_LR = {("sft", False): 2e-5, ("sft", True): 2e-4, ("dpo", False): 1e-6, ("dpo", True): 2e-5}
"""Learning rates used when none is given: (method, lora) -> rate."""


def _positive(value: float, least: float | None = None) -> bool:
    """``value`` is a finite number > 0 (or >= ``least``): NaN and infinity never pass."""
    if not math.isfinite(value):
        return False
    return value > 0 if least is None else value >= least


def _help(text: str, default: object = None, **kw: object) -> object:
    return field(default=default, metadata={"help": text}, **kw)  # type: ignore[call-overload]


@dataclass
class TrainConfig:
    """A fine-tuning run of the small model (the expert), SFT or DPO, full or LoRA.

    >>> TrainConfig(model="small", data="train.jsonl", out="expert", lora=True)  # doctest: +SKIP
    """

    model: str = _help("Model to tune: a local directory, a hub id, a .gguf or embedded:NAME.", "")
    data: str = _help("JSONL: prompt/completion, messages, or prompt/chosen/rejected.", "")
    out: str = _help("Output directory: the adapter or the full model, and checkpoints.", "")
    method: str = _help("sft (supervised) or dpo (preference pairs).", "sft")
    objective: str = _help(
        "sft (the task alone) or residual (what the frozen --base lacks: cross-entropy of "
        "softmax(log p_base + log p_expert - log p_small), needs --lora).",
        "sft",
    )
    base: str | None = _help("Residual: the big base model, frozen (same tokenizer).")
    base_top_k: int | None = _help(
        "Residual: base log-probs kept per answer token (top k; none: every token).", 64
    )
    lora: bool = _help("Train a LoRA adapter instead of every weight.", False)
    lora_r: int = _help("LoRA rank.", 16)
    lora_alpha: float = _help("LoRA scaling numerator (scale = alpha / r).", 32.0)
    lora_dropout: float = _help("Dropout on the LoRA input.", 0.05)
    lora_targets: str = _help("Adapted modules: all-linear or comma-separated names.", "all-linear")
    beta: float = _help("DPO: strength of the pull towards the reference model.", 0.1)
    eval_data: str | None = _help("Evaluation JSONL; default: split eval_fraction off the data.")
    eval_fraction: float = _help("Share of the data held out for evaluation (0 for none).", 0.1)
    epochs: float = _help("Passes over the training data (unless max_steps is set).", 1.0)
    max_steps: int | None = _help("Optimizer steps to run; overrides epochs.")
    learning_rate: float | None = _help("Peak learning rate; default depends on method and LoRA.")
    lr_scheduler: str = _help("Scheduler: linear, cosine, constant, ...", "linear")
    warmup: float = _help("Warm-up: steps (>= 1) or a fraction of all steps (< 1).", 0.0)
    weight_decay: float = _help("AdamW weight decay.", 0.0)
    batch_size: int = _help("Examples per device per step (DPO: pairs).", 4)
    grad_accum: int = _help("Batches accumulated into one optimizer step.", 1)
    max_length: int | None = _help("Longest sequence in tokens; default: the model's context.")
    overlong: str = _help("Overlong: refuse (error naming lines) or truncate.", "refuse")
    template: str = _help("auto (chat template if the model has one), chat or raw.", "auto")
    system: str | None = _help("System prompt for every example (as the expert will be given).")
    seed: int = _help("Seed for initialisation, data order, the eval split and dropout.", 0)
    logging_steps: int | None = _help("Log the loss every N steps; default: about 20 times.")
    eval_steps: int | None = _help("Evaluate every N steps; default: 5 times per run.")
    save_steps: int | None = _help("Checkpoint every N steps; default: 5 times per run.")
    save_total_limit: int = _help("Checkpoints kept (oldest removed).", 2)
    resume: bool | str = _help("Continue from the last checkpoint in out, or from this one.", False)
    overwrite: bool = _help("Replace an existing training output in out.", False)
    device: str = _help("auto, cpu, cuda or cuda:N (training uses one device).", "auto")
    precision: str = _help("auto (bf16 autocast on CUDA if supported), fp32, bf16, fp16.", "auto")
    gradient_checkpointing: bool = _help("Recompute activations to save memory.", False)
    trust_remote_code: bool = _help("Run model code from the hub.", False)
    allow_pickle: bool = _help("Allow pickle (.bin) weights.", False)
    progress: bool = _help("Show the progress bar and log lines.", True)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad setting."""
        for name in ("model", "data", "out"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is required")
        residual = self.objective == "residual"
        checks = [
            (
                self.objective in OBJECTIVES,
                f"objective must be one of {OBJECTIVES}, got {self.objective!r}",
            ),
            (not residual or bool(self.base), "objective residual needs the big model: --base"),
            (
                not residual or self.lora,
                "objective residual trains a LoRA (the anti-expert is the adapter off): add --lora",
            ),
            (
                not residual or self.method == "sft",
                "objective residual trains on prompt/completion data: drop --dpo",
            ),
            (
                self.base is None or residual,
                "--base is read only by --objective residual; add it or drop --base",
            ),
            (
                self.base_top_k is None or self.base_top_k >= 1,
                f"base_top_k must be at least 1 (or none for every token), got {self.base_top_k}",
            ),
            (self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}"),
            (self.overlong in ("refuse", "truncate"), "overlong must be refuse or truncate"),
            (self.template in ("auto", "chat", "raw"), "template must be auto, chat or raw"),
            (self.lora_r >= 1, "lora_r must be at least 1"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            (_positive(self.beta), f"beta must be a finite number > 0, got {self.beta}"),
            (0 <= self.eval_fraction < 1, "eval_fraction must be in [0, 1)"),
            (_positive(self.epochs), f"epochs must be a finite number > 0, got {self.epochs}"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be at least 1"),
            (
                self.learning_rate is None or _positive(self.learning_rate),
                f"learning_rate (--lr) must be a finite number > 0, got {self.learning_rate}",
            ),
            (_positive(self.warmup, 0), f"warmup must be a finite number >= 0, got {self.warmup}"),
            (
                _positive(self.weight_decay, 0),
                f"weight_decay must be a finite number >= 0, got {self.weight_decay}",
            ),
            (
                _positive(self.lora_alpha),
                f"lora_alpha must be a finite number > 0, got {self.lora_alpha}",
            ),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size, grad_accum must be >= 1"),
            (self.max_length is None or self.max_length >= 2, "max_length must be at least 2"),
            (self.save_total_limit >= 1, "save_total_limit must be at least 1"),
        ]
        for steps in (self.logging_steps, self.eval_steps, self.save_steps):
            checks.append((steps is None or steps >= 1, "logging/eval/save steps must be >= 1"))
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def lr(self) -> float:
        """The learning rate in use (the given one, or the default for method and LoRA)."""
        return self.learning_rate or DEFAULT_LR[(self.method, self.lora)]
