"""Reward-guided decoding (ARGS, Khanov et al. 2024): re-score the top-k with a reward model.

At each step the base's ``k`` most likely tokens are the candidates; each candidate ``t`` of a
row is scored by the inner rule (``proxy`` by default; ``base`` is the paper's setup) plus
``w`` times the reward of the text so far followed by ``t``::

    s(t) = inner(t) + w * r(x, y + t)   for t in topk_k(p_M),   -inf otherwise

The reward model is a ``transformers`` sequence-classification model (a reward head), run on
``B * k`` texts per step without a cache: by far the most expensive rule. ``w = 0`` skips it
entirely and returns the inner rule's scores bit for bit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..backends.reward import load_reward_model
from ..errors import ConfigError, NumericalError
from ..prompts import Prompt
from .base import register
from .context import Request, StepContext
from .filters import _Wrapper
from .settings import choice, integer, number, optional, setting, text

NEG_INF = float("-inf")

RewardScorer = Callable[[Sequence[Prompt], Sequence[str]], torch.Tensor]
"""``(prompts, responses) -> (N,)`` rewards, one per ``(prompt, response)`` pair."""


def args_scores(
    scores: torch.Tensor, candidates: torch.Tensor, rewards: torch.Tensor, w: float
) -> torch.Tensor:
    """ARGS: ``scores + w * rewards`` on the ``(B, k)`` candidate ids, ``-inf`` elsewhere.

    A candidate the inner rule rules out stays out, whatever its reward.

    >>> args_scores(torch.zeros(1, 3), torch.tensor([[2, 0]]), torch.tensor([[1.0, -1.0]]), 0.5)
    tensor([[-0.5000,    -inf,  0.5000]])
    """
    picked = scores.gather(-1, candidates)  # (B, k)
    rescored = torch.where(torch.isneginf(picked), picked, picked + w * rewards.to(picked))
    return torch.full_like(scores, NEG_INF).scatter(-1, candidates, rescored)


def _model(value: Any, where: str) -> Any:
    if callable(value):
        return value
    return text(value, where)


@dataclass(frozen=True)
class _ArgsState:
    inner: Any
    scorer: RewardScorer | None
    tokenizer: Any
    prompts: tuple[Prompt, ...]


@register
@dataclass(frozen=True, kw_only=True)
class Args(_Wrapper):
    name = "args"
    summary = (
        "Reward-guided decoding (ARGS): the base's top-k candidates are re-scored as "
        "score + w x reward(text so far + candidate) by a reward model."
    )
    formula = "inner(t) + w r(x, y + t) for t in topk_k(p_M), else -inf"
    cost = "the inner rule's plus B*k reward-model forwards per token over the whole text"

    model: str | RewardScorer | None = setting(  # noqa: RUF009 (a dataclasses.field)
        None,
        "required unless w = 0: the reward model, a directory or hub id of a sequence-"
        "classification model (from Python also a function (prompts, responses) -> rewards)",
        optional(_model),
    )
    w: float = setting(1.0, "reward weight; 0 is exactly the inner rule", number())
    k: int = setting(10, "candidates per step: the base's k best tokens", integer(1))
    format: str = setting(
        "text",
        "text: prompt + response as one text; chat: the reward model's chat template",
        choice("text", "chat"),
    )
    label: int | None = setting(
        None, "which output of a multi-label head is the reward", optional(integer(0))
    )
    batch_size: int = setting(16, "texts per reward-model forward", integer(1))
    device: str = setting("auto", "device of the reward model", text)
    dtype: str = setting(
        "auto", "dtype of the reward model", choice("auto", "float32", "bfloat16", "float16")
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model is None and self.w != 0:
            raise ConfigError("args.model is required: the reward model's directory or hub id")

    def prepare(self, request: Request) -> _ArgsState:
        inner = self.inner.bind(request)
        if self.w == 0:
            return _ArgsState(inner, None, request.tokenizer, request.prompts)
        if request.tokenizer is None:
            raise ConfigError(
                "rule 'args' needs the base tokenizer to turn candidates into text", param="rule"
            )
        if callable(self.model):
            return _ArgsState(inner, self.model, request.tokenizer, request.prompts)
        hf = load_reward_model(self.model, self.device, self.dtype)
        label = self.label
        if label is None and hf.num_labels != 1:
            raise ConfigError(
                f"args.label: the reward model {self.model!r} has {hf.num_labels} outputs; set "
                "label to the index of the reward"
            )
        if label is not None and label >= hf.num_labels:
            raise ConfigError(
                f"args.label is {label} but the reward model has {hf.num_labels} output(s)"
            )
        scorer = functools.partial(
            hf.score, format=self.format, label=label or 0, batch_size=self.batch_size
        )
        if self.format == "chat" and not getattr(hf.tokenizer, "chat_template", None):
            raise ConfigError(f"args.format is 'chat' but {self.model!r} has no chat template")
        return _ArgsState(inner, scorer, request.tokenizer, request.prompts)

    def step(self, ctx: StepContext, state: _ArgsState) -> torch.Tensor:
        scores = state.inner(ctx)
        if state.scorer is None:
            return scores
        k = min(self.k, scores.shape[-1])
        candidates = torch.topk(ctx.base, k, dim=-1).indices  # (B, k): the base's best
        live = ~torch.isneginf(scores.gather(-1, candidates))  # (B, k)
        rows, cols = live.nonzero(as_tuple=True)
        seqs = [
            [*ctx.generated[r], int(candidates[r, c])]
            for r, c in zip(rows.tolist(), cols.tolist(), strict=True)
        ]
        responses = state.tokenizer.batch_decode(seqs, skip_special_tokens=True)
        prompts = [state.prompts[ctx.prompt_index[r]] for r in rows.tolist()]
        found = torch.as_tensor(state.scorer(prompts, responses), dtype=torch.float32)
        if found.shape != (len(seqs),) or not bool(torch.isfinite(found).all()):
            raise NumericalError(
                f"rule {self}: the reward model gave {tuple(found.shape)} rewards (finite: "
                f"{bool(torch.isfinite(found).all())}) for {len(seqs)} texts; it must return "
                "one finite reward per text"
            )
        rewards = torch.zeros(candidates.shape, device=scores.device)
        rewards[rows, cols] = found.to(scores.device)
        return args_scores(scores, candidates, rewards, self.w)
