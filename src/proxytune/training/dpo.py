"""Direct preference optimisation (Rafailov et al., 2023) on ``transformers.Trainer``.

For a prompt x, a preferred completion y_w and a rejected one y_l::

    loss = -log sigmoid(beta*((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)))

``log pi(y|x)`` is the summed log-probability of the completion's tokens. The reference is the
model before training; its log-probs are computed once before training (trl's
``precompute_ref_log_probs``), so no second copy of the model is held. For LoRA the reference
is the base model, which is what a fresh adapter computes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .encode import IGNORE, EncodedPair
from .sft import pad_right
from .trainer import LossOnlyTrainer


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example loss and implicit rewards, all ``(B,)``: ``(loss, r_chosen, r_rejected)``.

    >>> loss, _, _ = dpo_loss(*torch.zeros(4, 1), beta=0.1)
    >>> round(float(loss), 4)  # log 2 when the policy equals the reference
    0.6931
    """
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen - rejected), chosen, rejected


def completion_logps(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probs of the labelled tokens of each row, ``(N,)``."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    target = batch["labels"][:, 1:]
    mask = target != IGNORE
    rows = []
    for i in range(logits.shape[0]):  # row by row: log_softmax over (T, V), not (N, T, V)
        lp = torch.log_softmax(logits[i, :-1].float(), dim=-1)
        picked = lp.gather(-1, target[i].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        rows.append((picked * mask[i]).sum())
    return torch.stack(rows)


class DPODataset(torch.utils.data.Dataset):
    """Encoded pairs and, once computed, their reference log-probs."""

    def __init__(self, items: Sequence[EncodedPair]) -> None:
        self.items = list(items)
        self.reference: list[tuple[float, float]] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = self.items[i]
        row: dict[str, Any] = {"prompt": e.prompt_ids, "chosen": e.chosen_ids}
        row["rejected"] = e.rejected_ids
        if self.reference is not None:
            row["ref_chosen"], row["ref_rejected"] = self.reference[i]
        return row


class DPOCollator:
    """Pairs -> one batch of ``2B`` rows: ``prompt + chosen`` then ``prompt + rejected``."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs, labels = [], []
        for side in ("chosen", "rejected"):
            for f in features:
                seqs.append(f["prompt"] + f[side])
                labels.append([IGNORE] * len(f["prompt"]) + f[side])
        batch = {
            "input_ids": pad_right(seqs, self.pad_id),
            "attention_mask": pad_right([[1] * len(s) for s in seqs], 0),
            "labels": pad_right(labels, IGNORE),
        }
        if "ref_chosen" in features[0]:
            batch["ref_chosen"] = torch.tensor([f["ref_chosen"] for f in features])
            batch["ref_rejected"] = torch.tensor([f["ref_rejected"] for f in features])
        return batch


@torch.no_grad()
def reference_logps(
    model: Any, data: DPODataset, collator: DPOCollator, batch_size: int, device: torch.device
) -> list[tuple[float, float]]:
    """The untrained model's summed log-probs of every pair's chosen and rejected completion."""
    was_training = model.training
    model.eval()
    out: list[tuple[float, float]] = []
    for start in range(0, len(data), batch_size):
        features = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        batch = {k: v.to(device) for k, v in collator(features).items()}
        lps = completion_logps(model, batch).tolist()
        n = len(features)
        out += list(zip(lps[:n], lps[n:], strict=True))
    model.train(was_training)
    return out


class DPOTrainer(LossOnlyTrainer):
    """``Trainer`` with the DPO loss; logs the implicit rewards like trl does."""

    def __init__(self, *args: Any, beta: float = 0.1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.beta = beta
        self._stats: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        n = inputs["ref_chosen"].shape[0]
        lps = completion_logps(model, inputs)
        loss, chosen, rejected = dpo_loss(
            lps[:n], lps[n:], inputs["ref_chosen"], inputs["ref_rejected"], self.beta
        )
        stats = self._stats["train" if model.training else "eval"]
        chosen, rejected = chosen.detach(), rejected.detach()
        stats["rewards/chosen"].append(float(chosen.mean()))
        stats["rewards/rejected"].append(float(rejected.mean()))
        stats["rewards/margins"].append(float((chosen - rejected).mean()))
        stats["rewards/accuracies"].append(float((chosen > rejected).float().mean()))
        return (loss.mean(), None) if return_outputs else loss.mean()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for key, values in self._stats[mode].items():
            if values:
                logs[prefix + key] = sum(values) / len(values)
        self._stats[mode].clear()
        super().log(logs, start_time)
