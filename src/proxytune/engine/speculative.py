"""Speculative proxy decoding: the small expert drafts, the other models verify, output stays exact.

The expert's next-token distribution is already one term of the target, so it is a natural
draft model. One round, for the ``B`` live rows (row ``r`` drafts ``k_r <= K`` tokens)::

    draft   the expert samples d_1..d_K from q_j = shape(log p_E), one token per forward
    verify  every other model (base, anti-expert, other pairs) scores [x_0, d_1..d_K] in ONE
            forward -> (B, K+1, W): the target's terms at positions 1..K+1
    accept  p_j = shape(rule(base, pairs)) exactly as the plain loop computes it (same rule,
            same penalties/temperature/top-k/top-p/min-p); accept d_j with probability
            min(1, p_j(d_j) / q_j(d_j)); at the first rejection emit a draw from
            norm(max(0, p_j - q_j)); after k_r acceptances emit a draw from p_{k_r+1}
            (greedy: accept while d_j == argmax p_j, then emit argmax p_j)
    rewind  each model forgets, per row, the ids it was fed past the last accepted draft
            (:meth:`~proxytune.backends.base.RollbackState.rollback`); the last emitted id
            x_0 is fed at the start of the next round

``shape`` is :func:`~proxytune.sampling.shape_scores`: ``q_j`` is exactly the distribution
each draft was drawn from, ``p_j`` exactly the one the plain loop would draw from. Every
emitted token therefore has the target distribution given the tokens before it (Leviathan
et al. 2023, Chen et al. 2023), whatever the draft; docs/speed.md has the argument, including
why per-row draft lengths, early finishes (EOS, stop strings, budget) and ``k='auto'`` keep it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..arithmetic import log_probs
from ..backends.base import DecodeState
from ..config import AUTO_DRAFT, parse_draft_length
from ..results import StepUpdate
from ..rules import Sides
from ..sampling import shape_scores
from .capabilities import require_rollback, rollback, weight_size
from .members import Member, Pair
from .plain import advance_all, decode, start_all
from .prepare import Prepared, Row
from .step import emit, records_for, score

AUTO = AUTO_DRAFT
AUTO_LONGEST = 8
"""The longest draft ``k='auto'`` chooses."""
PRIOR = 0.6
"""Acceptance rate assumed for a row before its first test (``k='auto'``)."""
SMOOTHING = 0.2
"""Weight of each new accept/reject outcome in a row's running acceptance rate."""


@dataclass
class SpeculativeStats:
    """Counts over one call (pass one to ``generate``/``steps``; it fills in as rows decode)."""

    rounds: int = 0
    """Verification rounds: one forward of each verifying model (base, anti-expert, ...)."""
    row_rounds: int = 0
    """Live rows summed over rounds."""
    proposed: int = 0
    """Draft tokens tested against the target."""
    accepted: int = 0
    emitted: int = 0
    """Tokens emitted (every row)."""
    draft_forwards: int = 0
    """Forwards of the drafting model (one token each)."""
    costs: RoundCosts | None = None
    """What ``k='auto'`` measured (seconds per drafter forward and per verification width);
    ``None`` where it did not time its rounds (a fixed ``k``, seeded sampling). A call given
    stats that already hold costs starts from them (the server shares one across requests)."""

    @property
    def acceptance_rate(self) -> float:
        """Accepted / tested drafts (0 before any test)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens a row gains per verification (1 is the plain loop)."""
        return self.emitted / self.row_rounds if self.row_rounds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_round": self.tokens_per_round,
        }


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a round with ``k`` drafts emits on average when each draft is accepted
    independently at rate ``acceptance``: ``(1 - a**(k+1)) / (1 - a)`` (1 for ``k = 0``)."""
    a = min(max(acceptance, 0.0), 0.99)
    return (1 - a ** (k + 1)) / (1 - a)


@dataclass
class RoundCosts:
    """What a speculative round costs, learned from the rounds run so far (``k='auto'``).

    A round with ``k`` drafts runs the drafter ``max(k, 1)`` times (once more, with
    probability ``a**k``, for the bonus position) and each verifier once on ``k + 1``
    positions (its *width*). Seconds are measured per drafter forward and per verification
    width (moving averages). Before any measurement, a verification costs the same at every
    width (memory-bound decoding, as on a GPU) and a drafter forward ``draft_ratio`` of one
    (weight bytes). Widths not measured yet are interpolated between measured ones, or guessed
    optimistically so that they get tried: a wider one continues the slope of the two widest
    measured widths (flat if only one is measured), a narrower one as if cost grew linearly
    with width from zero. Where a width-``n`` forward costs about ``n`` times a
    width-1 forward (a compute-bound CPU), ``auto`` thus learns to draft nothing: each round
    is then one plain step.

    >>> flat = RoundCosts(draft_ratio=0.25)
    >>> best_draft_length([0.9], flat.round_cost), best_draft_length([0.3], flat.round_cost)
    (7, 1)
    >>> linear = RoundCosts(draft_ratio=0.25, draft=0.25, verify={n: n for n in range(1, 10)})
    >>> best_draft_length([0.9], linear.round_cost)
    0
    >>> seen = RoundCosts(0.25, verify={3: 3.0})  # unseen widths: optimistic guesses
    >>> seen.verify_cost(5), seen.verify_cost(1)
    (3.0, 1.0)
    """

    draft_ratio: float
    draft: float | None = None
    """Seconds per drafter forward (``None`` before the first)."""
    verify: dict[int, float] = field(default_factory=dict)
    """Seconds of all verifiers' forwards together, by width."""
    smoothing: float = 0.3

    def observe_draft(self, seconds: float, forwards: int) -> None:
        if forwards > 0:
            self.draft = self._mix(self.draft, seconds / forwards)

    def observe_verify(self, width: int, seconds: float) -> None:
        if width > 0:
            self.verify[width] = self._mix(self.verify.get(width), seconds)

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)

    def verify_cost(self, width: int) -> float:
        """Seconds (or, before any measurement, units of one verification) at ``width``."""
        if width in self.verify:
            return self.verify[width]
        if not self.verify:
            return self.draft / self.draft_ratio if self.draft else 1.0
        below = [n for n in self.verify if n < width]
        above = [n for n in self.verify if n > width]
        if below and above:
            lo, hi = max(below), min(above)
            t = (width - lo) / (hi - lo)
            return self.verify[lo] + t * (self.verify[hi] - self.verify[lo])
        if below:  # wider than any measured: continue the last slope (flat if only one)
            lo = max(below)
            lower = [n for n in below if n < lo]
            if not lower:
                return self.verify[lo]
            prev = max(lower)
            slope = max(0.0, (self.verify[lo] - self.verify[prev]) / (lo - prev))
            return self.verify[lo] + slope * (width - lo)
        hi = min(above)
        return self.verify[hi] * width / hi

    def draft_cost(self) -> float:
        if self.draft is not None:
            return self.draft
        return self.draft_ratio * self.verify_cost(min(self.verify, default=1))

    def round_cost(self, k: int, acceptance: float) -> float:
        """Expected cost of a round with ``k`` drafts."""
        a = min(max(acceptance, 0.0), 0.99)
        forwards = max(k, 1) + (a**k if k > 0 else 0.0)
        return forwards * self.draft_cost() + self.verify_cost(k + 1)


def best_draft_length(
    acceptances: Sequence[float],
    round_cost: Callable[[int, float], float],
    longest: int = AUTO_LONGEST,
) -> int:
    """The draft length in ``0..longest`` that maximises the expected tokens of rows with
    these acceptance rates per unit of cost of their round (``k='auto'``; a batch's round
    costs what its longest draft costs); ``round_cost(k, acceptance)``: e.g.
    :meth:`RoundCosts.round_cost`, given the rows' mean acceptance."""
    mean = sum(acceptances) / len(acceptances)
    best, best_rate = 0, 0.0
    for k in range(longest + 1):
        tokens = sum(expected_tokens(a, k) for a in acceptances)
        rate = tokens / round_cost(k, mean)
        if rate > best_rate * (1 + 1e-9):
            best, best_rate = k, rate
    return best


def accept_draft(p: torch.Tensor, q: torch.Tensor, token: int, generator: Any) -> bool:
    """The speculative-sampling test: accept ``token`` (drawn from ``q``) with probability
    ``min(1, p[token] / q[token])``; ``p``, ``q`` are ``(V,)`` probabilities."""
    u = torch.rand((), generator=generator, device=p.device)
    return bool(u * q[token] < p[token])


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``max(0, p - q)`` (unnormalised), ``(V,)``: what a rejection draws from. It is never
    all zero after a rejection (that needs ``p[t] < q[t]`` somewhere); ``p`` guards rounding."""
    res = (p - q).clamp_min(0.0)
    return res if bool(res.sum() > 0) else p


def pick_drafter(pairs: Sequence[Pair], needs: Sequence[Sides]) -> Member | None:
    """The model that drafts: the first pair's expert (else the first expert the rule runs,
    else the first anti-expert it runs); ``None`` when the rule runs the base alone."""
    for side in (0, 1):
        for pair, sides in zip(pairs, needs, strict=True):
            member = (pair.expert, pair.anti_expert)[side]
            if member is not None and sides[side]:
                return member
    return None


def speculative_decode(
    prepared: Prepared,
    *,
    k: int | str = AUTO,
    stats: SpeculativeStats | None = None,
    clock: Callable[[], float] = time.perf_counter,
    overlap: bool = False,
) -> Iterator[list[StepUpdate]]:
    """:func:`~proxytune.engine.plain.decode` with speculative rounds: the same updates (one
    list per new token position; a round yields up to ``K + 1`` of them).

    ``k``: draft length (an int) or ``"auto"`` (per row, from its running acceptance rate and
    the measured cost of drafting and verifying: :class:`RoundCosts`; ``clock`` times them).
    ``stats``: filled in with acceptance counts as the iterator is consumed. ``overlap``: the
    verifiers (and the prefills) of different engines run at once (:mod:`proxytune.engine.overlap`).
    When the rule runs no pair model (``alpha=0``, the ``base`` rule) there is nothing to draft
    with and this is the plain loop.
    """
    k = parse_draft_length(k)
    drafter = pick_drafter(prepared.pairs, prepared.needs)
    if drafter is None:
        return decode(prepared, overlap)
    run = _Speculator(
        prepared=prepared,
        drafter=drafter,
        k=k,
        stats=stats if stats is not None else SpeculativeStats(),
        clock=clock,
        overlap=overlap,
    )
    return run.run(prepared.rows())


@dataclass
class _Speculator:
    prepared: Prepared
    drafter: Member
    k: int | str
    stats: SpeculativeStats
    clock: Callable[[], float] = time.perf_counter
    overlap: bool = False

    def __post_init__(self) -> None:
        p = self.prepared
        self.config = p.config
        self.vocab_size = p.vocab_size
        self.penalised = p.penalised
        self.device = p.device
        self.members = p.members
        self.verifiers = [m for m in self.members if m is not self.drafter]
        verify_size = sum(weight_size(m.model) for m in self.verifiers) or 1.0
        prior = RoundCosts(draft_ratio=weight_size(self.drafter.model) / verify_size)
        # Seeded sampling must give the same tokens on every run, batched or alone: its draft
        # lengths then come from each row's own acceptance history and the weight-size prior,
        # never from timings (which vary run to run) or from the other rows.
        self.reproducible = not self.config.greedy and self.config.seed is not None
        self.timed = self.k == AUTO and not self.reproducible
        self.costs = prior
        if self.timed:  # carry on from what earlier calls with the same stats measured
            if self.stats.costs is None:
                self.stats.costs = prior
            self.costs = self.stats.costs

    def _now(self) -> float:
        """The clock, after the device's queued work (CUDA runs asynchronously)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.clock()

    def _drafter_step(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """The drafter's logits after ``tokens`` (one forward), timed for ``auto``."""
        self.stats.draft_forwards += 1
        if not self.timed:
            return state.advance(tokens)[:, -1]
        t0 = self._now()
        out = state.advance(tokens)[:, -1]
        self.costs.observe_draft(self._now() - t0, 1)
        return out

    # the loop --------------------------------------------------------------------------------

    def run(self, rows: list[Row]) -> Iterator[list[StepUpdate]]:
        states, first = self._start(rows)
        rooms = [self.prepared.rooms[r.prompt_index] for r in rows]
        live = list(range(len(rows)))  # indices into rows / rooms / rates
        rates = [PRIOR] * len(rows)
        pending: torch.Tensor | None = None  # (B, 1): each row's last id, not yet fed
        while True:
            lengths = self._draft_lengths([rows[i] for i in live], [rooms[i] for i in live], rates)
            big_k = max(lengths)
            drafts, q, expert = self._draft(
                states, first, pending, [rows[i] for i in live], lengths
            )
            verified = self._verify(states, first, pending, drafts)
            self.stats.rounds += 1
            self.stats.row_rounds += len(live)

            accepted = [0] * len(live)
            done = [False] * len(live)
            last = [0] * len(live)
            active = list(range(len(live)))
            for j in range(big_k + 1):  # position j: the id after j accepted drafts
                if not active:
                    break
                if j == len(expert):  # some row accepted all K: score the bonus position
                    expert.append(self._drafter_step(states[self.drafter.role], drafts[:, j - 1 :]))
                logits = {self.drafter.role: expert[j][active]}
                for m in self.verifiers:
                    logits[m.role] = verified[m.role][active, j]
                scores, shaped = self._target(
                    [rows[live[n]] for n in active], j, drafts[active], logits
                )
                target = shaped if self.config.greedy else torch.softmax(shaped, dim=-1)
                picks = [
                    self._decide(rows[live[n]], target[a], q, drafts, n, j, lengths[n])
                    for a, n in enumerate(active)
                ]
                chosen = torch.tensor([t for t, _ in picks], device=self.device)
                records = records_for(
                    scores, chosen, self.config, self.prepared.base.model.tokenizer
                )
                updates, still = [], []
                for a, (n, (token, was_draft)) in enumerate(zip(active, picks, strict=True)):
                    row = rows[live[n]]
                    if j < lengths[n]:  # a tested draft: update the row's acceptance rate
                        rates[live[n]] += SMOOTHING * (float(was_draft) - rates[live[n]])
                    accepted[n] += was_draft
                    last[n] = token
                    record = records[a] if records else None
                    update = emit(row, token, record, self.prepared.eos, self.penalised)
                    updates.append(update)
                    if update.finish_reason is not None:
                        done[n] = True
                    elif was_draft:
                        still.append(n)
                self.stats.emitted += len(updates)
                yield updates
                active = still

            kept = [n for n in range(len(live)) if not done[n]]
            if not kept:
                return
            fed_drafter = len(expert) - 1  # drafts the drafter has consumed this round
            index = torch.tensor(kept, device=self.device)
            for role, state in states.items():
                if len(kept) < len(live):
                    state.keep(index)
                fed = fed_drafter if role == self.drafter.role else big_k
                rollback(state, torch.tensor([fed - accepted[n] for n in kept]))
            live = [live[n] for n in kept]
            pending = torch.tensor([[last[n]] for n in kept], device=self.device)

    # the steps -------------------------------------------------------------------------------

    def _start(
        self, rows: list[Row]
    ) -> tuple[dict[str, DecodeState], dict[str, torch.Tensor]]:
        """Prefill every model. The drafter runs ahead of the others, so a model that would
        batch it with another role is asked to keep it on its own."""
        states, first = start_all(
            self.members,
            self.prepared.rendered,
            rows,
            self.config.use_cache,
            self.overlap,
            self.drafter,
        )
        require_rollback(states, self.members)
        return states, first

    def _draft_lengths(self, rows: list[Row], rooms: list[int], rates: list[float]) -> list[int]:
        """Per row: how many drafts to test. Never more than the row can still emit minus one
        (its last token is the bonus), nor past any row's context (the batch feeds ``K``)."""
        left = [r.budget - len(r.ids) - 1 for r in rows]
        if self.k != AUTO:
            wanted = [int(self.k)] * len(rows)
        elif self.reproducible:
            cost = self.costs.round_cost
            wanted = [best_draft_length([rates[r.index]], cost) for r in rows]
        else:  # the batch pays for its longest draft: choose one length for every row
            big_k = best_draft_length([rates[r.index] for r in rows], self.costs.round_cost)
            wanted = [big_k] * len(rows)
        cap = min(room - len(r.ids) - 1 for r, room in zip(rows, rooms, strict=True))
        return [max(0, min(w, n, cap)) for w, n in zip(wanted, left, strict=True)]

    def _draft(
        self,
        states: dict[str, DecodeState],
        first: dict[str, torch.Tensor],
        pending: torch.Tensor | None,
        rows: list[Row],
        lengths: list[int],
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """``(B, K)`` drafts, their ``(B, V)`` draw distributions ``q_j`` and the drafter's
        ``(B, W)`` logits at positions ``0..K-1`` (one forward per token)."""
        big_k = max(lengths)
        state = states[self.drafter.role]
        if pending is None:
            expert = [first[self.drafter.role]]
        else:
            expert = [self._drafter_step(state, pending)]
        drafts = torch.zeros((len(rows), big_k), dtype=torch.long, device=self.device)
        q: list[torch.Tensor] = []
        for j in range(big_k):
            lp = log_probs(expert[j], self.vocab_size).to(self.device)
            probs = torch.softmax(self._shape(lp, rows, j, drafts), dim=-1)
            for n, row in enumerate(rows):
                if j < lengths[n] and not self.config.greedy:
                    drafts[n, j] = torch.multinomial(probs[n], 1, generator=row.generator)[0]
                else:  # greedy, or a filler past this row's draft length (never tested)
                    drafts[n, j] = probs[n].argmax()
            q.append(probs)
            if j + 1 < big_k:
                expert.append(self._drafter_step(state, drafts[:, j : j + 1]))
        return drafts, q, expert

    def _verify(
        self,
        states: dict[str, DecodeState],
        first: dict[str, torch.Tensor],
        pending: torch.Tensor | None,
        drafts: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Each verifier's ``(B, K+1, W)`` logits at positions ``0..K``, one forward each."""
        feed = drafts if pending is None else torch.cat([pending, drafts], dim=1)
        out = {}
        t0 = self._now() if self.timed else 0.0
        fed = advance_all(self.verifiers, states, feed, self.overlap) if feed.shape[1] else {}
        for m in self.verifiers:
            parts = [] if pending is not None else [first[m.role][:, None]]
            if feed.shape[1] > 0:
                parts.append(fed[m.role])
            out[m.role] = torch.cat([t.to(self.device) for t in parts], dim=1)
        if self.timed and feed.shape[1] > 0:
            self.costs.observe_verify(feed.shape[1], self._now() - t0)
        return out

    def _target(
        self,
        rows: list[Row],
        j: int,
        drafts: torch.Tensor,
        logits: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain loop's combined scores and sampling distribution at position ``j`` of
        ``rows``, ``(n, V)`` each: the rule runs once per group of rows at the same step (an
        alpha schedule, or the rule itself, may read the step)."""
        steps = [len(r.ids) + j for r in rows]
        scores = shaped = None
        for step in sorted(set(steps)):
            sub = [n for n, s in enumerate(steps) if s == step]
            index = torch.tensor(sub, device=self.device)
            part = {role: t[index.to(t.device)] for role, t in logits.items()}
            generated = [rows[n].ids + drafts[n, :j].tolist() for n in sub]
            got, _ = score(self.prepared, part, [rows[n] for n in sub], step, generated)
            shape = self._shape(got, [rows[n] for n in sub], j, drafts[index])
            if len(sub) == len(rows):
                return got, shape
            if scores is None or shaped is None:
                scores = got.new_empty((len(rows), got.shape[-1]))
                shaped = shape.new_empty((len(rows), shape.shape[-1]))
            scores[index], shaped[index] = got, shape
        assert scores is not None and shaped is not None
        return scores, shaped

    def _shape(
        self, scores: torch.Tensor, rows: list[Row], j: int, drafts: torch.Tensor
    ) -> torch.Tensor:
        """:func:`~proxytune.sampling.shape_scores` with each row's history plus its first
        ``j`` drafts."""
        history = None
        if self.penalised:
            history = [r.history + drafts[n, :j].tolist() for n, r in enumerate(rows)]
        return shape_scores(scores, **self.config.sampling(), history=history)

    def _decide(
        self,
        row: Row,
        target: torch.Tensor,
        q: list[torch.Tensor],
        drafts: torch.Tensor,
        n: int,
        j: int,
        length: int,
    ) -> tuple[int, bool]:
        """``(token to emit at position j, whether it was an accepted draft)`` for row ``n``;
        ``target``: the row's shaped scores (greedy) or probabilities ``p_j``, ``(V,)``."""
        if self.config.greedy:
            best = int(target.argmax())
            if j < length:
                self.stats.proposed += 1
                if int(drafts[n, j]) == best:
                    self.stats.accepted += 1
                    return best, True
            return best, False
        p = target
        if j < length:
            self.stats.proposed += 1
            token = int(drafts[n, j])
            if accept_draft(p, q[j][n], token, row.generator):
                self.stats.accepted += 1
                return token, True
            p = residual(p, q[j][n])
        return int(torch.multinomial(p, 1, generator=row.generator)[0]), False
