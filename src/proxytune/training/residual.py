"""Residual expert training: the small LoRA learns only what the big base lacks.

The expert is trained on the distribution proxy-tuning decodes from (alpha 1), with the base
M and the anti-expert A frozen; A is the small model with the adapter disabled::

    loss = CE(softmax(log p_M + log p_E - log p_A), answer token)   (answer tokens only)

M's log-probs are computed once per example before training (then M is freed) and stored as
each answer position's top ``k`` log-probs (``logit - logsumexp``); the mass outside the top
``k`` is spread evenly over the other ids. With ``k = V`` the base is kept exactly.

M, A and E read the same token ids: the small model's training format (``template``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..arithmetic import combine_proxy, log_probs
from .encode import IGNORE, Encoded
from .sft import SFTCollator, SFTDataset
from .trainer import LossOnlyTrainer

# -- the formulas ---------------------------------------------------------------------------


def top_k_logprobs(lp: torch.Tensor, k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, V)`` log-probs -> each row's ``k`` best ``(ids, log-probs)``, ``(N, k)`` each
    (``k = None`` or ``>= V``: every id)."""
    k = lp.shape[-1] if k is None else min(k, lp.shape[-1])
    top = torch.topk(lp, k, dim=-1)
    return top.indices, top.values


def dense_logprobs(ids: torch.Tensor, lps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Stored top-k ``(N, k)`` ids and log-probs -> ``(N, V)`` log-probs: the known ids keep
    theirs, the rest share the missing mass ``1 - sum exp(lps)`` evenly (``-inf`` if none).

    >>> d = dense_logprobs(torch.tensor([[1]]), torch.log(torch.tensor([[0.7]])), 4)
    >>> d.exp()
    tensor([[0.1000, 0.7000, 0.1000, 0.1000]])
    """
    k = ids.shape[-1]
    if k >= vocab:
        return torch.empty(ids.shape[0], vocab, device=lps.device).scatter_(-1, ids, lps)
    known = torch.logsumexp(lps, dim=-1, keepdim=True).clamp(max=0.0)  # (N, 1) log mass in top-k
    rest = torch.log(-torch.expm1(known)) - math.log(vocab - k)  # (N, 1) log p of each other id
    return rest.expand(-1, vocab).clone().scatter_(-1, ids, lps)


def residual_loss(
    base_lp: torch.Tensor,
    expert_logits: torch.Tensor,
    anti_logits: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """Mean cross-entropy of ``targets`` ``(N,)`` under ``softmax(log p_M + log p_E - log p_A)``.

    ``base_lp`` ``(N, V)`` log-probs; ``expert_logits``, ``anti_logits`` ``(N, W)`` logits with
    ``W >= V`` (head padding rows are dropped). With ``base_lp = log p_A`` it is the expert's
    own cross-entropy, plain SFT.
    """
    vocab = base_lp.shape[-1]
    expert_lp = log_probs(expert_logits, vocab)
    anti_lp = log_probs(anti_logits, vocab)
    scores = combine_proxy(base_lp, [(expert_lp, anti_lp)], [1.0])  # (N, V)
    return F.cross_entropy(scores, targets)


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T)`` labels -> the ``(B, T - 1)`` bool mask of positions that predict an answer
    token and those tokens ``(N,)``, in row-major order (how the stored base rows line up)."""
    target = labels[:, 1:]
    mask = target != IGNORE
    return mask, target[mask]


# -- data and the trainer --------------------------------------------------------------------


class ResidualDataset(SFTDataset):
    """SFT examples and, once computed, the base's top-k at each one's answer positions."""

    def __init__(self, items: Sequence[Encoded]) -> None:
        super().__init__(items)
        self.base: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = super().__getitem__(i)
        if self.base is not None:
            row["base_ids"], row["base_lps"] = self.base[i]
        return row


class ResidualCollator(SFTCollator):
    """SFT batches plus ``base_ids`` / ``base_lps`` ``(N, k)``: every answer position's stored
    top-k, rows in order (as :func:`answer_positions` selects them)."""

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(features)
        if "base_ids" in features[0]:
            batch["base_ids"] = torch.cat([f["base_ids"] for f in features])
            batch["base_lps"] = torch.cat([f["base_lps"] for f in features])
        return batch


@torch.no_grad()
def base_top_k(
    model: Any,
    data: ResidualDataset,
    collator: ResidualCollator,
    batch_size: int,
    device: torch.device,
    vocab: int,
    k: int | None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The frozen base's top-``k`` log-probs at every answer position of every example."""
    was_training = model.training
    model.eval()
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for start in range(0, len(data), batch_size):
        features = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        batch = {k_: v.to(device) for k_, v in collator(features).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mask, _ = answer_positions(batch["labels"])
        for r in range(logits.shape[0]):
            lp = log_probs(logits[r, :-1][mask[r]], vocab)  # (n_r, V)
            ids, lps = top_k_logprobs(lp, k)
            out.append((ids.cpu(), lps.cpu()))
    model.train(was_training)
    return out


class ResidualTrainer(LossOnlyTrainer):
    """``Trainer`` with the residual loss; the anti-expert is the model with its adapter off."""

    def __init__(self, *args: Any, vocab: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.vocab = vocab

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        loss = residual_batch_loss(model, inputs, self.vocab)
        return (loss, None) if return_outputs else loss


def residual_batch_loss(model: Any, batch: dict[str, torch.Tensor], vocab: int) -> torch.Tensor:
    """The residual loss of a collated batch; ``model`` is a PEFT model (A: adapter off)."""
    ids, attention = batch["input_ids"], batch["attention_mask"]
    mask, targets = answer_positions(batch["labels"])
    expert = model(input_ids=ids, attention_mask=attention).logits[:, :-1][mask]  # (N, W)
    with torch.no_grad(), model.disable_adapter():
        anti = model(input_ids=ids, attention_mask=attention).logits[:, :-1][mask]
    base_lp = dense_logprobs(batch["base_ids"], batch["base_lps"].float(), vocab)
    return residual_loss(base_lp, expert.float(), anti.float(), targets)
