"""What the user names: a model and how to load it, and its role's prompt format."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError
from .prompts import PromptFormat

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE = (None, "int8", "bnb8", "bnb4")
BACKENDS = ("auto", "transformers", "llamacpp")


def available_cores() -> int:
    """The cores this process may run on (its affinity mask), else every core the OS reports."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def parse_threads(value: object) -> int | None:
    """A model's ``threads`` from a spec, a recipe or the command line: ``None`` for ``auto``
    (or ``None``), else an integer >= 1 (digits from the command line).

    >>> parse_threads("auto"), parse_threads(None), parse_threads(3), parse_threads("2")
    (None, None, 3, 2)
    """
    if value is None or value == "auto":
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"threads must be an integer >= 1 or 'auto', got {value!r}")
    return value


@dataclass(frozen=True)
class ModelSpec:
    """A model to load: a hub id, a local directory, a ``.gguf`` file or ``embedded:NAME``."""

    path: str
    prompt: PromptFormat = field(default_factory=PromptFormat)
    adapter: str | None = None
    """A PEFT (LoRA) adapter directory applied on top of ``path``."""
    device: str = "auto"
    """``auto`` (cuda, then mps, then cpu), ``cpu``, ``cuda``, ``cuda:1``, ``mps``."""
    dtype: str = "auto"
    """``auto`` (bfloat16 on CUDA, float32 elsewhere), ``float32``, ``bfloat16``, ``float16``."""
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    """Allow loading pickle (``.bin``) weights; off by default because pickle can run code."""
    quantize: str | None = None
    """``int8``: dynamic int8 quantization of the linear layers on the CPU (not the output
    head); ``bnb8`` / ``bnb4``: bitsandbytes 8-bit or 4-bit NF4 weights (CUDA, or the CPU with
    bitsandbytes >= 0.45); see :mod:`proxytune.backends.quantize`."""
    backend: str = "auto"
    """``transformers``, ``llamacpp`` (a ``.gguf`` file through llama.cpp), or ``auto``:
    llama.cpp for a ``.gguf`` file where ``llama-cpp-python`` is installed, else transformers."""
    threads: int | None = None
    """llama.cpp: CPU threads; ``None`` or ``"auto"`` (the default): the cores this process may
    run on, split between the contexts that decode at once under ``overlap``
    (:func:`~proxytune.engine.overlap.split_threads`). A count given always wins."""
    gpu_layers: int | None = None
    """llama.cpp: layers offloaded to the GPU (default: all of them where llama.cpp was built
    with CUDA, else 0; a positive value on a CPU-only build is refused)."""
    kv_cells: int | None = None
    """llama.cpp: KV cache cells shared by every row of every role on this model (default
    4096); each row holds its prompt and its tokens so far."""
    max_memory: Mapping[str, str] | None = None
    """transformers: split the model's layers over devices with accelerate's device map, at
    most this much on each (``{"0": "20GiB", "1": "20GiB", "cpu": "60GiB"}``; ``"disk"``
    offloads the rest to a folder). A base too big for one GPU then runs across several."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.strip():
            raise ConfigError(f"a model path must be a non-empty string, got {self.path!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.quantize not in QUANTIZE:
            raise ConfigError(f"quantize must be one of {QUANTIZE}, got {self.quantize!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.max_memory is not None:
            if not isinstance(self.max_memory, Mapping) or not self.max_memory:
                raise ConfigError(
                    f"max_memory must map devices to sizes ({{'0': '20GiB', 'cpu': '60GiB'}}), "
                    f"got {self.max_memory!r}"
                )
            object.__setattr__(
                self, "max_memory", {str(k): str(v) for k, v in self.max_memory.items()}
            )
        if self.kv_cells is not None and (
            isinstance(self.kv_cells, bool) or not isinstance(self.kv_cells, int)
            or self.kv_cells < 16
        ):  # fmt: skip
            raise ConfigError(f"kv_cells must be an integer >= 16, got {self.kv_cells!r}")
        object.__setattr__(self, "threads", parse_threads(self.threads))
        if self.gpu_layers is not None and (
            isinstance(self.gpu_layers, bool) or not isinstance(self.gpu_layers, int)
            or self.gpu_layers < 0
        ):  # fmt: skip
            raise ConfigError(f"gpu_layers must be an integer >= 0, got {self.gpu_layers!r}")
        object.__setattr__(self, "prompt", PromptFormat.parse(self.prompt))

    @property
    def load_key(self) -> tuple[Any, ...]:
        """Two specs with the same key can share one set of loaded weights."""
        return (
            self.path,
            self.adapter,
            self.device,
            self.dtype,
            self.revision,
            self.trust_remote_code,
            self.allow_pickle,
            self.quantize,
            self.backend,
            self.threads,
            self.gpu_layers,
            self.kv_cells,
            None if self.max_memory is None else tuple(sorted(self.max_memory.items())),
        )

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any] | ModelSpec, **defaults: Any) -> ModelSpec:
        """From a path string or a recipe mapping (``model``/``path`` key plus options)."""
        if isinstance(spec, ModelSpec):
            return spec
        if isinstance(spec, str):
            return cls(path=spec, **defaults)
        if not isinstance(spec, Mapping):
            raise ConfigError(
                "a model must be a path or hub id (a string) or a mapping with a 'model' key, "
                f"got {spec!r} ({type(spec).__name__})"
            )
        data = {**defaults, **dict(spec)}
        if "model" in data:
            data["path"] = data.pop("model")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model option(s) {unknown}; known: {sorted(known)}")
        if "path" not in data:
            raise ConfigError("a model entry needs a 'model' (or 'path') key")
        return cls(**data)
