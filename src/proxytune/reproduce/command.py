"""``proxytune reproduce``'s option parsing: text options to a :class:`ReproduceConfig`."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .config import preset

SIZED = ("train", "validation", "test")
"""The splits ``--split`` sizes (``shots`` and ``screen`` keep the task's sizes)."""


def parse_sizes(items: list[str], tasks: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """``--split TASK=TRAIN,VALIDATION,TEST`` (repeatable) to per-task split sizes."""
    out: dict[str, dict[str, int]] = {}
    for item in items:
        name, sep, sizes = item.partition("=")
        parts = sizes.split(",")
        if sep and name.strip() not in tasks:
            raise ConfigError(f"--split {item!r}: {name.strip()!r} is not among the tasks {tasks}")
        if not sep or len(parts) != 3:
            raise ConfigError(
                f"--split {item!r}: write TASK=TRAIN,VALIDATION,TEST, e.g. arith=100,24,100"
            )
        try:
            out[name.strip()] = dict(zip(SIZED, (int(p) for p in parts), strict=True))
        except ValueError:
            raise ConfigError(f"--split {item!r}: sizes must be whole numbers") from None
    return out


def parse_names(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(x.strip() for x in text.split(",") if x.strip())


def build_config(preset_name: str, out: str, split: list[str], **options: Any) -> Any:
    """The preset with the options given on the command line (``None``: the preset's);
    ``alphas`` arrive parsed (the command line's shared ``--alpha`` parser)."""
    tasks = parse_names(options.pop("tasks", None))
    options["rules"] = parse_names(options.pop("rules", None))
    options["candidates"] = parse_names(options.pop("candidates", None))
    if tasks is not None:
        options["tasks"] = tasks
    config = preset(preset_name, out, **options)
    if split:
        named = config.screened() + tuple(config.controls)
        sizes = {
            t: {**config.sizes.get(t, {}), **given}
            for t, given in parse_sizes(split, named).items()
        }
        sizes = {**config.sizes, **sizes}
        config = config.with_overrides(sizes=sizes)
    return config
