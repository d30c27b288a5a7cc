"""``transformers.Trainer`` for losses that are not the model's own (DPO, residual)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer


class LossOnlyTrainer(Trainer):
    """A ``Trainer`` whose ``compute_loss`` is its own: evaluation reports only that loss."""

    loss_is_scaled_for_ga = False  # the loss is a per-batch mean: Trainer divides it for GA

    def prediction_step(
        self,
        model: Any,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, None, None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
