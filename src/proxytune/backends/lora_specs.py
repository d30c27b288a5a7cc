"""Which specs are LoRA adapters, of which base, and which pairs can run in one pass.

No heavy imports here: these look at directories and ``adapter_config.json`` only.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from ..errors import ModelLoadError
from ..paths import TRAIN_META
from ..specs import ModelSpec
from .load import backend_of


@contextlib.contextmanager
def peft_quietly() -> Iterator[None]:
    """Around building a peft model: peft (0.21) reads transformers' deprecated
    ``is_gradient_checkpointing`` there, a FutureWarning no user of ours can act on (only
    that warning is hidden)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", "`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


def adapter_base(adapter_dir: str | Path) -> str | None:
    """The base model an adapter directory was trained on, or ``None`` if it is not one.

    ``proxytune train``'s metadata wins over peft's ``base_model_name_or_path`` (it keeps
    ``embedded:NAME`` instead of a cache path).
    """
    root = Path(adapter_dir).expanduser()
    config = root / "adapter_config.json"
    if not config.is_file() or (root / "config.json").is_file():
        return None
    sources = ((TRAIN_META, "base_model"), ("adapter_config.json", "base_model_name_or_path"))
    for name, key in sources:
        try:
            value = json.loads((root / name).read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, str) and value:
            return value
    raise ModelLoadError(
        f"{str(adapter_dir)!r} is a LoRA adapter that does not name its base model; pass the "
        "base as the model path and this directory as its adapter"
    )


def refuse_unfinished(folder: Path) -> None:
    """Refuse a ``proxytune train`` output whose run did not complete: killed (or still
    running) before it wrote ``status: complete``, its weights may be a checkpoint's or none."""
    try:
        meta = json.loads((folder / TRAIN_META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # not a training output (or not ours): the loader judges it
    status = meta.get("status") if isinstance(meta, dict) else None
    if status in (None, "complete"):
        return
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    flags = " --lora" if config.get("lora") else ""
    flags += " --dpo" if config.get("method") == "dpo" else ""
    raise ModelLoadError(
        f"{str(folder)!r} holds an unfinished `proxytune train` run (status {status!r}: it was "
        "stopped or is still running); let it finish, or resume it with `proxytune train "
        f"--model {meta.get('base_model', 'BASE')} --data {config.get('data', 'DATA')}{flags} "
        f"--out {folder} --resume` and the other options it started with"
    )


def resolve_adapter_dir(spec: ModelSpec | None) -> ModelSpec | None:
    """``ModelSpec(path=ADAPTER_DIR)`` -> ``ModelSpec(path=BASE, adapter=ADAPTER_DIR)``.

    Lets a trained adapter directory stand alone where a model is expected (``--expert OUT``).
    Anything else is returned unchanged; an unfinished training run is refused.
    """
    if spec is None or spec.adapter is not None:
        return spec
    local = Path(spec.path).expanduser()
    if not local.is_dir():
        return spec
    refuse_unfinished(local)
    base = adapter_base(local)
    return spec if base is None else replace(spec, path=base, adapter=str(local))


def _same_model(a: str, b: str) -> bool:
    la, lb = Path(a).expanduser(), Path(b).expanduser()
    if la.exists() and lb.exists():
        return la.resolve() == lb.resolve()
    return a == b


def pairable(expert: ModelSpec | None, anti: ModelSpec | None) -> bool:
    """The expert is a LoRA adapter on the anti-expert's model, loaded the same way on
    transformers (on llama.cpp the two share the weights through the backend instead)."""
    if expert is None or anti is None or expert.adapter is None or anti.adapter is not None:
        return False

    same_load = expert.load_key[2:] == anti.load_key[2:]  # device, dtype, revision, ...
    return (
        same_load
        and _same_model(expert.path, anti.path)
        and _is_lora(expert.adapter)
        and backend_of(expert) == "transformers"
    )


def _is_lora(adapter: str) -> bool:
    try:
        config = json.loads((Path(adapter).expanduser() / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return False  # let the ordinary loader report it
    return str(config.get("peft_type", "")).upper() == "LORA"
