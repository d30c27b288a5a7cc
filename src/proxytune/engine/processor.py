"""Proxy-tuning as a ``transformers`` ``LogitsProcessor`` for a plain ``model.generate``.

>>> proc = tuner.logits_processor(prompts)                      # doctest: +SKIP
>>> enc = tokenizer(prompts, return_tensors="pt", padding=True)  # left padding  # doctest: +SKIP
>>> base_model.generate(**enc, logits_processor=[proc], max_new_tokens=64)  # doctest: +SKIP

The base model is the one running ``generate``; the processor runs the pairs itself, each on
its own prompt format and cache, and feeds them every token ``generate`` appends. Put it
first in the processor list. Beam search (which reorders rows) is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..backends.base import DecodeState
from ..errors import ConfigError
from ..prompts import Prompt
from ..rules import Rule
from .members import Member, Pair
from .prepare import plan, render_prompts
from .step import checked_scores, model_logprobs, step_context


class ProxyLogitsProcessor:
    """Turns the base's scores into proxy-tuned scores inside ``generate``."""

    def __init__(
        self,
        pairs: Sequence[Pair],
        prompts: Sequence[Prompt],
        vocab_size: int,
        rule: Rule | None = None,
        tokenizer: Any = None,
        eos_token_ids: Sequence[int] = (),
        device: torch.device | None = None,
    ) -> None:
        if not prompts:
            raise ConfigError("no prompts given: pass the prompts given to generate()")
        self.pairs = list(pairs)
        self.base = Member("base", _ScoresOnly(tokenizer, device))  # type: ignore[arg-type]
        self.combine, self.needs, self.members = plan(
            rule, self.base, self.pairs, prompts, vocab_size, eos_token_ids
        )
        self.rendered = render_prompts(self.members, prompts)
        self.n_prompts = len(prompts)
        self.vocab_size = vocab_size
        self.repeat = 1
        self.states: dict[str, DecodeState] = {}
        self.logits: dict[str, torch.Tensor] = {}
        self.prompt_width = 0
        self.step = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self.step == 0:
            self._start(input_ids)
        else:
            if input_ids.shape[1] != self.prompt_width + self.step:
                raise ConfigError(
                    "ProxyLogitsProcessor follows one token per step; beam search, assisted "
                    "decoding and reused processors are not supported: build a new processor "
                    "per generate() call and use greedy or sampling"
                )
            new = input_ids[:, -1:]
            self.logits = {r: s.advance(new)[:, -1] for r, s in self.states.items()}
        logits = {"base": scores, **self.logits}
        base_lp, pair_lps = model_logprobs(
            self.base, self.pairs, self.needs, logits, self.vocab_size, scores.device
        )
        ctx = step_context(
            base_lp,
            pair_lps,
            self.pairs,
            self.step,
            [i // self.repeat for i in range(scores.shape[0])],
            input_ids[:, self.prompt_width :].tolist(),
        )
        combined = checked_scores(self.combine, ctx)
        self.step += 1
        out = torch.full_like(scores, float("-inf"), dtype=torch.float32)
        out[:, : self.vocab_size] = combined
        return out.to(scores.dtype)

    def _start(self, input_ids: torch.LongTensor) -> None:
        rows = input_ids.shape[0]
        if rows % self.n_prompts:
            raise ConfigError(
                f"generate() runs {rows} rows for {self.n_prompts} prompts; pass the same "
                "prompts to the processor as to the tokenizer"
            )
        self.repeat = repeat = rows // self.n_prompts  # num_return_sequences: each in place
        self.prompt_width = input_ids.shape[1]
        for m in self.members:
            ids = [self.rendered[m.role][i // repeat] for i in range(rows)]
            self.states[m.role], self.logits[m.role] = m.model.start(ids)


class _ScoresOnly:
    """Stands in for the base model: its logits arrive from ``generate`` as ``scores``."""

    name = "base (generate)"

    def __init__(self, tokenizer: Any, device: torch.device | None) -> None:
        self.tokenizer = tokenizer
        self.device = device
