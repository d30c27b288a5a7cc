"""Which backend loads a :class:`~proxytune.specs.ModelSpec`: one decision, one place."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..specs import ModelSpec


def backend_of(spec: ModelSpec) -> str:
    """``transformers`` or ``llamacpp``: ``auto`` runs a GGUF (a ``.gguf`` file, a directory's
    ``model.gguf``, or an embedded model's kept GGUF) on llama.cpp where ``llama-cpp-python``
    is installed, with a LoRA adapter as a llama.cpp adapter, unless load-time quantization or
    an adapter llama.cpp cannot apply asks for transformers."""
    if spec.backend != "auto":
        return spec.backend
    # lazy: a backend's module loads only for a model on it (and each leads back here)
    from .llamacpp import available, gguf_of

    runs_gguf = spec.quantize is None and gguf_of(spec.path) is not None and available()
    if runs_gguf and (spec.adapter is None or _llamacpp_applies(spec.adapter)):
        return "llamacpp"
    return "transformers"


def _llamacpp_applies(adapter: str) -> bool:
    # lazy: a backend's module loads only for a model on it (and each leads back here)
    from .gguf_lora import lora_config

    try:
        lora_config(adapter)
    except ConfigError:
        return False
    return True


def load_model(spec: ModelSpec) -> Any:
    """Load ``spec`` on its backend (:func:`backend_of`)."""
    backend = backend_of(spec)
    if backend == "llamacpp":
        # lazy: a backend's module loads only for a model on it (and each leads back here)
        from .llamacpp import load_llamacpp

        return load_llamacpp(spec)
    set_ = [k for k in ("threads", "gpu_layers", "kv_cells") if getattr(spec, k) is not None]
    if set_:
        which = set_[0]
        raise ConfigError(f"{which} applies to the llama.cpp backend; set backend: llamacpp")
    # lazy: a backend's module loads only for a model on it (and .hf leads back here)
    from .hf import load_hf

    return load_hf(spec)
