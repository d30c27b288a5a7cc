"""The decode loop: per-model prompts and caches, one shared list of generated ids per row.

Every step: each model scores its own sequence -> log-probs over the shared vocabulary ->
the rule combines them (:mod:`proxytune.rules`, a :class:`~proxytune.rules.StepContext` in,
``(B, V)`` scores out) -> sampling picks one id per row (:mod:`proxytune.sampling`) -> that id
is appended to every model's sequence. Text only appears at the edges (prompt rendering,
:class:`~proxytune.detokenize.TextTracker`). The rule says up front which models it reads;
the others are never run.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .arithmetic import PairLogprobs, check_finite, log_probs, top_logprobs
from .backends.base import DecodeState, LogitsModel
from .config import GenerationConfig
from .detokenize import TextTracker
from .errors import ConfigError, NumericalError, PromptTooLongError
from .overlap import engine, run_grouped
from .prompts import Prompt, PromptFormat
from .results import StepUpdate, TokenLogprob
from .rules import Combiner, PairInfo, Request, Rule, Sides, StepContext, make_rule
from .sampling import next_tokens
from .schedules import Constant, Schedule


@dataclass(frozen=True)
class Member:
    """A model in a role (base, expert or anti-expert) with the prompt format of that role."""

    role: str
    model: LogitsModel
    prompt: PromptFormat = field(default_factory=PromptFormat)


@dataclass(frozen=True)
class Pair:
    """An expert/anti-expert pair and its alpha schedule. One side may be ``None``."""

    expert: Member | None = None
    anti_expert: Member | None = None
    alpha: Schedule = field(default_factory=lambda: Constant(1.0))

    def __post_init__(self) -> None:
        if self.expert is None and self.anti_expert is None:
            raise ConfigError("a pair needs an expert, an anti-expert, or both")

    @property
    def members(self) -> list[Member]:
        return [m for m in (self.expert, self.anti_expert) if m is not None]

    @property
    def always_off(self) -> bool:
        """A constant zero alpha: under most rules the pair cannot change anything."""
        return isinstance(self.alpha, Constant) and self.alpha.alpha == 0.0

    @property
    def info(self) -> PairInfo:
        """What a rule may know about this pair before any model runs."""
        return PairInfo(self.expert is not None, self.anti_expert is not None, self.always_off)


def plan(
    rule: Rule | None,
    base: Member,
    pairs: Sequence[Pair],
    prompts: Sequence[Prompt],
    vocab_size: int,
    eos_token_ids: Sequence[int] = (),
) -> tuple[Combiner, list[Sides], list[Member]]:
    """Bind ``rule`` to one request: its step function, what it reads of each pair, and the
    pair members that must run (the base always runs)."""
    rule = make_rule(rule)
    request = Request(
        prompts=tuple(prompts),
        pairs=tuple(p.info for p in pairs),
        vocab_size=vocab_size,
        tokenizer=base.model.tokenizer,
        eos_token_ids=tuple(eos_token_ids),
        device=getattr(base.model, "device", None),
    )
    needs = list(rule.needs(request))
    combine = rule.bind(request)
    members = [
        m
        for p, (e, a) in zip(pairs, needs, strict=True)
        for m, used in ((p.expert, e), (p.anti_expert, a))
        if used and m is not None
    ]
    return combine, needs, members


@dataclass
class _Row:
    index: int
    prompt_index: int
    sample_index: int
    budget: int
    tracker: TextTracker
    history: list[int]
    generator: torch.Generator | None


def row_seed(seed: int, sample_index: int) -> int:
    """The seed of a row: depends on the call's seed and the sample number only, so a prompt
    gets the same samples whether it is generated alone or in a batch."""
    return (seed * 1_000_003 + sample_index) % (2**63 - 1)


def render_prompts(
    members: Sequence[Member], prompts: Sequence[Prompt]
) -> dict[str, list[list[int]]]:
    """Each member's token ids for each prompt; checks emptiness and context length."""
    rendered: dict[str, list[list[int]]] = {}
    for member in members:
        ids = [member.prompt.render(p, member.model.tokenizer) for p in prompts]
        limit = member.model.context_length
        for i, row in enumerate(ids):
            if not row:
                raise ConfigError(
                    f"prompt {i} is empty after tokenization for the {member.role} "
                    f"({member.model.name}); give a non-empty prompt"
                )
            if limit is not None and len(row) >= limit:
                raise PromptTooLongError(
                    f"prompt {i} is {len(row)} tokens for the {member.role} "
                    f"({member.model.name}), whose context holds {limit}; shorten the prompt "
                    "to leave room for at least one new token"
                )
        rendered[member.role] = ids
    return rendered


def make_rows(
    base: Member,
    members: Sequence[Member],
    rendered: dict[str, list[list[int]]],
    n_prompts: int,
    config: GenerationConfig,
    penalised: bool,
) -> list[_Row]:
    """One row per prompt and sample (prompt-major): its budget (``max_new_tokens``, or less
    where a model's context is nearly full), text tracker, penalty history and seeded RNG."""
    seed = config.seed if config.seed is not None else secrets.randbits(62)
    rows: list[_Row] = []
    for p in range(n_prompts):
        room = min((m.model.context_length or 1 << 62) - len(rendered[m.role][p]) for m in members)
        for s in range(config.n):
            gen = None
            if not config.greedy:
                gen = torch.Generator(device=base.model.device).manual_seed(row_seed(seed, s))
            rows.append(
                _Row(
                    index=len(rows),
                    prompt_index=p,
                    sample_index=s,
                    budget=min(config.max_new_tokens, room),
                    tracker=TextTracker(base.model.tokenizer, config.stop),
                    history=list(rendered[base.role][p]) if penalised else [],
                    generator=gen,
                )
            )
    return rows


def emit(
    row: _Row, token: int, record: TokenLogprob | None, eos: set[int], penalised: bool
) -> StepUpdate:
    """Append ``token`` to ``row`` (penalty history, text tracker) and say whether it ended it
    (EOS, a stop string, the budget): the one place where rows finish."""
    if penalised:
        row.history.append(token)
    delta = row.tracker.push(token)
    finish, reason = _finish(row, token, eos)
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


def decode(
    base: Member,
    pairs: Sequence[Pair],
    prompts: Sequence[Prompt],
    config: GenerationConfig,
    vocab_size: int,
    eos_token_ids: Sequence[int],
    rule: Rule | None = None,
    overlap: bool = False,
) -> Iterator[list[StepUpdate]]:
    """Generate for every prompt (x ``config.n``), yielding each step's new tokens.

    ``rule``: a :class:`~proxytune.rules.Rule` (default: the paper's ``proxy``). Prompts are
    rendered and checked and the rule is bound here, at once; the models run as the iterator
    is consumed. Rows that finish are dropped from every model's batch. Closing the iterator
    cancels the work. ``overlap``: models on different engines run their forwards at once
    (:mod:`proxytune.overlap`; same output).
    """
    if not prompts:
        raise ConfigError("no prompts given: pass at least one prompt")
    combine, needs, running = plan(rule, base, pairs, prompts, vocab_size, eos_token_ids)
    members = [base, *running]
    rendered = render_prompts(members, prompts)
    eos = set() if config.ignore_eos else set(eos_token_ids)
    penalised = config.penalised
    rows = make_rows(base, members, rendered, len(prompts), config, penalised)
    return _run(
        base,
        pairs,
        needs,
        members,
        rendered,
        rows,
        config,
        vocab_size,
        eos,
        penalised,
        combine,
        overlap,
    )


def _run(
    base: Member,
    pairs: Sequence[Pair],
    needs: Sequence[Sides],
    members: Sequence[Member],
    rendered: dict[str, list[list[int]]],
    rows: list[_Row],
    config: GenerationConfig,
    vocab_size: int,
    eos: set[int],
    penalised: bool,
    combine: Combiner,
    overlap: bool = False,
) -> Iterator[list[StepUpdate]]:
    """Prefill every model, then decode until every row has finished."""
    device = base.model.device
    states, logits = start_all(members, rendered, rows, config.use_cache, overlap)

    live = rows
    step = 0
    while True:
        base_lp, pair_lps = model_logprobs(base, pairs, needs, logits, vocab_size, device)
        ctx = StepContext(
            base=base_lp,
            pairs=pair_lps,
            alphas=tuple(p.alpha(step) for p in pairs),
            step=step,
            prompt_index=tuple(r.prompt_index for r in live),
            generated=[r.tracker.ids for r in live],
        )
        scores = checked_scores(combine, ctx)
        chosen = next_tokens(
            scores,
            **config.sampling(),
            history=[r.history for r in live] if penalised else None,
            generators=None if config.greedy else [r.generator for r in live],
        )
        records = _logprob_records(scores, chosen, config, base.model.tokenizer)
        updates, keep = [], []
        for i, row in enumerate(live):
            update = emit(row, int(chosen[i]), records[i] if records else None, eos, penalised)
            if update.finish_reason is None:
                keep.append(i)
            updates.append(update)
        yield updates
        if not keep:
            return
        if len(keep) < len(live):
            index = torch.tensor(keep, device=device)
            for state in states.values():
                state.keep(index)
            live = [live[i] for i in keep]
            chosen = chosen[index]
        next_ids = chosen.view(-1, 1)
        logits = {
            role: out[:, -1]
            for role, out in advance_all(members, states, next_ids, overlap).items()
        }
        step += 1


def start_all(
    members: Sequence[Member],
    rendered: dict[str, list[list[int]]],
    rows: Sequence[_Row],
    use_cache: bool,
    overlap: bool = False,
    alone: Member | None = None,
) -> tuple[dict[str, DecodeState], dict[str, torch.Tensor]]:
    """Prefill every member on its rows' prompts (at once with ``overlap``): each member's
    decode state and next-token logits. ``alone`` (speculative decoding's drafter, which runs
    ahead of the others) is started with ``start_alone`` where its model has one, so that it
    is not batched with another role."""

    def start(m: Member) -> Callable[[], tuple[DecodeState, torch.Tensor]]:
        prompt_ids = [rendered[m.role][r.prompt_index] for r in rows]
        begin = m.model.start
        if m is alone:
            begin = getattr(m.model, "start_alone", begin)
        return lambda: begin(prompt_ids, use_cache=use_cache)

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


def model_logprobs(
    base: Member,
    pairs: Sequence[Pair],
    needs: Sequence[Sides],
    logits: dict[str, torch.Tensor],
    vocab_size: int,
    device: torch.device,
) -> tuple[torch.Tensor, tuple[PairLogprobs, ...]]:
    """Each running model's ``(B, V)`` log-probs over the shared vocabulary, checked finite.

    Returns the base's and, per pair, ``(expert, anti-expert)`` with ``None`` for a side the
    rule does not read (so pair ``i`` stays at index ``i``).
    """

    def lp(member: Member | None, used: bool = True) -> torch.Tensor | None:
        if member is None or not used:
            return None
        raw = logits[member.role]
        check_finite(raw, f"{member.role} ({member.model.name})")
        return log_probs(raw, vocab_size).to(device)

    base_lp = lp(base)
    assert base_lp is not None
    pair_lps = tuple(
        (lp(p.expert, e), lp(p.anti_expert, a)) for p, (e, a) in zip(pairs, needs, strict=True)
    )
    return base_lp, pair_lps


def checked_scores(combine: Combiner, ctx: StepContext) -> torch.Tensor:
    """Run the rule on ``ctx``; refuse NaN and rows where no token is left."""
    scores = combine(ctx)
    label = getattr(combine, "label", None) or getattr(combine, "__name__", "the rule")
    if torch.isnan(scores).any():
        raise NumericalError(
            f"the combined scores hold NaN at step {ctx.step}; check the settings of rule {label}"
        )
    empty = torch.isneginf(scores).all(dim=-1)
    if bool(empty.any()):
        row = int(empty.nonzero()[0])
        raise NumericalError(
            f"rule {label} left no possible token for row {row} at step {ctx.step}; loosen its "
            "filters (top-k, plausibility threshold, allow/block-lists) or check its alphas"
        )
    return scores


def combined_scores(
    base: Member,
    pairs: Sequence[Pair],
    logits: dict[str, torch.Tensor],
    vocab_size: int,
    step: int,
    combine: Callable[..., torch.Tensor],
    device: torch.device,
) -> torch.Tensor:
    """Legacy entry point: ``combine(base_lp, pair_lps, alphas)`` on every pair's models.

    Kept for callers that have not moved to rules yet (``server/batch.py``); new code uses
    :func:`plan`, :func:`model_logprobs` and :func:`checked_scores`.
    """
    needs = [(p.expert is not None, p.anti_expert is not None) for p in pairs]
    base_lp, pair_lps = model_logprobs(base, pairs, needs, logits, vocab_size, device)
    ctx = StepContext(base_lp, pair_lps, tuple(p.alpha(step) for p in pairs), step)

    def legacy(c: StepContext) -> torch.Tensor:
        return combine(c.base, c.pairs, c.alphas)

    legacy.__name__ = getattr(combine, "__name__", "combine")
    return checked_scores(legacy, ctx)


def _logprob_records(
    scores: torch.Tensor, chosen: torch.Tensor, config: GenerationConfig, tokenizer: object
) -> list[TokenLogprob] | None:
    if not config.logprobs:
        return None
    top = top_logprobs(scores, chosen, config.top_logprobs)
    convert = tokenizer.convert_ids_to_tokens  # type: ignore[attr-defined]
    out = []
    for r in range(chosen.shape[0]):
        ids = top.top_ids[r].tolist()
        alts = list(zip(ids, convert(ids), top.top_logprobs[r].tolist(), strict=True))
        tid = int(chosen[r])
        out.append(TokenLogprob(tid, convert(tid), float(top.chosen[r]), alts))
    return out


def _finish(row: _Row, token: int, eos: set[int]) -> tuple[str | None, str | int | None]:
    """``(finish reason, stop reason)`` after ``token`` was appended to ``row``."""
    if token in eos:
        return "stop", token
    if row.tracker.stopped:
        return "stop", row.tracker.stop_hit
    if len(row.tracker.ids) >= row.budget:
        return "length", None
    return None, None
