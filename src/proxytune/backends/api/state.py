"""One generation's rows on an API base: their prefixes, drafted chunks and the bill.

Chunked agreement (``chunk > 1`` or ``"auto"``): a call asks the endpoint to continue a row
greedily for ``c`` tokens, with the top-k candidates at each position. Position ``j + 1``'s
candidates were computed by the endpoint after its own token ``d_j``; they are the base's
exact candidates for the loop's row as long as the loop's token at ``j`` *is* ``d_j``. So::

    step    use the row's next drafted position if every loop token so far equalled the
            endpoint's draft; otherwise (or when the chunk is used up) call the endpoint
    commit  loop token == draft token -> the next position stays valid; else drop the rest

The loop still samples every token from the same combined distribution it would compute
token by token (same candidates, same random draws), so the output is unchanged; only calls
are saved, and the drafted positions past a disagreement are wasted tokens. ``"auto"`` picks
``c`` from the running agreement rate (:func:`best_chunk`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..base import APIUsage, ChunkStats
from ..topk import expert_support, topk_row
from .client import EndpointError, EndpointPrompt, Position

if TYPE_CHECKING:
    from . import APIModel

PRIOR = 0.6
"""Agreement rate assumed before the first comparison (``chunk: auto``)."""
SMOOTHING = 0.1


@dataclass
class _Prefix:
    ids: list[int]
    text: str
    generated: list[int] = field(default_factory=list)
    buffer: list[Position] = field(default_factory=list)
    pos: int = 0


class APIBaseState:
    """The live rows of one generation on an :class:`~proxytune.backends.api.APIModel`: the
    black-box loop's :class:`~proxytune.backends.base.BaseRows` for an API base."""

    def __init__(
        self,
        model: APIModel,
        prompt_ids: Sequence[Sequence[int]],
        prompt_texts: Sequence[str],
        stats: ChunkStats,
        usage: APIUsage,
    ) -> None:
        self.model = model
        self.usage = usage
        """This generation's bill (the model's :attr:`~.api.APIModel.usage` sums every one)."""
        self.spec = model.spec
        self.client = model.client
        self.rows = [_Prefix(list(i), t) for i, t in zip(prompt_ids, prompt_texts, strict=True)]
        self.stats = stats
        self.rate = PRIOR

    # the step ---------------------------------------------------------------------------------

    def step(self, rooms: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Candidates of every live row: ``(B, k)`` ids (``-1`` padding), ``(B, k)`` log-probs
        and ``(B,)`` the share of the shown mass that mapped to ids. ``rooms``: tokens each
        row may still generate (a chunk never asks for more)."""
        self.stats.tbt_calls += 1
        self.stats.tbt_row_requests += len(self.rows)
        self.stats.tbt_prompt_tokens += sum(len(r.ids) + len(r.generated) for r in self.rows)
        need = [i for i, r in enumerate(self.rows) if r.pos >= len(r.buffer)]
        self.stats.served += len(self.rows) - len(need)
        if need:
            self._fetch(need, max(rooms[i] for i in need))
        here = [r.buffer[r.pos] for r in self.rows]
        width = max(1, *(len(p.ids) for p in here))
        ids = torch.full((len(here), width), -1, dtype=torch.long)
        lps = torch.full((len(here), width), float("-inf"))
        for n, p in enumerate(here):
            ids[n, : len(p.ids)] = torch.tensor(p.ids, dtype=torch.long)
            lps[n, : len(p.ids)] = torch.tensor(p.logprobs)
        share = torch.tensor([p.mapped_mass / p.shown_mass if p.shown_mass else 0.0 for p in here])
        device = self.model.device
        return ids.to(device), lps.to(device), share.to(device)

    def _fetch(self, need: list[int], room: int) -> None:
        """One call for the rows in ``need``; rows with the same prefix (``n`` samples of a
        prompt, before they part) share one prompt of it."""
        prompts: list[EndpointPrompt] = []
        slot: dict[tuple[int, ...], int] = {}
        which = []
        for i in need:
            p = self._prompt(self.rows[i])
            which.append(slot.setdefault(tuple(p.ids), len(slot)))
            if which[-1] == len(prompts):
                prompts.append(p)
        if self.spec.logprobs == "sampled":
            sampled = self.client.samples(prompts, self.spec.samples, self.usage)
            drawn = [[_estimate(t)] for t in sampled]
        else:
            chunk = max(1, min(self._chunk(), room))
            self.stats.chunks.append(chunk)
            drawn = self.client.positions(prompts, chunk, self.spec.top_logprobs, self.usage)
            if any(not positions for positions in drawn):
                raise EndpointError(
                    f"the endpoint {self.client.url} returned an empty completion: it must "
                    "return at least one token with its log-probs"
                )
        for i, s in zip(need, which, strict=True):
            self.rows[i].buffer, self.rows[i].pos = drawn[s], 0
        if self.client.prompt_as == "text":
            self._check_text(prompts)

    def _chunk(self) -> int:
        if self.spec.chunk != "auto":
            return int(self.spec.chunk)
        return best_chunk(self.rate, self.spec.cost_ratio, self.spec.max_chunk)

    def _prompt(self, row: _Prefix) -> EndpointPrompt:
        reply = ""
        if row.generated:
            reply = self.model.tokenizer.decode(
                row.generated, skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
        return EndpointPrompt(ids=row.ids + row.generated, text=row.text + reply, reply=reply)

    def _check_text(self, prompts: list[EndpointPrompt]) -> None:
        """Count rows whose text, re-tokenized, is not the ids the loop holds."""
        add = self.spec.prompt.add_special_tokens
        for p in prompts:
            again = self.model.tokenizer(p.text, add_special_tokens=add)["input_ids"]
            self.stats.text_drift += list(again) != list(p.ids)

    def logprobs(
        self, rooms: Sequence[int], vocab_size: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The step's candidates completed into ``(B, V)`` rows by the missing-mass rule
        (:func:`~.topk.topk_row`), the mask of ids shown, and the mapped share."""
        ids, lps, coverage = self.step(rooms)
        row, known = topk_row(ids, lps, vocab_size, self.spec.missing_mass)
        return row, known, coverage

    def support(
        self, known: torch.Tensor | None, experts: Sequence[torch.Tensor | None]
    ) -> torch.Tensor | None:
        """The endpoint's candidates and each expert's own ``expert_top`` tokens."""
        if known is None:
            return None
        top = self.spec.top_logprobs if self.spec.expert_top is None else self.spec.expert_top
        extra = expert_support(experts, top)
        return known if extra is None else known | extra

    @property
    def notes(self) -> list[str]:
        return list(self.client.notes)

    @property
    def prompt_path(self) -> str | None:
        return self.client.prompt_path

    # after the step ---------------------------------------------------------------------------

    def advance(self, tokens: torch.Tensor) -> None:
        """:meth:`commit` the chosen ids."""
        self.commit(tokens.tolist())

    def commit(self, tokens: Sequence[int]) -> None:
        """Append each live row's chosen id; keep its drafted chunk only while it agrees."""
        for row, token in zip(self.rows, tokens, strict=True):
            row.generated.append(int(token))
            drafted = row.pos + 1 < len(row.buffer)  # a later position exists to move to
            if drafted and row.buffer[row.pos].token == int(token):
                row.pos += 1
                self.stats.agreed += 1
                self.rate += SMOOTHING * (1.0 - self.rate)
                continue
            if drafted:
                self.stats.disagreed += 1
                self.stats.wasted += len(row.buffer) - row.pos - 1
                self.rate += SMOOTHING * (0.0 - self.rate)
            row.buffer, row.pos = [], 0

    def keep(self, index: Sequence[int]) -> None:
        """Keep only the rows at ``index`` (finished rows leave; their drafts are wasted)."""
        kept = set(index)
        for i, row in enumerate(self.rows):
            if i not in kept:
                self.stats.wasted += max(0, len(row.buffer) - row.pos - 1)
        self.rows = [self.rows[i] for i in index]


def best_chunk(agreement: float, cost_ratio: float, longest: int) -> int:
    """The chunk length that maximises positions used per unit of cost (``chunk: auto``).

    With agreement rate ``a`` a call of ``N`` positions serves ``(1 - a**N) / (1 - a)`` steps
    on average and costs one call plus ``N - 1`` drafted tokens (``cost_ratio`` each).

    >>> best_chunk(0.9, 0.1, 16), best_chunk(0.0, 0.1, 16)
    (11, 1)
    """
    a = min(max(agreement, 0.0), 0.99)
    best, best_rate = 1, 1.0
    for n in range(2, longest + 1):
        rate = (1 - a**n) / (1 - a) / (1 + cost_ratio * (n - 1))
        if rate > best_rate + 1e-12:
            best, best_rate = n, rate
    return best


def _estimate(tokens: Sequence[int | None]) -> Position:
    """Candidates from ``n`` sampled tokens: ``p(t) = count(t) / (n + 1)``; the remaining
    ``1 / (n + 1)`` is the missing mass (a token never drawn may still be possible)."""
    n = len(tokens)
    counts: dict[int, int] = {}
    for t in tokens:
        if t is not None:
            counts[t] = counts.get(t, 0) + 1
    ids = sorted(counts, key=lambda t: -counts[t])
    lps = [math.log(counts[t] / (n + 1)) for t in ids]
    mapped = sum(counts.values()) / n if n else 0.0
    return Position(ids[0] if ids else None, ids, lps, 1.0, mapped)
