"""``ReproduceConfig``: every setting of a reproduction run, the presets, and the settings
each stage depends on (its resume key)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import ConfigError
from .tasks import DATA_VERSION, SPLITS, task_kind

SMALL = "embedded:qwen2.5-coder-0.5b-instruct"
BIG = "embedded:qwen2.5-coder-1.5b-instruct"

DEFAULT_SIZES = {"train": 100, "validation": 24, "test": 200}
FIXED_SIZES = {"truthfulqa": {"train": 70, "validation": 24, "test": 200}}
"""Tasks on a fixed data set get sizes that fit it (TruthfulQA: 299 questions)."""

BACKENDS = ("auto", "transformers", "llamacpp")

RULES: dict[str, Any] = {
    "proxy": "proxy",
    "product": "product",
    "plausible": {"name": "plausible", "tau": 0.1},
    "gated": {"name": "gated"},
    "rerank": {"name": "rerank", "k": 10},
    "mixture": "mixture",
}
"""Steering rules a run can compare, by the name used in its tables."""


@dataclass(frozen=True)
class ReproduceConfig:
    """A reproduction: data, the trained expert and reference, and the evaluation."""

    out: str
    tasks: tuple[str, ...] = ("arith", "sort_words", "truthfulqa")
    small: str = SMALL
    """The small model: the expert is a LoRA of it, the anti-expert is it untuned."""
    big: str = BIG
    """The base; the reference ("tuned") is a LoRA of it trained the same way."""
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per task: ``{"train": n, "validation": n, "test": n}``; missing tasks get the defaults."""
    seed: int = 0
    alphas: tuple[float, ...] = (0.5, 1.0, 2.0)
    """Validation sweep; each rule is tested at its best alpha."""
    rules: tuple[str, ...] = ("proxy", "product")
    epochs: float = 1.0
    learning_rate: float = 4e-4
    lora_r: int = 16
    train_batch_size: int = 4
    eval_batch_size: int = 24
    analysis_examples: int = 12
    """Test prompts of each generate task replayed token by token (0: no analysis)."""
    device: str = "auto"
    dtype: str = "auto"
    backend: str = "auto"
    """Where evaluation runs: ``auto`` (llama.cpp where it is installed and the models have
    GGUFs, the trained LoRAs as llama.cpp adapters; else transformers), ``transformers`` or
    ``llamacpp``. Training always runs on transformers."""
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("give at least one task")
        for name in self.tasks:
            task_kind(name)
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"tasks must be distinct, got {list(self.tasks)}")
        for name in self.sizes:
            if name not in self.tasks:
                raise ConfigError(f"split sizes given for {name!r}, which is not among the tasks")
        unknown = [r for r in self.rules if r not in RULES]
        if unknown or not self.rules:
            raise ConfigError(f"unknown rule(s) {unknown}; choose from {', '.join(RULES)}")
        if "proxy" not in self.rules:
            raise ConfigError("rules must include 'proxy' (the paper's rule: gap closed uses it)")
        if not self.alphas or any(not a > 0 for a in self.alphas):
            raise ConfigError(f"alphas must be positive numbers, got {list(self.alphas)}")
        for name, value in (
            ("epochs", self.epochs),
            ("learning_rate", self.learning_rate),
            ("lora_r", self.lora_r),
            ("train_batch_size", self.train_batch_size),
            ("eval_batch_size", self.eval_batch_size),
        ):
            if not value > 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.analysis_examples < 0:
            raise ConfigError("analysis_examples must be >= 0")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")

    def split_sizes(self, task: str) -> dict[str, int]:
        sizes = dict(FIXED_SIZES.get(task, DEFAULT_SIZES))
        sizes.update(self.sizes.get(task, {}))
        bad = sorted(set(sizes) - set(SPLITS))
        if bad:
            raise ConfigError(f"task {task!r}: unknown split(s) {bad}; splits are {SPLITS}")
        return sizes

    # what each stage depends on ------------------------------------------------------------

    def stage_settings(self, stage: str) -> dict[str, Any]:
        """The settings a stage's results depend on (its own and its inputs')."""
        data = {
            "tasks": list(self.tasks),
            "sizes": {t: self.split_sizes(t) for t in self.tasks},
            "seed": self.seed,
            "version": DATA_VERSION,
        }
        training = {
            "epochs": self.epochs,
            "learning_rate": self.learning_rate,
            "lora_r": self.lora_r,
            "batch_size": self.train_batch_size,
            "seed": self.seed,
        }
        if stage == "data":
            return data
        if stage == "expert":
            return {"data": data, "model": self.small, **training}
        if stage == "tuned":
            return {"data": data, "model": self.big, **training}
        evaluation = {
            "data": data,
            "small": self.small,
            "big": self.big,
            "training": training,
            "alphas": list(self.alphas),
            "rules": {r: RULES[r] for r in self.rules},
            "dtype": self.dtype,
        }
        backends = self.backends()
        if set(backends.values()) != {"transformers"}:  # transformers-only runs keep their key
            evaluation["backends"] = backends
        if stage in ("validation", "test", "analysis", "report"):
            if stage == "analysis":
                evaluation["analysis_examples"] = self.analysis_examples
            return evaluation
        raise ConfigError(f"unknown stage {stage!r}")

    def backends(self) -> dict[str, str]:
        """The backend each model is evaluated on (``auto`` resolved on this machine)."""
        from ..backends.load import backend_of
        from ..specs import ModelSpec

        return {
            role: backend_of(ModelSpec(path, backend=self.backend))
            for role, path in (("small", self.small), ("big", self.big))
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, **changes: Any) -> ReproduceConfig:
        return replace(self, **changes)


def settings_key(settings: dict[str, Any]) -> str:
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Human-readable paths where two settings trees differ (``a.b: 1 -> 2``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            sub = f"{path}.{key}" if path else str(key)
            out += differences(old.get(key), new.get(key), sub)
        return out
    return [] if old == new else [f"{path or 'settings'}: {old!r} -> {new!r}"]


def changed_settings(recorded: dict[str, Any], settings: dict[str, Any]) -> str | None:
    """What differs (the first four paths) when ``recorded`` (a stamp with ``key`` and
    ``settings``) was made under other ``settings``; ``None`` when they match."""
    if recorded.get("key") == settings_key(settings):
        return None
    return "; ".join(differences(recorded.get("settings"), settings)[:4])


PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {},
    "tiny": {
        "sizes": {
            "arith": {"train": 8, "validation": 4, "test": 6},
            "sort_words": {"train": 8, "validation": 4, "test": 6},
            "truthfulqa": {"train": 6, "validation": 4, "test": 6},
        },
        "alphas": (0.5, 1.0),
        "epochs": 1.0,
        "train_batch_size": 4,
        "eval_batch_size": 4,
        "analysis_examples": 2,
    },
    "gpu": {
        "small": "meta-llama/Llama-2-7b-hf",
        "big": "meta-llama/Llama-2-13b-hf",
        "sizes": {
            "arith": {"train": 2000, "validation": 200, "test": 1000},
            "sort_words": {"train": 2000, "validation": 200, "test": 1000},
            "truthfulqa": {"train": 100, "validation": 49, "test": 150},
        },
        "alphas": (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0),
        "rules": ("proxy", "product", "plausible", "gated", "rerank", "mixture"),
        "epochs": 2.0,
        "learning_rate": 2e-4,
        "train_batch_size": 16,
        "eval_batch_size": 64,
        "analysis_examples": 100,
        "dtype": "bfloat16",
    },
}
"""``cpu``: the embedded Qwen2.5-Coder 0.5B / 1.5B (training on transformers, evaluation on
llama.cpp where it is installed); ``tiny``: the test suite's size; ``gpu``: Llama-2 7B / 13B
(hub ids) on one large GPU."""


def preset(name: str, out: str, **overrides: Any) -> ReproduceConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    values = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    tasks = values.get("tasks", ReproduceConfig.tasks)
    # a preset sizes every task; keep the sizes of the tasks chosen
    values["sizes"] = {t: s for t, s in values.get("sizes", {}).items() if t in tasks}
    return ReproduceConfig(out=out, **values)
