"""Continuous batching: one running batch that requests join and leave between decode steps.

:func:`~proxytune.generation.decode` runs one fixed batch from prefill to the last token. A
server needs more: requests arrive while others are decoding, each with its own alpha, active
pairs, sampling settings, stop strings and budget. :class:`ContinuousBatch` keeps one decode state
per model role and, between steps,

- drops rows that finished or whose request was cancelled (``DecodeState.keep``),
- feeds every remaining row its last token (one forward per model for the whole batch),
- prefills newly admitted rows and appends them to the running batch (``HFDecodeState.extend``).

Each model only holds the rows that need it: a request that switches a pair off (or whose rule
does not read it) never runs that pair's models. Each request is scored exactly as
:func:`~proxytune.generation.decode` scores it alone: its rule is bound to it once
(:func:`~proxytune.generation.plan`), and every step it gets a
:class:`~proxytune.rules.StepContext` of its own rows (:func:`~proxytune.generation.model_logprobs`,
:func:`~proxytune.generation.checked_scores`); sampling groups rows by their settings and calls
the same :func:`~proxytune.sampling.next_tokens`. Every step is row-wise, so a row's tokens do not
depend on which other rows share its batch: under greedy decoding a request returns what it
returns alone (and with a seed, the same samples). A request whose rule fails fails alone.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..arithmetic import top_logprobs
from ..backends.base import DecodeState
from ..config import GenerationConfig
from ..detokenize import TextTracker
from ..errors import ConfigError
from ..generation import (
    Member,
    Pair,
    checked_scores,
    model_logprobs,
    plan,
    render_prompts,
    row_seed,
)
from ..overlap import can_overlap, engine, run_grouped
from ..prompts import Prompt
from ..results import StepUpdate, TokenLogprob
from ..rules import StepContext
from ..sampling import next_tokens
from .controls import request_alphas, request_rule
from .job import Job, StepStats

log = logging.getLogger("proxytune.server")


def steering_kl(scores: torch.Tensor, base_lp: torch.Tensor) -> torch.Tensor:
    """``KL(steered || base)`` per row, in nats: ``(B, V)`` scores and base log-probs -> ``(B,)``.

    ``scores`` are the combined (unnormalised) scores; tokens the steered distribution rules
    out contribute nothing (``0 * log 0 = 0``).

    >>> base = torch.log(torch.tensor([[0.5, 0.5]]))
    >>> steering_kl(torch.log(torch.tensor([[1.0, 0.0]])), base)
    tensor([0.6931])
    """
    lp = torch.log_softmax(scores.float(), dim=-1)
    p = lp.exp()
    terms = torch.where(p > 0, p * (lp - base_lp.float()), torch.zeros_like(p))
    return terms.sum(dim=-1)


@dataclass(eq=False)
class _Row:
    job: Job
    index: int
    prompt_index: int
    sample_index: int
    budget: int
    tracker: TextTracker
    history: list[int] | None
    generator: torch.Generator | None
    step: int = 0
    last: int = -1
    done: bool = False

    @property
    def gone(self) -> bool:
        return self.done or self.job.cancelled or self.job.error is not None


@dataclass
class _Slots:
    """The rows one model role holds, in the order of its decode state's batch."""

    rows: list[_Row] = field(default_factory=list)
    state: DecodeState | None = None
    logits: torch.Tensor | None = None


class ContinuousBatch:
    """A running batch over a tuner's models; not thread-safe (one worker thread drives it)."""

    def __init__(self, tuner: Any, kl: bool = True) -> None:
        self.tuner = tuner
        self.base: Member = tuner.base
        self.pairs: list[Pair] = list(tuner.pairs)
        self.members: list[Member] = tuner.members
        self.vocab_size: int = tuner.vocab_size
        self.eos = tuple(tuner.eos_token_ids)
        self.device = self.base.model.device
        self.kl = kl
        self.slots = {m.role: _Slots() for m in self.members}
        self.stats = StepStats()
        self.deferred: list[Job] = []
        """Jobs the last step could not merge; they wait until the batch has drained."""
        self.hold = False

    # requests in ----------------------------------------------------------------------------

    def prepare(
        self,
        prompts: Sequence[Prompt],
        config: GenerationConfig,
        alpha: Any = None,
        active_pairs: Sequence[int] | None = None,
        rule: Any = None,
    ) -> Job:
        """Validate, render and bind one request (any thread): raises ``ConfigError`` and
        ``PromptTooLongError`` naming the problem. Nothing runs on the models here.

        ``rule``: a rule name or ``{name: ..., **settings}`` for this request only (default:
        the tuner's own rule).
        """
        if not prompts:
            raise ConfigError("no prompts given: pass at least one prompt")
        schedules, active = request_alphas(self.pairs, alpha, active_pairs)
        pairs = [replace(p, alpha=s) for p, s in zip(self.pairs, schedules, strict=True)]
        chosen = self.tuner.rule if rule is None else request_rule(self.tuner, rule)

        eos = config.eos_token_ids if config.eos_token_ids is not None else self.eos
        combine, needs, _ = plan(chosen, self.base, pairs, prompts, self.vocab_size, eos)
        needs = [(e and on, a and on) for (e, a), on in zip(needs, active, strict=True)]
        members = [self.base] + [
            m
            for p, (e, a) in zip(pairs, needs, strict=True)
            for m, used in ((p.expert, e), (p.anti_expert, a))
            if used and m is not None
        ]
        rendered = render_prompts(members, list(prompts))
        rooms = [
            min((m.model.context_length or 1 << 62) - len(rendered[m.role][p]) for m in members)
            for p in range(len(prompts))
        ]
        seed = config.seed if config.seed is not None else secrets.randbits(62)
        return Job(list(prompts), rendered, config, pairs, needs, combine, seed, rooms)

    def _rows_of(self, job: Job) -> list[_Row]:
        cfg = job.config
        penalised = cfg.penalised
        tokenizer = self.base.model.tokenizer
        rows = []
        for p in range(len(job.prompts)):
            for s in range(cfg.n):
                gen = None
                if not cfg.greedy:
                    gen = torch.Generator(device=self.device).manual_seed(row_seed(job.seed, s))
                rows.append(
                    _Row(
                        job=job,
                        index=len(rows),
                        prompt_index=p,
                        sample_index=s,
                        budget=min(cfg.max_new_tokens, job.rooms[p]),
                        tracker=TextTracker(tokenizer, cfg.stop),
                        history=list(job.rendered["base"][p]) if penalised else None,
                        generator=gen,
                    )
                )
        job.rows_left = len(rows)
        return rows

    # the batch ------------------------------------------------------------------------------

    @property
    def rows(self) -> list[_Row]:
        """Every row in the batch, in the base model's order."""
        return self.slots[self.base.role].rows

    @property
    def live_rows(self) -> int:
        return sum(not r.gone for r in self.rows)

    @property
    def jobs(self) -> list[Job]:
        return list(dict.fromkeys(r.job for r in self.rows))

    @property
    def can_join(self) -> bool:
        """Whether rows can join now: the batch is empty or every model can merge batches."""
        states = [s.state for s in self.slots.values() if s.state is not None]
        if not states:
            self.hold = False
        return not states or (
            not self.hold and all(getattr(s, "can_extend", False) for s in states)
        )

    def reset(self) -> None:
        """Forget every row (after a failed step); the models keep their weights."""
        self.slots = {m.role: _Slots() for m in self.members}

    def step(self, new_jobs: Sequence[Job] = ()) -> list[tuple[Job, StepUpdate]]:
        """Admit ``new_jobs``, then decode one token for every row in the batch.

        Returns each row's :class:`StepUpdate` with its job. Rows that finish are dropped at
        the start of the next step; so are the rows of cancelled or failed jobs.
        """
        self.stats = StepStats()
        self.retire()
        self._advance()
        self._admit(new_jobs)
        rows = self.rows
        if not rows:
            return []
        self.stats.rows = len(rows)
        scores, ok = self._scores(rows)
        chosen = self._choose(scores, rows, ok)
        records = self._records(scores, chosen, rows, ok)
        out = []
        for i, row in enumerate(rows):
            if not ok[i] or row.job.error is not None:
                continue
            out.append((row.job, self._push(row, int(chosen[i]), records.get(i))))
        return out

    def retire(self) -> None:
        """Drop finished, cancelled and failed rows from every model's batch."""
        for slots in self.slots.values():
            keep = [i for i, r in enumerate(slots.rows) if not r.gone]
            if len(keep) == len(slots.rows):
                continue
            slots.logits = None
            if not keep:
                slots.rows, slots.state = [], None
                continue
            assert slots.state is not None
            slots.state.keep(torch.tensor(keep, device=self.device))
            compact = getattr(slots.state, "compact", None)
            if compact is not None:
                compact()
            slots.rows = [slots.rows[i] for i in keep]

    def _advance(self) -> None:
        """Feed each role its rows' last ids (the roles' forwards at once where the tuner
        asks for :attr:`~proxytune.tuner.ProxyTuner.overlap`)."""
        models = {m.role: m.model for m in self.members}
        overlap = bool(getattr(self.tuner, "overlap", False)) and can_overlap(models.values())
        calls, filled = [], []
        for role, slots in self.slots.items():
            if slots.state is None:
                continue
            ids = torch.tensor([r.last for r in slots.rows], dtype=torch.long).view(-1, 1)
            key = engine(models[role]) if overlap else None
            calls.append((key, lambda s=slots.state, x=ids: s.advance(x)))
            filled.append(slots)
        outs = run_grouped(calls, overlap)
        for slots, out in zip(filled, outs, strict=True):
            slots.logits = out[:, -1]

    def _admit(self, jobs: Sequence[Job]) -> None:
        """Prefill ``jobs`` and merge them into the running batch.

        Every role's new rows start before any merge, in member order (a one-pass LoRA pair
        joins its two halves when they start back to back). If a merge fails (a cache that
        cannot merge with this one), the merges done are undone and the jobs are deferred
        (:attr:`deferred`) until the batch has drained; the running rows never notice.
        """
        self.deferred = []
        if not jobs:
            return
        if not self.can_join:
            raise RuntimeError("rows cannot join this batch now (a model's cache cannot merge)")
        new = [(job, self._rows_of(job)) for job in jobs if not job.cancelled]
        started: dict[str, tuple[DecodeState, torch.Tensor, list[_Row]]] = {}
        for m in self.members:
            joining = [r for job, rows in new for r in rows if m.role in job.rendered]
            if joining:
                prompts = [r.job.rendered[m.role][r.prompt_index] for r in joining]
                state, logits = m.model.start(prompts, use_cache=True)
                started[m.role] = (state, logits, joining)
        merged: list[str] = []
        try:
            for role, (state, _, _) in started.items():
                running = self.slots[role].state
                if running is not None:
                    running.extend(state)  # type: ignore[attr-defined]
                    merged.append(role)
        except Exception as err:
            log.warning("new requests wait for the running batch to drain: %s", err)
            for role in merged:  # back to the running rows only
                slots = self.slots[role]
                assert slots.state is not None
                slots.state.keep(torch.arange(len(slots.rows), device=self.device))
            self.deferred = [job for job, _ in new]
            self.hold = True
            return
        for role, (state, logits, joining) in started.items():
            slots = self.slots[role]
            if slots.state is None:
                slots.state, slots.logits = state, logits
            else:
                assert slots.logits is not None
                slots.logits = torch.cat([slots.logits, logits.to(slots.logits)])
            slots.rows.extend(joining)

    def _logits(self, role: str, rows: Sequence[_Row]) -> torch.Tensor:
        """``role``'s next-token logits for ``rows`` (all of which it holds), in that order."""
        slots = self.slots[role]
        assert slots.logits is not None
        if len(rows) == len(slots.rows) and all(
            a is b for a, b in zip(rows, slots.rows, strict=True)
        ):
            return slots.logits
        where = {id(r): i for i, r in enumerate(slots.rows)}
        index = torch.tensor([where[id(r)] for r in rows], device=slots.logits.device)
        return slots.logits[index]

    def _scores(self, rows: list[_Row]) -> tuple[torch.Tensor, list[bool]]:
        """Combined scores of every row: each request's bound rule on its own rows, exactly
        as :func:`~proxytune.generation.decode` would run it. A request whose rule fails
        (NaN, nothing left to sample, a bug) fails alone."""
        groups: dict[Job, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r.job, []).append(i)
        ok = [True] * len(rows)
        scores: torch.Tensor | None = None
        for job, idx in groups.items():
            members = rows if len(idx) == len(rows) else [rows[i] for i in idx]
            step = members[0].step  # a job's rows start together and advance together
            try:
                logits = {role: self._logits(role, members) for role in job.rendered}
                base_lp, pair_lps = model_logprobs(
                    self.base, job.pairs, job.needs, logits, self.vocab_size, self.device
                )
                ctx = StepContext(
                    base=base_lp,
                    pairs=pair_lps,
                    alphas=tuple(p.alpha(step) for p in job.pairs),
                    step=step,
                    prompt_index=tuple(r.prompt_index for r in members),
                    generated=[r.tracker.ids for r in members],
                )
                part = checked_scores(job.combine, ctx)
            except Exception as err:  # this request's rule or models: fail it, keep the rest
                if not isinstance(err, ConfigError | ArithmeticError):
                    log.exception("scoring failed for one request")
                job.error = err
                self.stats.failed.append(job)
                for i in idx:
                    ok[i] = False
                continue
            if self.kl and job.steered:
                kl = steering_kl(part, base_lp)
                self.stats.kl_sum += float(kl.sum())
                self.stats.kl_rows += len(idx)
            if len(idx) == len(rows):
                return part, ok
            if scores is None:
                scores = part.new_zeros((len(rows), part.shape[-1]))
            scores[torch.tensor(idx, device=part.device)] = part
        if scores is None:  # every request failed
            scores = torch.zeros((len(rows), self.vocab_size), device=self.device)
        return scores, ok

    def _choose(self, scores: torch.Tensor, rows: list[_Row], ok: list[bool]) -> torch.Tensor:
        """One ``next_tokens`` call per group of rows with the same sampling settings."""
        groups: dict[tuple[float, ...], list[int]] = {}
        for i, r in enumerate(rows):
            if ok[i]:
                c = r.job.config
                key = (
                    c.temperature,
                    c.top_k,
                    c.top_p,
                    c.min_p,
                    c.repetition_penalty,
                    c.presence_penalty,
                    c.frequency_penalty,
                )
                groups.setdefault(key, []).append(i)
        chosen = torch.zeros(len(rows), dtype=torch.long, device=scores.device)
        for (temp, top_k, top_p, min_p, rep, pres, freq), idx in groups.items():
            whole = len(idx) == len(rows)
            index = torch.tensor(idx, device=scores.device)
            members = [rows[i] for i in idx]
            penalised = members[0].history is not None
            picked = next_tokens(
                scores if whole else scores[index],
                temperature=temp,
                top_k=int(top_k),
                top_p=top_p,
                min_p=min_p,
                repetition_penalty=rep,
                presence_penalty=pres,
                frequency_penalty=freq,
                history=[r.history for r in members] if penalised else None,  # type: ignore[misc]
                generators=None if temp == 0.0 else [r.generator for r in members],
            )
            if whole:
                return picked
            chosen[index] = picked
        return chosen

    def _records(
        self, scores: torch.Tensor, chosen: torch.Tensor, rows: list[_Row], ok: list[bool]
    ) -> dict[int, TokenLogprob]:
        """Log-prob records for the rows that asked for them (grouped by ``top_logprobs``)."""
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            if ok[i] and r.job.config.logprobs:
                groups.setdefault(r.job.config.top_logprobs, []).append(i)
        convert = self.base.model.tokenizer.convert_ids_to_tokens
        out: dict[int, TokenLogprob] = {}
        for k, idx in groups.items():
            index = torch.tensor(idx, device=scores.device)
            top = top_logprobs(scores[index], chosen[index], k)
            for j, i in enumerate(idx):
                ids = top.top_ids[j].tolist()
                alts = list(zip(ids, convert(ids), top.top_logprobs[j].tolist(), strict=True))
                tid = int(chosen[i])
                out[i] = TokenLogprob(tid, convert(tid), float(top.chosen[j]), alts)
        return out

    def _push(self, row: _Row, token: int, record: TokenLogprob | None) -> StepUpdate:
        """Append ``token`` to ``row``: text delta, stop checks, finish."""
        cfg = row.job.config
        row.last = token
        row.step += 1
        if row.history is not None:
            row.history.append(token)
        delta = row.tracker.push(token)
        finish, reason = None, None
        eos = self.eos if cfg.eos_token_ids is None else cfg.eos_token_ids
        if token in eos and not cfg.ignore_eos:
            finish, reason = "stop", token
        elif row.tracker.stopped:
            finish, reason = "stop", row.tracker.stop_hit
        elif len(row.tracker.ids) >= row.budget:
            finish = "length"
        if finish is not None:
            delta += row.tracker.finish()
            row.done = True
            row.job.rows_left -= 1
        return StepUpdate(
            row=row.index,
            prompt_index=row.prompt_index,
            sample_index=row.sample_index,
            token_id=token,
            delta=delta,
            logprob=record,
            finish_reason=finish,
            stop_reason=reason,
        )
