"""Supervised fine-tuning: batches of completion-masked sequences for ``transformers.Trainer``.

The model's own causal-LM loss does the rest: it shifts ``labels`` by one and skips ``-100``,
so the loss is the mean negative log-likelihood of the completion tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .encode import IGNORE, Encoded


class SFTDataset(torch.utils.data.Dataset):
    """Encoded examples as the dicts a collator receives."""

    def __init__(self, items: Sequence[Encoded]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = self.items[i]
        return {"input_ids": e.input_ids, "labels": e.labels}


def pad_right(rows: Sequence[Sequence[int]], fill: int) -> torch.Tensor:
    """Ragged rows -> ``(B, T)``, padded on the right with ``fill``."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out


class SFTCollator:
    """``[{"input_ids", "labels"}]`` -> ``input_ids``, ``attention_mask``, ``labels`` ``(B, T)``."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [f["input_ids"] for f in features]
        return {
            "input_ids": pad_right(ids, self.pad_id),
            "attention_mask": pad_right([[1] * len(r) for r in ids], 0),
            "labels": pad_right([f["labels"] for f in features], IGNORE),
        }
