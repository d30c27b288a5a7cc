"""One decode step, the same in every loop: log-probs -> rule -> sampling -> emitted token.

::

    logits (per running model)  --member_logprobs-->  (B, V) log-probs, checked finite
      (a pair model run on hidden states: its logits at the rule's candidates only,
       --candidate_logprobs--> (B, V) log-probs over them, -inf elsewhere)
    StepContext (base, pairs, alphas at this step, rows)  --checked_scores-->  (B, V) scores
    scores  --choose-->  one id per row  --emit-->  StepUpdate (text delta, finish)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..arithmetic import (
    PairLogprobs,
    candidate_log_probs,
    check_finite,
    log_probs,
    top_logprobs,
)
from ..config import GenerationConfig
from ..errors import NumericalError
from ..results import StepUpdate, TokenLogprob
from ..rules import CandidateCombiner, Combiner, Sides, StepContext
from ..sampling import next_tokens
from .capabilities import candidate_logits
from .members import Member, Pair
from .prepare import Prepared, Row


def member_logprobs(
    member: Member, raw: torch.Tensor, vocab_size: int, device: torch.device
) -> torch.Tensor:
    """A model's ``(B, W)`` logits as ``(B, V)`` log-probs on ``device``, checked finite."""
    check_finite(raw, f"{member.role} ({member.model.name})")
    return log_probs(raw, vocab_size).to(device)


def candidate_ids(combine: Combiner, base_lp: torch.Tensor) -> torch.Tensor:
    """The ``(n,)`` ids that are a candidate of some row at this step (one host sync), on the
    CPU, where a model scoring candidates reads them (the base may be on a GPU)."""
    assert isinstance(combine, CandidateCombiner)
    return combine.candidates(base_lp).any(dim=0).nonzero().flatten().cpu()


def candidate_logprobs(
    member: Member, hidden: torch.Tensor, ids: torch.Tensor, vocab_size: int, device: torch.device
) -> torch.Tensor:
    """A model's ``(B, V)`` log-probs over the candidate ``ids`` (``-inf`` elsewhere) from its
    ``(B, H)`` hidden states, checked finite."""
    raw = candidate_logits(member, hidden, ids)
    check_finite(raw, f"{member.role} ({member.model.name})")
    return candidate_log_probs(raw, ids, vocab_size).to(device)


def model_logprobs(
    base: Member,
    pairs: Sequence[Pair],
    needs: Sequence[Sides],
    logits: dict[str, torch.Tensor],
    vocab_size: int,
    device: torch.device,
    hidden: frozenset[str] = frozenset(),
    combine: Combiner | None = None,
) -> tuple[torch.Tensor, tuple[PairLogprobs, ...]]:
    """Each running model's ``(B, V)`` log-probs over the shared vocabulary, checked finite.

    Returns the base's and, per pair, ``(expert, anti-expert)`` with ``None`` for a side the
    rule does not read (so pair ``i`` stays at index ``i``). ``hidden``: roles whose entry in
    ``logits`` holds hidden states; they are scored at the candidates of ``combine`` (a
    :class:`~proxytune.rules.CandidateCombiner`) only.
    """
    base_lp = member_logprobs(base, logits[base.role], vocab_size, device)
    ids = candidate_ids(combine, base_lp) if hidden and combine is not None else None

    def lp(member: Member | None, used: bool) -> torch.Tensor | None:
        if member is None or not used:
            return None
        if member.role in hidden:
            assert ids is not None
            return candidate_logprobs(member, logits[member.role], ids, vocab_size, device)
        return member_logprobs(member, logits[member.role], vocab_size, device)

    pair_lps = tuple(
        (lp(p.expert, e), lp(p.anti_expert, a)) for p, (e, a) in zip(pairs, needs, strict=True)
    )
    return base_lp, pair_lps


def step_context(
    base_lp: torch.Tensor,
    pair_lps: tuple[PairLogprobs, ...],
    pairs: Sequence[Pair],
    step: int,
    prompt_index: Sequence[int],
    generated: list[list[int]],
    kind: type[StepContext] = StepContext,
    **extra: Any,
) -> StepContext:
    """What the rule sees at ``step``: log-probs, each pair's alpha at this step, and per row
    its prompt and the ids generated so far. ``kind`` and ``extra``: a richer context (the
    black-box loop's :class:`~proxytune.rules.TopKContext`)."""
    return kind(
        base=base_lp,
        pairs=pair_lps,
        alphas=tuple(p.alpha(step) for p in pairs),
        step=step,
        prompt_index=tuple(prompt_index),
        generated=generated,
        **extra,
    )


def checked_scores(combine: Combiner, ctx: StepContext) -> torch.Tensor:
    """Run the rule on ``ctx``; refuse NaN and rows where no token is left."""
    scores = combine(ctx)
    # one small (B,) reduction and one host sync decide; the full scans run only on a failure:
    # a row's max is NaN where the row holds a NaN, and -inf where every token is ruled out
    best = scores.amax(dim=-1)
    if not bool((torch.isnan(best) | torch.isneginf(best)).any()):
        return scores
    if torch.isnan(scores).any():
        label = _label(combine)
        raise NumericalError(
            f"the combined scores hold NaN at step {ctx.step}; check the settings of rule {label}"
        )
    empty = torch.isneginf(scores).all(dim=-1)
    if bool(empty.any()):
        row = int(empty.nonzero()[0])
        label = _label(combine)
        raise NumericalError(
            f"rule {label} left no possible token for row {row} at step {ctx.step}; loosen its "
            "filters (top-k, plausibility threshold, allow/block-lists) or check its alphas"
        )
    return scores


def _label(combine: Combiner) -> str:
    """The rule's name for an error message (only then: printing a rule is not free)."""
    return getattr(combine, "label", None) or getattr(combine, "__name__", "the rule")


def score(
    prepared: Prepared,
    logits: dict[str, torch.Tensor],
    rows: Sequence[Row],
    step: int,
    generated: list[list[int]] | None = None,
    hidden: frozenset[str] = frozenset(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step scorer of a request with full logits: ``(B, V)`` combined scores for ``rows``
    at ``step``, and the base's log-probs. ``logits``: each running role's ``(B, W)``, or
    ``(B, H)`` hidden states for the roles in ``hidden`` (scored at the rule's candidates)."""
    p = prepared
    base_lp, pair_lps = model_logprobs(
        p.base, p.pairs, p.needs, logits, p.vocab_size, p.device, hidden, p.combine
    )
    ids = [r.ids for r in rows] if generated is None else generated
    ctx = step_context(base_lp, pair_lps, p.pairs, step, [r.prompt_index for r in rows], ids)
    return checked_scores(p.combine, ctx), base_lp


def choose(scores: torch.Tensor, rows: Sequence[Row], config: GenerationConfig) -> torch.Tensor:
    """One id per row, sampled as ``config`` says (penalties read each row's history)."""
    return next_tokens(
        scores,
        **config.sampling(),
        history=[r.history for r in rows] if config.penalised else None,
        generators=None if config.greedy else [r.generator for r in rows],
    )


def logprob_records(
    scores: torch.Tensor, chosen: torch.Tensor, top: int, tokenizer: Any
) -> list[TokenLogprob]:
    """Each row's chosen token with its log-prob under ``scores`` and the ``top`` best
    alternatives."""
    found = top_logprobs(scores, chosen, top)
    convert = tokenizer.convert_ids_to_tokens
    out = []
    for r in range(chosen.shape[0]):
        ids = found.top_ids[r].tolist()
        alts = list(zip(ids, convert(ids), found.top_logprobs[r].tolist(), strict=True))
        tid = int(chosen[r])
        out.append(TokenLogprob(tid, convert(tid), float(found.chosen[r]), alts))
    return out


def records_for(
    scores: torch.Tensor, chosen: torch.Tensor, config: GenerationConfig, tokenizer: Any
) -> list[TokenLogprob] | None:
    """:func:`logprob_records` where ``config`` asks for log-probs, else ``None``."""
    if not config.logprobs:
        return None
    return logprob_records(scores, chosen, config.top_logprobs, tokenizer)


def emit(
    row: Row, token: int, record: TokenLogprob | None, eos: frozenset[int], penalised: bool
) -> StepUpdate:
    """Append ``token`` to ``row`` (penalty history, text tracker) and say whether it ended it
    (EOS, a stop string, the budget): the one place where rows finish."""
    if penalised:
        row.history.append(token)
    delta = row.tracker.push(token)
    finish, reason = finish_reason(row, token, eos)
    if finish is not None:
        delta += row.tracker.finish()
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


def finish_reason(row: Row, token: int, eos: frozenset[int]) -> tuple[str | None, str | int | None]:
    """``(finish reason, stop reason)`` after ``token`` was appended to ``row``."""
    if token in eos:
        return "stop", token
    if row.tracker.stopped:
        return "stop", row.tracker.stop_hit
    if len(row.tracker.ids) >= row.budget:
        return "length", None
    return None, None


def emit_all(
    prepared: Prepared,
    rows: Sequence[Row],
    chosen: torch.Tensor,
    records: list[TokenLogprob] | None,
) -> tuple[list[StepUpdate], list[int]]:
    """:func:`emit` for every row: the updates and the indices of rows still running."""
    updates, keep = [], []
    for i, (row, token) in enumerate(zip(rows, chosen.tolist(), strict=True)):  # one sync
        record = records[i] if records else None
        update = emit(row, token, record, prepared.eos, prepared.penalised)
        if update.finish_reason is None:
            keep.append(i)
        updates.append(update)
    return updates, keep
