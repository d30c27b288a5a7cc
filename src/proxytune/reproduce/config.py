"""``ReproduceConfig``: every setting of a reproduction run, the presets, and the settings
each stage depends on (its resume key)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from typing import Any

from ..backends.load import backend_of
from ..errors import ConfigError
from ..specs import ModelSpec
from .screen import SelectionRule
from .taskfile import load_task_file
from .tasks import CANDIDATES, CONTROLS, DATA_VERSION, SPLITS, TASKS, TaskKind, task_kind

SMALL = "embedded:qwen2.5-coder-0.5b-instruct"
BIG = "embedded:qwen2.5-coder-1.5b-instruct"

DEFAULT_SIZES = {"shots": 3, "screen": 40, "train": 200, "validation": 50, "test": 200}
"""Split sizes of a task that names none of its own (:attr:`.tasks.TaskKind.sizes`)."""

BACKENDS = ("auto", "transformers", "llamacpp")
STAGES = (
    "screen",
    "data",
    "expert",
    "tuned",
    "residual",
    "validation",
    "test",
    "analysis",
    "report",
)
"""A run's stages in order (:mod:`.pipeline`)."""

ALPHAS = (0.5, 1.0, 1.5, 2.0, 3.0)
"""The validation grid; extended (:func:`next_value`) while a rule's best is the largest tried."""
MAX_EXTENSIONS = 4
PRIMARY_ALPHA = 1.0
"""The paper's alpha in every main result: the primary row, beside the validated alpha."""

RULES: dict[str, Any] = {
    "proxy": "proxy",
    "product": "product",
    "plausible": {"name": "plausible", "tau": 0.1},
    "gated": {"name": "gated"},
    "rerank": {"name": "rerank", "k": 10},
    "mixture": "mixture",
    "nudging": {"name": "nudging"},
    "union": {"name": "union", "tau": 0.1},
    "w2s": {"system": "RerankSystem", "k": 3},
    "residual": {"name": "proxy", "expert": "residual"},
}
"""Steering rules a run can compare, by the name used in its tables. ``nudging`` sweeps its
``gamma`` (:data:`GAMMAS`) where the others sweep alpha; ``w2s`` is not a per-token rule but the
short-answer weak-to-strong rerank (:class:`~proxytune.evaluation.RerankSystem`), its ``beta``
swept over the alpha grid. ``residual`` is the proxy formula at alpha 1 with an expert trained
by the residual objective (``proxytune train --objective residual``: what the base lacks, at
alpha 1), so it is not swept."""
GAMMAS = (0.2, 0.4, 0.6, 0.8)
"""nudging's validation grid: the base's top-1 probability below which the expert writes."""


def sweep_grid(rule: str, alphas: tuple[float, ...]) -> tuple[float, ...]:
    """The values a rule is validated over (alpha, nudging's gamma, residual's alpha 1)."""
    if rule == "residual":
        return (PRIMARY_ALPHA,)
    return GAMMAS if rule == "nudging" else alphas


def next_value(rule: str, tried: list[float]) -> float:
    """The value a sweep tries next when its best is the largest tried: alpha x1.5; nudging's
    gamma halfway to 1 (a probability threshold: at 1 the expert writes every token)."""
    top = max(tried)
    return round((top + 1) / 2, 4) if rule == "nudging" else round(top * 1.5, 4)


def swept_name(rule: str) -> str:
    """What a rule's swept value is called in the tables."""
    return {"nudging": "gamma", "w2s": "beta"}.get(rule, "a")


def steering(rule: str, value: float) -> tuple[float, Any]:
    """``(alpha, rule spec)`` of ``rule`` at its swept ``value``."""
    if rule == "nudging":
        return PRIMARY_ALPHA, {**RULES[rule], "gamma": value}
    if rule == "residual":
        return value, RULES["proxy"]
    return value, RULES[rule]


@dataclass(frozen=True)
class ReproduceConfig:
    """A reproduction: data, the trained expert and reference, and the evaluation."""

    out: str
    tasks: tuple[str, ...] | None = None
    """The tasks trained and reported; ``None``: the screened candidates that pass
    ``selection``, then the ``controls`` (tasks from ``task_files`` are always included)."""
    candidates: tuple[str, ...] = CANDIDATES
    controls: tuple[str, ...] = CONTROLS
    task_files: tuple[str, ...] = ()
    """User tasks (:mod:`.taskfile` YAML files): screened, trained and reported."""
    selection: SelectionRule = field(default_factory=SelectionRule)
    small: str = SMALL
    """The small model: the expert is a LoRA of it, the anti-expert is it untuned."""
    big: str = BIG
    """The base; the reference ("tuned") is a LoRA of it trained the same way."""
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per task: ``{"train": n, "validation": n, "test": n}``; missing tasks get the defaults."""
    seed: int = 0
    alphas: tuple[float, ...] = ALPHAS
    """Validation sweep (extended while the best is the largest); each rule is tested at its
    best alpha, and ``proxy`` at alpha 1 too."""
    rules: tuple[str, ...] = ("proxy", "product", "nudging", "union")
    epochs: float = 1.0
    """Training epochs to start from; raised by one while the expert follows the taught format
    on under ``min_compliance`` of any task's validation items (at most ``max_epochs``)."""
    min_compliance: float = 0.95
    max_epochs: float = 4.0
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
    kv_cells: int = 16384
    """llama.cpp's KV cells per model: room for a batch of 3-shot prompts (no effect on
    results, so not part of any stage's settings)."""
    progress: bool = True

    def __post_init__(self) -> None:
        if self.tasks is not None and not self.tasks and not self.task_files:
            raise ConfigError("give at least one task (or none, to choose them by screening)")
        named = self.screened() + tuple(self.controls)
        for name in named:
            self.kind(name)
        for group in ("tasks", "candidates", "controls"):
            values = getattr(self, group) or ()
            if len(set(values)) != len(values):
                raise ConfigError(f"{group} must be distinct, got {list(values)}")
        for name in self.sizes:
            if name not in named:
                raise ConfigError(f"split sizes given for {name!r}, which is not among the tasks")
        if not 0 <= self.min_compliance <= 1:
            raise ConfigError(f"min_compliance must be in [0, 1], got {self.min_compliance}")
        if not self.max_epochs >= self.epochs:
            raise ConfigError(f"max_epochs ({self.max_epochs}) must be >= epochs ({self.epochs})")
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

    # tasks -------------------------------------------------------------------------------

    @cached_property
    def file_kinds(self) -> dict[str, TaskKind]:
        """The tasks of ``task_files``, by name (read once per config)."""
        kinds: dict[str, TaskKind] = {}
        for path in self.task_files:
            kind = load_task_file(path)
            if kind.name in kinds or kind.name in TASKS:
                raise ConfigError(
                    f"task file {path!r}: the name {kind.name!r} is taken; give it another"
                )
            kinds[kind.name] = kind
        return kinds

    def kind(self, name: str) -> TaskKind:
        """A task by name: a built-in or one of ``task_files``."""
        files = self.file_kinds
        return files[name] if name in files else task_kind(name)

    def screened(self) -> tuple[str, ...]:
        """The tasks the screen stage measures."""
        base = self.candidates if self.tasks is None else self.tasks
        return tuple(base) + tuple(n for n in self.file_kinds if n not in base)

    def run_tasks(self, chosen: list[str] | None) -> tuple[str, ...]:
        """The tasks trained and reported, given the screen's ``chosen`` candidates."""
        files = tuple(self.file_kinds)
        if self.tasks is not None:
            return tuple(self.tasks) + tuple(f for f in files if f not in self.tasks)
        picked = [*(chosen or []), *(f for f in files if f not in (chosen or []))]
        return tuple(picked) + tuple(c for c in self.controls if c not in picked)

    def split_sizes(self, task: str) -> dict[str, int]:
        sizes = dict(self.kind(task).sizes or DEFAULT_SIZES)
        sizes.update(self.sizes.get(task, {}))
        bad = sorted(set(sizes) - set(SPLITS))
        if bad:
            raise ConfigError(f"task {task!r}: unknown split(s) {bad}; splits are {SPLITS}")
        return sizes

    # what each stage depends on ------------------------------------------------------------

    def stage_settings(self, stage: str) -> dict[str, Any]:
        """The settings a stage's results depend on (its own and its inputs')."""
        named = self.screened() + tuple(c for c in self.controls if c not in self.screened())
        screen = {
            "screened": list(self.screened()),
            "sizes": {t: self.split_sizes(t) for t in named},
            "seed": self.seed,
            "version": DATA_VERSION,
            "small": self.small,
            "big": self.big,
            "task_files": {k.name: k.digest for k in self.file_kinds.values()},
            "dtype": self.dtype,
        }
        backends = self.backends()
        if set(backends.values()) != {"transformers"}:
            screen["backends"] = backends
        if self.tasks is None:
            screen["selection"] = self.selection.to_dict()
            screen["controls"] = list(self.controls)
        else:
            screen["tasks"] = list(self.tasks)
        if stage == "screen":
            return screen
        data = {"screen": screen}
        if stage == "data":
            return data
        training = {
            "epochs": self.epochs,
            "max_epochs": self.max_epochs,
            "min_compliance": self.min_compliance,
            "learning_rate": self.learning_rate,
            "lora_r": self.lora_r,
            "batch_size": self.train_batch_size,
            "seed": self.seed,
        }
        if stage == "expert":
            return {"data": data, "model": self.small, **training}
        expert = {"model": self.small, **training}
        if stage == "tuned":  # the expert's final epochs: one recipe for both
            return {"data": data, "model": self.big, "expert": expert}
        if stage == "residual":  # the expert's recipe, with the residual loss on the base
            return {"data": data, "model": self.small, "base": self.big, "expert": expert}
        evaluation = {
            "data": data,
            "small": self.small,
            "big": self.big,
            "training": training,
            "alphas": list(self.alphas),
            "rules": {r: RULES[r] for r in self.rules},
            "dtype": self.dtype,
        }
        if "nudging" in self.rules:
            evaluation["gammas"] = list(GAMMAS)
        if stage in ("validation", "test", "analysis", "report"):
            if stage == "analysis":
                evaluation["analysis_examples"] = self.analysis_examples
            return evaluation
        raise ConfigError(f"unknown stage {stage!r}")

    def backends(self) -> dict[str, str]:
        """The backend each model is evaluated on (``auto`` resolved on this machine)."""
        return {
            role: backend_of(ModelSpec(path, backend=self.backend))
            for role, path in (("small", self.small), ("big", self.big))
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ReproduceConfig:
        """The config :meth:`to_dict` wrote (``reproduce.json``'s ``config``)."""
        values = dict(values)
        if isinstance(values.get("selection"), dict):
            values["selection"] = SelectionRule(**values["selection"])
        for name in ("tasks", "candidates", "controls", "task_files", "alphas", "rules"):
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        return cls(**values)

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


_TINY_SIZES = {"shots": 2, "screen": 4, "train": 8, "validation": 4, "test": 6}
_GPU_SIZES = {"shots": 3, "screen": 100, "train": 2000, "validation": 200, "test": 1000}

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {},
    "tiny": {
        "candidates": ("arith", "pyexpr", "gcd"),
        "controls": ("sort_words",),
        # tiny random models answer nothing: a rule every candidate passes, so the chosen
        # tasks' path runs end to end (the real rule is tested on its own)
        "selection": SelectionRule(
            max_base_strict=1.0,
            min_expected_tuned=0.0,
            min_lenient_share=0.0,
            min_lead_over_small=-1.0,
            max_answer_tokens=10_000,
            choose=2,
        ),
        "sizes": {t: _TINY_SIZES for t in ("arith", "pyexpr", "gcd", "sort_words", "truthfulqa")},
        "alphas": (0.5, 1.0),
        "rules": ("proxy", "product", "nudging", "union", "w2s", "residual"),
        "epochs": 1.0,
        "min_compliance": 0.0,
        "max_epochs": 1.0,
        "train_batch_size": 4,
        "eval_batch_size": 4,
        "analysis_examples": 2,
    },
    "gpu": {
        "small": "meta-llama/Llama-2-7b-hf",
        "big": "meta-llama/Llama-2-13b-hf",
        "sizes": {
            **{t: _GPU_SIZES for t in (*CANDIDATES, *CONTROLS) if t != "arith"},
            "arith": {**_GPU_SIZES, "train": 300, "validation": 100, "test": 200},
        },
        "alphas": (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0),
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
    tasks = values.get("tasks")
    named = (
        set(tasks)
        if tasks is not None
        else {
            *values.get("candidates", CANDIDATES),
            *values.get("controls", CONTROLS),
        }
    )
    # a preset sizes every task; keep the sizes of the tasks named
    values["sizes"] = {t: s for t, s in values.get("sizes", {}).items() if t in named}
    return ReproduceConfig(out=out, **values)
