"""The decode loop for a black-box base (top-k log-probs from an API) and for pairs of another
tokenizer. The plain loop (:func:`proxytune.engine.plain.decode`) needs full logits from every
model in one vocabulary; this one, per step::

    base    an API row: the endpoint's top-k, completed by the missing-mass rule
            (:func:`~proxytune.backends.topk.topk_row`), or a local base's full log-probs
    pairs   same tokenizer: their log-probs; another tokenizer: read through
            :class:`~proxytune.engine.crosstok.CrossFeeder` in the base's ids
    rule    the same rules, on a :class:`~proxytune.rules.TopKContext` (which says what was
            estimated)
    support an API base: the endpoint's candidates | each expert's own top tokens; the rule's
            scores outside it are -inf
    sample, emit, append (as the plain loop, with the same helpers)

With ``k = V`` and the same tokenizer nothing is estimated or mapped and the output is the
plain loop's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..backends.base import APIUsage, BaseRows, ChunkStats, DecodeState
from ..backends.topk import coverage, restrict
from ..results import StepUpdate
from ..rules import Combiner, StepContext, TopKContext
from .capabilities import is_top_k_only
from .crosstok import CoverageError, CrossFeeder, CrossOptions, VocabMap
from .members import Member
from .prepare import Prepared, Row
from .step import checked_scores, choose, emit_all, member_logprobs, records_for, step_context


@dataclass
class BlackBoxStats:
    """What one generation cost and how well it mapped (pass one as ``stats=``)."""

    steps: int = 0
    emitted: int = 0
    coverage: list[float] = field(default_factory=list)
    """Per step: the lowest coverage over live rows (1.0 when nothing had to map)."""
    text_scored: int = 0
    """Different tokenizers: candidates scored on the text path."""
    api: APIUsage = field(default_factory=APIUsage)
    chunks: ChunkStats = field(default_factory=ChunkStats)
    notes: list[str] = field(default_factory=list)
    prompt_path: str | None = None
    """An API base: how prefixes travelled, ``tokens`` (exact) or ``text`` (re-tokenized)."""

    @property
    def mean_coverage(self) -> float:
        return sum(self.coverage) / len(self.coverage) if self.coverage else 1.0

    @property
    def calls_saved(self) -> int:
        """Calls a token-by-token run would have made, minus those made."""
        return self.chunks.tbt_calls - self.api.calls if self.api.calls else 0

    @property
    def prompt_tokens_saved(self) -> int:
        return self.chunks.tbt_prompt_tokens - self.api.prompt_tokens if self.api.calls else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "emitted": self.emitted,
            "mean_coverage": self.mean_coverage,
            "min_coverage": min(self.coverage, default=1.0),
            "text_scored": self.text_scored,
            "api": self.api.to_dict(),
            "chunks": asdict(self.chunks),
            "calls_saved": self.calls_saved,
            "prompt_tokens_saved": self.prompt_tokens_saved,
            "notes": list(self.notes),
            "prompt_path": self.prompt_path,
        }

    def summary(self) -> str:
        """One line for a terminal."""
        parts = [f"{self.emitted} tokens in {self.steps} steps"]
        if self.api.calls:
            a = self.api
            parts.append(
                f"{a.calls} calls ({self.calls_saved} saved by chunking), prompts as "
                f"{self.prompt_path}, {a.prompt_tokens} "
                f"prompt + {a.completion_tokens} completion tokens, {a.retries} retries, "
                f"{a.unmapped} unmapped candidates"
            )
        if self.coverage:
            parts.append(f"coverage mean {self.mean_coverage:.3f} min {min(self.coverage):.3f}")
        return "; ".join(parts)


def blackbox_decode(
    prepared: Prepared,
    *,
    cross: dict[int, VocabMap] | None = None,
    options: CrossOptions | None = None,
    stats: BlackBoxStats | None = None,
) -> Iterator[list[StepUpdate]]:
    """:func:`~proxytune.engine.plain.decode` for an API base and/or pairs of another tokenizer
    (``cross``: pair index -> its :class:`~proxytune.engine.crosstok.VocabMap`). The same updates;
    ``stats`` fills in as the iterator is consumed."""
    loop = _Loop(
        prepared=prepared,
        cross=cross or {},
        options=options or CrossOptions(),
        stats=stats if stats is not None else BlackBoxStats(),
    )
    return loop.run(prepared.rows())


@dataclass
class _Loop:
    prepared: Prepared
    cross: dict[int, VocabMap]
    options: CrossOptions
    stats: BlackBoxStats

    def run(self, rows: list[Row]) -> Iterator[list[StepUpdate]]:
        p = self.prepared
        device = p.device
        base = self._start_base(rows)
        states, logits, feeders = self._start_pairs(rows)
        live = rows
        seen = {r.index: [0.0, 0] for r in rows}  # coverage sum and count per row
        step = 0
        while True:
            ctx = self._context(step, live, base, logits, feeders, seen)
            scores = checked_scores(_restricted(p.combine, ctx.support), ctx)
            chosen = choose(scores, live, p.config)
            records = records_for(scores, chosen, p.config, p.base.model.tokenizer)
            updates, keep = emit_all(p, live, chosen, records)
            self.stats.steps += 1
            self.stats.emitted += len(updates)
            self.stats.text_scored = sum(f.scored for f in feeders.values())
            self.stats.notes, self.stats.prompt_path = base.notes, base.prompt_path
            yield updates
            if not keep:
                return
            if len(keep) < len(live):
                index = torch.tensor(keep, device=device)
                base.keep(keep)
                for state in states.values():
                    state.keep(index)
                for role in logits:
                    logits[role] = logits[role][index.to(logits[role].device)]
                for feeder in feeders.values():
                    feeder.keep(index)
                live = [live[i] for i in keep]
                chosen = chosen[index.to(chosen.device)]
            next_ids = chosen.view(-1, 1)
            base.advance(chosen)
            for role, state in states.items():
                logits[role] = state.advance(next_ids)[:, -1]
            for feeder in feeders.values():
                feeder.feed(chosen.tolist())
            step += 1

    def _start_base(self, rows: list[Row]) -> BaseRows:
        """The base's rows: an API base's own (:class:`~proxytune.backends.base.TopKOnly`),
        or a local base's decode state."""
        p = self.prepared
        ids = [p.rendered[p.base.role][r.prompt_index] for r in rows]
        if is_top_k_only(p.base.model):
            prompts = [p.prompts[r.prompt_index] for r in rows]
            chunks, usage = self.stats.chunks, self.stats.api
            return p.base.model.start_rows(ids, p.base.prompt, prompts, chunks, usage)
        return _LocalBase(p.base, ids, p.config.use_cache, p.device)

    def _context(
        self,
        step: int,
        live: list[Row],
        base: BaseRows,
        logits: dict[str, torch.Tensor],
        feeders: dict[int, CrossFeeder],
        seen: dict[int, list[float]],
    ) -> TopKContext:
        """Everything the rule sees at this step: the base's row (an API's completed top-k, or
        full log-probs), the pairs in the base's ids, the support and the coverage."""
        p = self.prepared
        alphas = tuple(pair.alpha(step) for pair in p.pairs)
        rooms = [r.budget - len(r.ids) for r in live]
        base_lp, known, cov = base.logprobs(rooms, p.vocab_size)
        pair_lps, mapped = self._pair_logprobs(base_lp, logits, feeders, p.device)
        for i, m in mapped.items():
            if _steers(alphas[i]):
                cov = torch.minimum(cov, coverage(base_lp, m))
        support = base.support(known, [e for e, _ in pair_lps])
        self._check_coverage(live, cov, seen, step)
        ctx = step_context(
            base_lp,
            pair_lps,
            p.pairs,
            step,
            [r.prompt_index for r in live],
            [r.ids for r in live],
            kind=TopKContext,
            base_known=known,
            support=support,
            coverage=cov,
        )
        assert isinstance(ctx, TopKContext)
        return ctx

    def _start_pairs(
        self, rows: list[Row]
    ) -> tuple[dict[str, DecodeState], dict[str, torch.Tensor], dict[int, CrossFeeder]]:
        """Prefill every running pair model: same-tokenizer ones as states of their own,
        other-tokenizer pairs behind a :class:`~proxytune.engine.crosstok.CrossFeeder`."""
        p = self.prepared
        states: dict[str, DecodeState] = {}
        logits: dict[str, torch.Tensor] = {}
        feeders: dict[int, CrossFeeder] = {}
        running = {m.role for m in p.members[1:]}
        for i, pair in enumerate(p.pairs):
            side_states: dict[int, DecodeState] = {}
            side_logits: dict[int, torch.Tensor] = {}
            names: dict[int, str] = {}
            for side, member in enumerate((pair.expert, pair.anti_expert)):
                if member is None or member.role not in running:
                    continue
                prompt_ids = [p.rendered[member.role][r.prompt_index] for r in rows]
                state, first = member.model.start(prompt_ids, use_cache=p.config.use_cache)
                if i in self.cross:
                    side_states[side], side_logits[side] = state, first
                    names[side] = f"{member.role} ({member.model.name})"
                else:
                    states[member.role], logits[member.role] = state, first
            if i in self.cross and side_states:
                feeders[i] = CrossFeeder(
                    self.cross[i], side_states, side_logits, self.options, p.device, names
                )
        return states, logits, feeders

    def _pair_logprobs(
        self,
        base_lp: torch.Tensor,
        logits: dict[str, torch.Tensor],
        feeders: dict[int, CrossFeeder],
        device: torch.device,
    ) -> tuple[tuple[tuple[torch.Tensor | None, torch.Tensor | None], ...], dict[int, Any]]:
        """Per pair ``(expert, anti-expert)`` ``(B, V)`` log-probs in the base's ids (``None``
        where not run), and per other-tokenizer pair its ``(B, V)`` mask of mapped tokens."""
        p = self.prepared
        out = []
        mapped = {}
        for i, pair in enumerate(p.pairs):
            if i in feeders:
                sides, mapped[i] = feeders[i].rows(base_lp)
                out.append((sides.get(0), sides.get(1)))
                continue
            pair_lp: list[torch.Tensor | None] = []
            for member in (pair.expert, pair.anti_expert):
                if member is None or member.role not in logits:
                    pair_lp.append(None)
                    continue
                raw = logits[member.role]
                pair_lp.append(member_logprobs(member, raw, p.vocab_size, device))
            out.append((pair_lp[0], pair_lp[1]))
        return tuple(out), mapped

    def _check_coverage(
        self, live: list[Row], cov: torch.Tensor, seen: dict[int, list[float]], step: int
    ) -> None:
        """Record the step's coverage; refuse a row whose mean coverage is too low."""
        values = cov.tolist()
        self.stats.coverage.append(min(values) if values else 1.0)
        for row, value in zip(live, values, strict=True):
            total = seen[row.index]
            total[0] += value
            total[1] += 1
            mean = total[0] / total[1]
            if mean < self.options.min_coverage:
                raise CoverageError(
                    f"row {row.index} (prompt {row.prompt_index}) at step {step}: only "
                    f"{mean:.0%} of the base's probability mass on average mapped to ids the "
                    f"pair could score (minimum {self.options.min_coverage:.0%}), so the pair "
                    "cannot steer this base meaningfully. Use a pair with the base's "
                    "tokenizer, raise cross_tokenizer.text_candidates, check that the API "
                    "base's tokenizer is the endpoint model's, or lower min_coverage"
                )


class _LocalBase:
    """A base with full logits as the black-box loop's :class:`~proxytune.backends.base.BaseRows`
    (pairs of another tokenizer on a local base): nothing is estimated, every id is known."""

    prompt_path = None

    def __init__(
        self, member: Member, ids: list[list[int]], use_cache: bool, device: torch.device
    ) -> None:
        self.member, self.device = member, device
        self.state, self.logits = member.model.start(ids, use_cache=use_cache)

    @property
    def notes(self) -> list[str]:
        return []

    def logprobs(
        self, rooms: list[int], vocab_size: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        row = member_logprobs(self.member, self.logits, vocab_size, self.device)
        return row, None, torch.ones(len(rooms), device=self.device)

    def support(self, known: torch.Tensor | None, experts: Any) -> None:
        return None

    def keep(self, rows: list[int]) -> None:
        self.state.keep(torch.tensor(rows, device=self.device))

    def advance(self, tokens: torch.Tensor) -> None:
        self.logits = self.state.advance(tokens.view(-1, 1))[:, -1]


def _steers(alpha: Any) -> bool:
    """Whether a pair with this alpha changes anything (not exactly 0 on every row)."""
    if isinstance(alpha, torch.Tensor):
        return bool(alpha.any())
    return alpha != 0


def _restricted(combine: Combiner, support: torch.Tensor | None) -> Combiner:
    """The rule, with every token outside the step's support ruled out."""
    if support is None:
        return combine

    def step(ctx: StepContext) -> torch.Tensor:
        return restrict(combine(ctx), support)

    step.label = getattr(combine, "label", None) or getattr(combine, "__name__", "rule")  # type: ignore[attr-defined]
    return step
