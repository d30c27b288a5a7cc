"""Which backend loads a :class:`~proxytune.specs.ModelSpec`: one decision, one place."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..specs import ModelSpec


def backend_of(spec: ModelSpec) -> str:
    """``transformers`` or ``llamacpp``: ``auto`` runs a GGUF (a ``.gguf`` file, or an embedded
    model's kept GGUF) on llama.cpp where ``llama-cpp-python`` is installed, unless an adapter
    or load-time quantization asks for transformers."""
    if spec.backend != "auto":
        return spec.backend
    from .llamacpp import available, gguf_of

    plain = spec.adapter is None and spec.quantize is None
    if plain and gguf_of(spec.path) is not None and available():
        return "llamacpp"
    return "transformers"


def load_model(spec: ModelSpec) -> Any:
    """Load ``spec`` on its backend (:func:`backend_of`)."""
    backend = backend_of(spec)
    if backend == "llamacpp":
        from .llamacpp import load_llamacpp

        return load_llamacpp(spec)
    if spec.threads is not None or spec.kv_cells is not None:
        which = "threads" if spec.threads is not None else "kv_cells"
        raise ConfigError(f"{which} applies to the llama.cpp backend; set backend: llamacpp")
    from .hf import load_hf

    return load_hf(spec)
