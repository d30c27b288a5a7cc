"""Making the expert: supervised fine-tuning and DPO of the small model, full or LoRA.

>>> from proxytune.training import TrainConfig, train                       # doctest: +SKIP
>>> config = TrainConfig(model="small", data="sft.jsonl", out="expert", lora=True)
>>> result = train(config)                                                    # doctest: +SKIP
>>> tuner = ProxyTuner.from_specs(big, [(result.expert_spec(), small, 1.0)])  # doctest: +SKIP

The heavy libraries load when a run starts, not on import.
"""

from __future__ import annotations

from typing import Any

from .config import TrainConfig
from .data import DataError, PreferenceExample, SFTExample, load_preferences, load_sft


def train(config: TrainConfig, callbacks: Any = ()) -> Any:
    """Run training (see :func:`proxytune.training.run.train`); returns a ``TrainResult``."""
    # lazy: torch and transformers load when a run starts, not on import
    from .run import train as run

    return run(config, callbacks)


__all__ = [
    "DataError",
    "PreferenceExample",
    "SFTExample",
    "TrainConfig",
    "load_preferences",
    "load_sft",
    "train",
]
