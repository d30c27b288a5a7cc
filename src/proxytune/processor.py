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

import torch

from .backends.base import DecodeState
from .errors import ConfigError
from .generation import Combiner, Member, Pair, combined_scores, render_prompts
from .prompts import Prompt


class ProxyLogitsProcessor:
    """Turns the base's scores into proxy-tuned scores inside ``generate``."""

    def __init__(
        self,
        pairs: Sequence[Pair],
        prompts: Sequence[Prompt],
        vocab_size: int,
        combine: Combiner,
    ) -> None:
        if not prompts:
            raise ConfigError("no prompts given: pass the prompts given to generate()")
        self.pairs = list(pairs)
        self.members: list[Member] = [m for p in self.pairs for m in p.members]
        self.rendered = render_prompts(self.members, prompts)
        self.n_prompts = len(prompts)
        self.vocab_size = vocab_size
        self.combine = combine
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
        base = Member("base", _ScoresOnly(scores.device))  # type: ignore[arg-type]
        combined = combined_scores(
            base,
            self.pairs,
            {"base": scores, **self.logits},
            self.vocab_size,
            self.step,
            self.combine,
            scores.device,
        )
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
        repeat = rows // self.n_prompts  # num_return_sequences expands each prompt in place
        self.prompt_width = input_ids.shape[1]
        for m in self.members:
            ids = [self.rendered[m.role][i // repeat] for i in range(rows)]
            self.states[m.role], self.logits[m.role] = m.model.start(ids)


class _ScoresOnly:
    """Stands in for the base model: its logits arrive from ``generate`` as ``scores``."""

    name = "base (generate)"

    def __init__(self, device: torch.device) -> None:
        self.device = device
