"""``train(config)``: data -> model (full or LoRA) -> ``transformers.Trainer`` -> an expert.

The Trainer brings the progress bar, evaluation, checkpoints with optimizer and RNG state,
exact resume, seeding and mixed precision; this module only prepares what it is given. DPO
is the same Trainer with the DPO loss (:mod:`proxytune.training.dpo`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backends.hf import load_hf, pick_device
from ..backends.lora_specs import adapter_base, peft_quietly
from ..errors import ConfigError, VocabularyMismatchError
from ..specs import ModelSpec
from ..vocab import shared_vocab_size
from .config import TrainConfig
from .data import load_preferences, load_sft
from .dpo import DPOCollator, DPODataset, DPOTrainer, reference_logps
from .encode import Encoder, encode_all, fit_pairs, fit_sft, pick_template
from .output import base_model_name, prepare_output, write_meta
from .residual import ResidualCollator, ResidualDataset, ResidualTrainer, base_top_k
from .sft import SFTCollator, SFTDataset


@dataclass
class TrainResult:
    """What a run produced and how it went."""

    out: Path
    lora: bool
    base_model: str
    expert_prompt: str
    metrics: dict[str, float] = field(default_factory=dict)
    log_history: list[dict[str, Any]] = field(default_factory=list)

    def expert_spec(self, **options: Any) -> ModelSpec:
        """The trained model as an expert, on the prompt format it was trained with."""
        if self.lora:
            return ModelSpec(
                self.base_model, adapter=str(self.out), prompt=self.expert_prompt, **options
            )
        return ModelSpec(str(self.out), prompt=self.expert_prompt, **options)

    @property
    def train_losses(self) -> list[float]:
        """The logged training loss, in order (the first at step 1)."""
        return [h["loss"] for h in self.log_history if "loss" in h]

    @property
    def eval_losses(self) -> list[float]:
        """The evaluation loss, in order (the first before any training step)."""
        return [h["eval_loss"] for h in self.log_history if "eval_loss" in h]


def train(config: TrainConfig, callbacks: Sequence[Any] = ()) -> TrainResult:
    """Fine-tune ``config.model`` on ``config.data`` and save the expert in ``config.out``.

    ``callbacks`` are extra ``transformers.TrainerCallback`` objects.
    """
    import transformers

    config.validate()
    if Path(config.model).expanduser().is_dir() and adapter_base(config.model) is not None:
        raise ConfigError(
            f"{config.model!r} is a LoRA adapter; train from its base model (merging the adapter "
            "first if you want to build on it)"
        )
    examples = _read(config, config.data)  # shape errors before the model loads
    evals = _read(config, config.eval_data) if config.eval_data else None
    out = prepare_output(config)
    checkpoint = _resume_point(config, out)

    device = pick_device(config.device)
    transformers.set_seed(config.seed)
    loaded = load_hf(
        ModelSpec(
            config.model,
            device="cpu",
            dtype="float32",
            trust_remote_code=config.trust_remote_code,
            allow_pickle=config.allow_pickle,
        )
    )
    model, tokenizer = loaded.model, loaded.tokenizer
    template = pick_template(config.template, tokenizer)
    if evals is None:
        examples, evals = _split(examples, config.eval_fraction, config.seed)
    max_length = config.max_length or loaded.context_length or 2048
    encoder = Encoder(tokenizer, template, config.system)
    train_set, eval_set = (
        _encode(config, encoder, items, path, max_length)
        for items, path in ((examples, config.data), (evals, config.eval_data or config.data))
    )
    if not train_set:
        raise ConfigError("no training example is left after the length policy")

    if config.gradient_checkpointing:
        model.config.use_cache = False
        if config.lora:
            model.enable_input_require_grads()
    if config.lora:
        model = _with_lora(model, config)
    args = _arguments(config, out, device, len(train_set), bool(eval_set))
    trainer_cls, collator, datasets, extra = _objective(
        config, loaded, model, train_set, eval_set, args.device
    )
    trainer = trainer_cls(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=datasets[0],
        eval_dataset=datasets[1],
        processing_class=tokenizer,
        callbacks=list(callbacks),
        **extra,
    )
    if not config.progress:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    write_meta(out, config, template, status="running", examples=len(train_set))
    outcome = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(str(out))
    metrics = {k: float(v) for k, v in outcome.metrics.items()}
    if eval_set:
        metrics.update(_final_eval(trainer))
    trainer.save_metrics("all", metrics)
    trainer.save_state()
    write_meta(out, config, template, status="complete", examples=len(train_set), metrics=metrics)
    return TrainResult(
        out=out,
        lora=config.lora,
        base_model=base_model_name(config.model),
        expert_prompt=template,
        metrics=metrics,
        log_history=list(trainer.state.log_history),
    )


def _final_eval(trainer: Any) -> dict[str, float]:
    """The validation metrics after the last step: the Trainer's own evaluation at that step
    when it made one (a step-based schedule always ends with one), else a new evaluation."""
    step = trainer.state.global_step
    for entry in reversed(trainer.state.log_history):
        if "eval_loss" in entry:
            if entry.get("step") == step:
                return {k: float(v) for k, v in entry.items() if k != "step"}
            break
    return {k: float(v) for k, v in trainer.evaluate().items()}


def _resume_point(config: TrainConfig, out: Path) -> str | None:
    """The checkpoint ``config.resume`` names (``True``: the last one in ``out``), or ``None``."""
    from transformers.trainer_utils import get_last_checkpoint

    if not config.resume:
        return None
    checkpoint = config.resume if isinstance(config.resume, str) else get_last_checkpoint(out)
    if checkpoint is None or not Path(checkpoint).is_dir():
        raise ConfigError(f"no checkpoint to resume from in {str(out)!r}")
    return checkpoint


def _objective(
    config: TrainConfig,
    loaded: Any,
    model: Any,
    train_set: list[Any],
    eval_set: list[Any],
    device: Any,
) -> tuple[Any, Any, list[Any], dict[str, Any]]:
    """What the training objective needs: its trainer class, collator, the two datasets (the
    second ``None`` without validation data) and the trainer's extra arguments (residual: the
    frozen base's precomputed log-probs; DPO: the reference log-probs and beta)."""
    import transformers

    pad_id = loaded.pad_id
    if config.objective == "residual":
        collator: Any = ResidualCollator(pad_id)
        datasets = [ResidualDataset(train_set), ResidualDataset(eval_set) if eval_set else None]
        vocab = _precompute_base(config, loaded, datasets, collator, device)
        return ResidualTrainer, collator, datasets, {"vocab": vocab}
    if config.method == "dpo":
        collator = DPOCollator(pad_id)
        datasets = [DPODataset(train_set), DPODataset(eval_set) if eval_set else None]
        model.to(device)
        for ds in datasets:
            if ds is not None:
                ds.reference = reference_logps(model, ds, collator, config.batch_size, device)
        return DPOTrainer, collator, datasets, {"beta": config.beta}

    collator = SFTCollator(pad_id)
    datasets = [SFTDataset(train_set), SFTDataset(eval_set) if eval_set else None]
    return transformers.Trainer, collator, datasets, {}


def _residual_base(config: TrainConfig, small: Any) -> tuple[Any, int]:
    """The frozen big base, loaded, and the ids it shares with the small model; a one-line
    error where their tokenizers differ."""
    assert config.base is not None  # validated
    base = load_hf(ModelSpec(config.base, device="cpu", dtype="float32"))
    named = [
        (name, m.tokenizer, m.model.get_output_embeddings().weight.shape[0])
        for name, m in ((config.model, small), (config.base, base))
    ]
    try:
        return base, shared_vocab_size(named)
    except VocabularyMismatchError as err:
        detail = str(err).split(". ")[0]
        raise ConfigError(
            f"--base {config.base!r} must share the tokenizer of --model {config.model!r} for "
            f"residual training ({detail}); pick a base of the same model family"
        ) from None


def _precompute_base(
    config: TrainConfig, small: Any, datasets: list[Any], collator: Any, device: Any
) -> int:
    """The frozen base's top-k log-probs on every example, once (then the base is freed);
    returns the shared vocabulary size."""
    base, vocab = _residual_base(config, small)
    model = base.model.to(device)
    for ds in datasets:
        if ds is not None:
            ds.base = base_top_k(
                model, ds, collator, config.batch_size, device, vocab, config.base_top_k
            )
    del model, base
    return vocab


def _read(config: TrainConfig, path: str) -> list[Any]:
    return load_preferences(path) if config.method == "dpo" else load_sft(path)


def _split(items: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out ``fraction`` of ``items`` (at least one, never all) for evaluation."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    n_eval = min(len(items) - 1, max(1, round(len(items) * fraction)))
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def _encode(
    config: TrainConfig, encoder: Encoder, items: list[Any], path: str, max_length: int
) -> list[Any]:
    if not items:
        return []
    if config.method == "dpo":
        return fit_pairs(
            encode_all(encoder.preference, items, path), max_length, config.overlong, path
        )
    return fit_sft(encode_all(encoder.sft, items, path), max_length, config.overlong, path)


def _with_lora(model: Any, config: TrainConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    targets: Any = config.lora_targets
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    try:
        with peft_quietly():
            return get_peft_model(model, lora)
    except ValueError as err:
        raise ConfigError(f"cannot add LoRA to {config.model!r}: {err}") from err


def _arguments(config: TrainConfig, out: Path, device: Any, n_train: int, has_eval: bool) -> Any:
    """``TrainingArguments`` for the run; step counts default to a share of all steps."""
    import torch
    from transformers import TrainingArguments

    per_epoch = math.ceil(math.ceil(n_train / config.batch_size) / config.grad_accum)
    total = config.max_steps or max(1, math.ceil(per_epoch * config.epochs))
    every_fifth = max(1, math.ceil(total / 5))
    precision = config.precision
    if precision == "auto":
        cuda = device.type == "cuda"
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision in ("bf16", "fp16") and device.type != "cuda":
        raise ConfigError(f"precision {precision} needs a CUDA device; use fp32 here")
    if device.type == "cuda" and device.index not in (None, 0):
        raise ConfigError(
            f"training runs on the first visible GPU; select {device} with "
            f"CUDA_VISIBLE_DEVICES={device.index} and device=cuda"
        )
    settings = dict(
        output_dir=str(out),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup,
        weight_decay=config.weight_decay,
        logging_steps=config.logging_steps or max(1, min(50, total // 20)),
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=config.eval_steps or every_fifth,
        eval_on_start=has_eval,
        save_strategy="steps",
        save_steps=config.save_steps or every_fifth,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        data_seed=config.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device.type == "cpu",
        activation_checkpointing=config.gradient_checkpointing or None,
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=not config.progress,
        log_level="warning" if config.progress else "error",
    )
    try:
        return TrainingArguments(**settings)
    except ValueError as err:  # e.g. an unknown scheduler name
        raise ConfigError(f"bad training setting: {err}") from err
