"""``proxytune reproduce``: the paper's experiment in miniature (train the expert and the
directly tuned reference, evaluate base / expert / proxy / tuned, gap closed with intervals,
steering rules compared). See ``docs/reproduction.md``."""

from .config import PRESETS, ReproduceConfig, preset
from .pipeline import STAGES, Experiment, reproduce
from .tasks import TASKS

__all__ = ["PRESETS", "STAGES", "TASKS", "Experiment", "ReproduceConfig", "preset", "reproduce"]
