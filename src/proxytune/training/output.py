"""The output directory: overwrite protection, resume checks and the run's metadata file.

Next to what ``save_pretrained`` writes, a run keeps ``proxytune_train.json``: the base model
(so an adapter directory alone names its base: ``--expert OUT``), the prompt format the expert
was trained on, the settings, the final metrics, and whether the run completed. It is written
when the run starts, so a crashed run is still recognised as ours (for ``--resume`` or
``--overwrite``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..paths import TRAIN_META
from .config import TrainConfig

FORMAT = 1
SAME_ON_RESUME = ("model", "method", "objective", "base", "lora", "template", "system")


def read_meta(out: str | Path) -> dict[str, Any] | None:
    """The metadata of a training output, or ``None`` if ``out`` is not one."""
    path = Path(out).expanduser() / TRAIN_META
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def prepare_output(config: TrainConfig) -> Path:
    """Check (and with ``overwrite``, clear) the output directory; return it.

    - a new or empty directory is used as is;
    - ``resume``: it must be an earlier run of the same model and method;
    - otherwise a non-empty directory is refused, and with ``overwrite`` it is deleted only if
      an earlier ``proxytune train`` run wrote it (anything else is left alone).
    """
    out = Path(config.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {str(out)!r} is a file; give a directory")
    model = Path(config.model).expanduser()
    if model.exists() and out.exists() and model.resolve() == out.resolve():
        raise ConfigError("the output directory is the model's own directory; choose another")
    meta = read_meta(out)
    if config.resume:
        if meta is None:
            raise ConfigError(
                f"nothing to resume in {str(out)!r}: it holds no earlier `proxytune train` run"
            )
        _check_same_run(meta, config)
        return out
    if out.is_dir() and any(out.iterdir()):
        if not config.overwrite:
            raise ConfigError(
                f"output directory {str(out)!r} is not empty; pass --overwrite to replace it, "
                "or --resume to continue the run it holds"
            )
        if meta is None:
            raise ConfigError(
                f"output directory {str(out)!r} is not empty and was not written by "
                "`proxytune train`; nothing there is deleted, even with --overwrite: choose a "
                "new or empty directory"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _check_same_run(meta: dict[str, Any], config: TrainConfig) -> None:
    before = {**meta.get("config", {}), "model": meta.get("base_model")}
    now = {k: getattr(config, k) for k in SAME_ON_RESUME}
    now["model"] = base_model_name(config.model)
    for key in SAME_ON_RESUME:
        if key in before and before[key] != now[key]:
            raise ConfigError(
                f"cannot resume: the run in {config.out!r} used {key}={before[key]!r}, this one "
                f"{key}={now[key]!r}"
            )


def base_model_name(model: str) -> str:
    """A local model path made absolute (the adapter stays usable from anywhere); hub ids and
    ``embedded:NAME`` as given."""
    local = Path(model).expanduser()
    return str(local.resolve()) if local.exists() else model


def write_meta(out: Path, config: TrainConfig, template: str, **extra: Any) -> None:
    """Write (or update) the run's metadata file."""
    import torch
    import transformers

    meta = read_meta(out) or {}
    meta.update(
        {
            "format": FORMAT,
            "kind": "lora-adapter" if config.lora else "full-model",
            "method": config.method,
            "base_model": base_model_name(config.model),
            "expert_prompt": template,
            "system": config.system,
            "config": {k: v for k, v in asdict(config).items() if k not in ("resume", "overwrite")},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **extra,
        }
    )
    # written whole or not at all: a kill mid-write never leaves a torn (or "running") file
    # beside a complete adapter
    tmp = out / f"{TRAIN_META}.tmp"
    tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, out / TRAIN_META)
