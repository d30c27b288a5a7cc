"""Continuous batching: one running batch that requests join and leave between decode steps.

:func:`~proxytune.engine.plain.decode` runs one fixed batch from prefill to the last token. A
server needs more: requests arrive while others are decoding, each with its own alpha, active
pairs, sampling settings, stop strings and budget. :class:`ContinuousBatch` keeps one decode state
per model role and, between steps,

- drops rows that finished or whose request was cancelled (``DecodeState.keep``),
- feeds every remaining row its last token (one forward per model for the whole batch),
- prefills newly admitted rows and appends them to the running batch (``HFDecodeState.extend``).

Each model only holds the rows that need it: a request that switches a pair off (or whose rule
does not read it) never runs that pair's models. Each request is scored exactly as
:func:`~proxytune.engine.plain.decode` scores it alone: it is prepared once
(:func:`~proxytune.engine.prepare.prepare`), every step its own rows go through the same step
scorer (:func:`~proxytune.engine.step.score`), and sampling groups rows by their settings and
calls the same :func:`~proxytune.engine.step.choose`. Every step is row-wise, so a row's tokens
do not depend on which other rows share its batch: under greedy decoding a request returns what
it returns alone (and with a seed, the same samples). A request whose rule fails fails alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..arithmetic import steering_stats
from ..backends.base import DecodeState
from ..errors import ConfigError, NumericalError
from ..results import StepUpdate, TokenLogprob
from .capabilities import can_extend, compact
from .controls import Steerable
from .fallback import FellBack, failing_member, fallback_prepared
from .members import Member
from .overlap import can_overlap, engine, run_grouped
from .prepare import Row
from .requests import Job, RequestCore, SlotKey, StepStats, member_key
from .step import choose, emit, logprob_records, score

log = logging.getLogger("proxytune.server")

__all__ = ["ContinuousBatch"]


@dataclass(eq=False)
class _Row(Row):
    job: Job | None = None
    last: int = -1
    done: bool = False

    @property
    def gone(self) -> bool:
        assert self.job is not None
        return self.done or self.job.cancelled or self.job.error is not None

    @property
    def step(self) -> int:
        return len(self.ids)


@dataclass
class _Slots:
    """The rows one running member holds, in the order of its decode state's batch."""

    member: Member
    rows: list[_Row] = field(default_factory=list)
    state: DecodeState | None = None
    logits: torch.Tensor | None = None


class ContinuousBatch(RequestCore):
    """A running batch over a tuner's models; not thread-safe (one worker thread drives it)."""

    def __init__(self, tuner: Steerable, kl: bool = True) -> None:
        self.tuner = tuner
        self.base: Member = tuner.base
        self.vocab_size: int = tuner.vocab_size
        self.device = self.base.model.device
        self.kl = kl
        self.slots: dict[SlotKey, _Slots] = {}
        """One decode state per running member (:func:`member_key`), in the order members
        joined; a state leaves with its last row (an unloaded pair's models are then free)."""
        self.stats = StepStats()
        self.deferred: list[Job] = []
        """Jobs the last step could not merge; they wait until the batch has drained."""
        self.hold = False
        self._broken: dict[SlotKey, BaseException] = {}
        """Members whose forward raised in this step (their rows fall back or fail)."""

    def _rows_of(self, job: Job) -> list[_Row]:
        rows = job.prepared.rows(_Row, job=job)
        job.rows_left = len(rows)
        return rows

    # the batch ------------------------------------------------------------------------------

    @property
    def rows(self) -> list[_Row]:
        """Every row in the batch, in the base model's order."""
        slots = self.slots.get(member_key(self.base))
        return slots.rows if slots is not None else []

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
        return not states or (not self.hold and all(can_extend(s) for s in states))

    def reset(self) -> None:
        """Forget every row (after a failed step); the models keep their weights."""
        self.slots = {}

    def step(self, new_jobs: Sequence[Job] = ()) -> list[tuple[Job, StepUpdate]]:
        """Admit ``new_jobs``, then decode one token for every row in the batch.

        Returns each row's :class:`StepUpdate` with its job. Rows that finish are dropped at
        the start of the next step; so are the rows of cancelled or failed jobs.
        """
        self.stats = StepStats()
        self._broken = {}
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
            out.append((row.job, self._push(row, int(chosen[i]), records.get(i))))  # type: ignore[arg-type]
        return out

    def retire(self) -> None:
        """Drop finished, cancelled and failed rows from every model's batch (and a member's
        rows once its request stopped running it)."""
        for key, slots in list(self.slots.items()):
            keep = [i for i, r in enumerate(slots.rows) if not r.gone and key in r.job.keys]  # type: ignore[union-attr]
            if len(keep) == len(slots.rows):
                continue
            slots.logits = None
            if not keep:
                del self.slots[key]
                continue
            assert slots.state is not None
            slots.state.keep(torch.tensor(keep, device=self.device))
            compact(slots.state)
            slots.rows = [slots.rows[i] for i in keep]

    def _advance(self) -> None:
        """Feed each role its rows' last ids (the roles' forwards at once where the tuner
        asks for :attr:`~proxytune.tuner.ProxyTuner.overlap`)."""
        models = {key: slots.member.model for key, slots in self.slots.items()}
        overlap = self.tuner.options.overlap and can_overlap(models.values())
        calls, filled = [], []
        for role, slots in self.slots.items():
            if slots.state is None:
                continue
            ids = torch.tensor([r.last for r in slots.rows], dtype=torch.long).view(-1, 1)
            key = engine(models[role]) if overlap else None
            calls.append((key, lambda s=slots.state, x=ids: _attempt(s.advance, x)))
            filled.append(role)
        outs = run_grouped(calls, overlap)
        for role, out in zip(filled, outs, strict=True):
            if isinstance(out, BaseException):
                self._lose(role, out)
            else:
                self.slots[role].logits = out[:, -1]

    def _lose(self, key: SlotKey, err: BaseException) -> None:
        """A member's forward raised: drop its state (its requests fall back or fail at
        scoring); the base's failure fails the whole step."""
        if key == member_key(self.base):
            raise err
        log.warning("%s failed (%s: %s); its requests fall back", key[0], type(err).__name__, err)
        self.slots.pop(key, None)
        self._broken[key] = err

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
        members = {member_key(m): m for job, _ in new for m in job.prepared.members}
        started: dict[SlotKey, tuple[DecodeState, torch.Tensor, list[_Row]]] = {}
        for key, m in members.items():
            joining = [r for job, rows in new for r in rows if key in job.keys]
            if joining:
                prompts = [r.job.rendered[m.role][r.prompt_index] for r in joining]
                out = _attempt(m.model.start, prompts, use_cache=True)
                if isinstance(out, BaseException):
                    self._lose(key, out)
                    continue
                started[key] = (*out, joining)
        merged: list[SlotKey] = []
        try:
            for role, (state, _, _) in started.items():
                running = self.slots[role].state if role in self.slots else None
                if running is not None:
                    running.extend(state)  # type: ignore[attr-defined]  (can_join checked it)
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
        for key, (state, logits, joining) in started.items():
            slots = self.slots.setdefault(key, _Slots(members[key]))
            if slots.state is None:
                slots.state, slots.logits = state, logits
            else:
                assert slots.logits is not None
                slots.logits = torch.cat([slots.logits, logits.to(slots.logits)])
            slots.rows.extend(joining)

    def _logits(self, member: Member, rows: Sequence[_Row]) -> torch.Tensor:
        """``member``'s next-token logits for ``rows`` (all of which it holds), in that order."""
        slots = self.slots[member_key(member)]
        assert slots.logits is not None
        if len(rows) == len(slots.rows) and all(
            a is b for a, b in zip(rows, slots.rows, strict=True)
        ):
            return slots.logits
        where = {id(r): i for i, r in enumerate(slots.rows)}
        index = torch.tensor([where[id(r)] for r in rows], device=slots.logits.device)
        return slots.logits[index]

    def _scores(self, rows: list[_Row]) -> tuple[torch.Tensor, list[bool]]:
        """Combined scores of every row: each request's prepared rule on its own rows, exactly
        as :func:`~proxytune.engine.plain.decode` would run it. A request whose rule or models
        fail (NaN, nothing left to sample, a bug) fails alone."""
        groups: dict[Job, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r.job, []).append(i)  # type: ignore[arg-type]
        ok = [True] * len(rows)
        scores: torch.Tensor | None = None
        for job, idx in groups.items():
            members = rows if len(idx) == len(rows) else [rows[i] for i in idx]
            step = members[0].step  # a job's rows start together and advance together
            logits = self._job_logits(job, members)
            try:
                part, base_lp = score(job.prepared, logits, members, step)
            except Exception as err:  # this request's rule or models: fail it, keep the rest
                fell = self._fall_back(job, logits, members, step, err)
                if fell is None:
                    self._fail(job, self._broken_error(job) or err, idx, ok)
                    continue
                part, base_lp = fell
            if self.kl and job.steered and job.fell_back is None:  # what its pairs do
                self._measure(job, part, base_lp)
            if len(idx) == len(rows):
                return part, ok
            if scores is None:
                scores = part.new_zeros((len(rows), part.shape[-1]))
            scores[torch.tensor(idx, device=part.device)] = part
        if scores is None:  # every request failed
            scores = torch.zeros((len(rows), self.vocab_size), device=self.device)
        return scores, ok

    def _measure(self, job: Job, scores: torch.Tensor, base_lp: torch.Tensor) -> None:
        """What steering did to ``job``'s rows this step: the batch's KL, and per pair it ran
        (by name) the sums of KL, changed top tokens and entropy (:attr:`StepStats.pairs`)."""
        kl, changed, entropy = steering_stats(scores, base_lp)
        sums = (float(kl.sum()), float(changed.sum()), float(entropy.sum()), kl.shape[0])
        self.stats.kl_sum += sums[0]
        self.stats.kl_rows += sums[3]
        p = job.prepared
        for i, (pair, (e, a)) in enumerate(zip(p.pairs, p.needs, strict=True)):
            if e or a:
                name = pair.name or str(i)
                total = self.stats.pairs.setdefault(name, [0.0, 0.0, 0.0, 0])
                for k, v in enumerate(sums):
                    total[k] += v

    def _job_logits(self, job: Job, rows: Sequence[_Row]) -> dict[str, torch.Tensor]:
        """Each of ``job``'s members' logits for ``rows``; a member whose forward failed is
        missing."""
        out = {}
        for m in job.prepared.members:
            key = member_key(m)
            if key in self.slots and key not in self._broken:
                try:
                    out[m.role] = self._logits(m, rows)
                except KeyError:  # its rows never joined that state (its prefill failed)
                    continue
        return out

    def _broken_error(self, job: Job) -> BaseException | None:
        """The error of a member of ``job`` whose forward failed in this step, if any."""
        for key in job.keys:
            if key in self._broken:
                return self._broken[key]
        return None

    def _fall_back(
        self,
        job: Job,
        logits: dict[str, torch.Tensor],
        rows: Sequence[_Row],
        step: int,
        err: BaseException,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Score ``job`` on its fallback after its pair failed (``err``), or ``None`` where
        its policy is ``fail``, it fell back already, or no pair is at fault."""
        if job.fallback == "fail" or job.fell_back is not None:
            return None
        failed = failing_member(job.prepared, logits)
        broken = self._broken.get(member_key(failed)) if failed is not None else None
        if failed is None and not isinstance(err, ArithmeticError):
            return None  # the rule itself (a bug or its settings): no fallback fixes that
        cause = broken or err
        target = fallback_prepared(job.prepared, job.fallback, failed)
        if target is None:
            return None
        prepared, to = target
        try:
            scored = score(prepared, logits, rows, step)
        except Exception:
            return None
        job.prepared = prepared
        job.fell_back = FellBack.of(to, cause, step)
        self.stats.fallbacks.append(job)
        log.warning("a request fell back to the %s at step %d: %s", to, step, job.fell_back.detail)
        return scored

    def _fail(self, job: Job, err: BaseException, idx: Sequence[int], ok: list[bool]) -> None:
        """Mark ``job`` failed (its rows ``idx`` leave at the next step); the rest go on."""
        if not isinstance(err, ConfigError | ArithmeticError | KeyError):
            log.error("one request failed: %s: %s", type(err).__name__, err, exc_info=err)
        if job.error is None:
            job.error = err
            self.stats.failed.append(job)
        for i in idx:
            ok[i] = False

    def _isolated(
        self,
        rows: list[_Row],
        idx: list[int],
        ok: list[bool],
        run: Callable[[list[int]], None],
        rewind: Callable[[], None] | None = None,
        error: Callable[[BaseException], BaseException] = lambda err: err,
    ) -> None:
        """``run(idx)`` over a group of rows; where it raises, ``rewind()`` and run it again once
        per request in the group, so that only a request at fault fails (with ``error(err)``)."""
        try:
            run(idx)
            return
        except Exception as err:
            jobs: dict[Job, list[int]] = {}
            for i in idx:
                jobs.setdefault(rows[i].job, []).append(i)  # type: ignore[arg-type]
            if len(jobs) == 1:
                self._fail(next(iter(jobs)), error(err), idx, ok)
                return
        if rewind is not None:
            rewind()
        for job, part in jobs.items():
            try:
                run(part)
            except Exception as err:
                self._fail(job, error(err), part, ok)

    def _choose(self, scores: torch.Tensor, rows: list[_Row], ok: list[bool]) -> torch.Tensor:
        """One :func:`~proxytune.engine.step.choose` per group of rows with the same sampling
        settings. A group that fails is chosen again request by request (each row's generator
        rewound), so only the request whose scores cannot be sampled fails."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, r in enumerate(rows):
            if ok[i]:
                c = r.job.config  # type: ignore[union-attr]
                groups.setdefault((*c.sampling().values(), c.penalised), []).append(i)
        chosen = torch.zeros(len(rows), dtype=torch.long, device=scores.device)

        def pick(idx: list[int]) -> None:
            members = [rows[i] for i in idx]
            part = scores if len(idx) == len(rows) else scores[_index(idx, scores)]
            picked = choose(part, members, members[0].job.config)  # type: ignore[union-attr]
            if not bool(((picked >= 0) & (picked < scores.shape[-1])).all()):
                raise NumericalError("sampling chose no valid token (the scores overflowed)")
            if len(idx) == len(rows):
                chosen.copy_(picked)
            else:
                chosen[_index(idx, scores)] = picked

        for idx in groups.values():
            rewind = _rewinder([rows[i].generator for i in idx])
            self._isolated(rows, idx, ok, pick, rewind, _sampling_error)
        return chosen

    def _records(
        self, scores: torch.Tensor, chosen: torch.Tensor, rows: list[_Row], ok: list[bool]
    ) -> dict[int, TokenLogprob]:
        """Log-prob records for the rows that asked for them (grouped by ``top_logprobs``; a
        request whose records fail fails alone)."""
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            config = r.job.config  # type: ignore[union-attr]
            if ok[i] and config.logprobs:
                groups.setdefault(config.top_logprobs, []).append(i)
        tokenizer = self.base.model.tokenizer
        out: dict[int, TokenLogprob] = {}
        for k, idx in groups.items():

            def record(idx: list[int], k: int = k) -> None:
                index = _index(idx, scores)
                found = logprob_records(scores[index], chosen[index], k, tokenizer)
                out.update(zip(idx, found, strict=True))

            self._isolated(rows, idx, ok, record)
        return out

    def _push(self, row: _Row, token: int, record: TokenLogprob | None) -> StepUpdate:
        """Append ``token`` to ``row`` (:func:`~proxytune.engine.step.emit`); count its finish."""
        job = row.job
        assert job is not None
        row.last = token
        update = emit(row, token, record, job.prepared.eos, job.prepared.penalised)
        if update.finish_reason is not None:
            row.done = True
            job.rows_left -= 1
        return update


def _rewinder(generators: list[torch.Generator | None]) -> Callable[[], None]:
    """A function that puts ``generators`` back in the state they are in now."""
    saved = [g.get_state() if g is not None else None for g in generators]

    def rewind() -> None:
        for g, state in zip(generators, saved, strict=True):
            if g is not None and state is not None:
                g.set_state(state)

    return rewind


def _index(idx: list[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(idx, device=like.device)


def _attempt(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, or the exception it raised (returned, not raised)."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:
        return err


def _sampling_error(err: BaseException) -> BaseException:
    """A sampling failure as the request's own error (a NumericalError that says why)."""
    if isinstance(err, ConfigError | NumericalError):
        return err
    return NumericalError(
        f"sampling failed ({type(err).__name__}: {err}); the request's scores or sampling "
        "settings overflow (a huge token bias or alpha, or a tiny temperature)"
    )
