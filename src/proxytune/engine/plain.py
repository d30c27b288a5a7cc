"""The plain decode loop: one fixed batch from prefill to the last token.

Every step: each running model scores its own sequence -> the step scorer
(:func:`~.step.score`: log-probs, rule) -> sampling picks one id per row -> that id is
appended to every model's sequence; rows that finish leave every model's batch. Text only
appears at the edges (prompt rendering, :class:`~proxytune.engine.detokenize.TextTracker`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from ..backends.base import DecodeState
from ..results import StepUpdate
from .capabilities import candidate_roles, returns_hidden, start_alone, start_member
from .members import Member
from .overlap import engine, run_grouped
from .prepare import Prepared, Row
from .step import choose, emit_all, records_for, score


def decode(
    prepared: Prepared, overlap: bool = False, candidates: bool = True
) -> Iterator[list[StepUpdate]]:
    """Generate every row of ``prepared``, yielding each step's new tokens.

    The models run as the iterator is consumed; closing it cancels the work. ``overlap``:
    models on different engines run their forwards at once (:mod:`proxytune.engine.overlap`; same
    output). ``candidates``: where the rule only re-ranks the base's candidates (``rerank``,
    ``plausible``), pair models that can stop before their output matrix are scored at the
    candidates only (the same tokens: docs/speed.md).
    """
    p = prepared
    rows = p.rows()
    wanted = candidate_roles(p.combine, p.members[1:]) if candidates else frozenset()
    states, logits = start_all(
        p.members, p.rendered, rows, p.config.use_cache, overlap, hidden=wanted
    )
    hidden = frozenset(role for role, state in states.items() if returns_hidden(state))
    live: list[Row] = rows
    step = 0
    while True:
        scores, _ = score(p, logits, live, step, hidden=hidden)
        chosen = choose(scores, live, p.config)
        records = records_for(scores, chosen, p.config, p.base.model.tokenizer)
        updates, keep = emit_all(p, live, chosen, records)
        yield updates
        if not keep:
            return
        if len(keep) < len(live):
            index = torch.tensor(keep, device=p.device)
            for state in states.values():
                state.keep(index)
            live = [live[i] for i in keep]
            chosen = chosen[index]
        logits = {
            role: out[:, -1]
            for role, out in advance_all(p.members, states, chosen.view(-1, 1), overlap).items()
        }
        step += 1


def start_all(
    members: Sequence[Member],
    rendered: dict[str, list[list[int]]],
    rows: Sequence[Row],
    use_cache: bool,
    overlap: bool = False,
    alone: Member | None = None,
    hidden: frozenset[str] = frozenset(),
) -> tuple[dict[str, DecodeState], dict[str, torch.Tensor]]:
    """Prefill every member on its rows' prompts (at once with ``overlap``): each member's
    decode state and next-token logits. ``alone`` (speculative decoding's drafter, which runs
    ahead of the others) is started on a state of its own; the roles in ``hidden`` on states
    that return hidden states where their model can (then so does the first output)."""

    def start(m: Member) -> Callable[[], tuple[DecodeState, torch.Tensor]]:
        prompt_ids = [rendered[m.role][r.prompt_index] for r in rows]
        if m is alone:
            return lambda: start_alone(m, prompt_ids, use_cache)
        return lambda: start_member(m, prompt_ids, use_cache, m.role in hidden)

    done = run_grouped([(engine(m.model), start(m)) for m in members], overlap)
    states = {m.role: state for m, (state, _) in zip(members, done, strict=True)}
    logits = {m.role: first for m, (_, first) in zip(members, done, strict=True)}
    return states, logits


def advance_all(
    members: Sequence[Member],
    states: dict[str, DecodeState],
    tokens: torch.Tensor,
    overlap: bool = False,
) -> dict[str, torch.Tensor]:
    """Feed ``tokens`` ``(B, K)`` to every member's state (at once with ``overlap``):
    ``(B, K, W)`` logits per role."""

    def key(m: Member) -> object:  # engines matter only when overlapping (keep the hot path)
        return engine(m.model) if overlap else None

    calls = [(key(m), lambda state=states[m.role]: state.advance(tokens)) for m in members]
    return {m.role: out for m, out in zip(members, run_grouped(calls, overlap), strict=True)}
