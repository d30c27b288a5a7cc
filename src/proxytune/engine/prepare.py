"""One request made ready to decode: the rule bound, the models that run, the prompts rendered.

Every loop starts here (:func:`prepare`), so the checks a request gets (no prompts, empty or
too long prompts, the room left in each model's context, the end-of-sequence ids) are made
once, the same way, whatever loop then runs it.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import GenerationConfig
from ..errors import ConfigError, PromptTooLongError
from ..prompts import Prompt, TokenIds
from ..rules import Combiner, Request, Rule, Sides, make_rule
from .detokenize import TextTracker
from .members import Member, Pair


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
    return combine, needs, running_members(pairs, needs)


def running_members(pairs: Sequence[Pair], needs: Sequence[Sides]) -> list[Member]:
    """The pair members a request runs: those its rule reads."""
    return [
        m
        for p, (e, a) in zip(pairs, needs, strict=True)
        for m, used in ((p.expert, e), (p.anti_expert, a))
        if used and m is not None
    ]


def mask_needs(needs: Sequence[Sides], active: Sequence[bool] | None) -> list[Sides]:
    """What a request reads of each pair once switched-off pairs (``active``) are dropped."""
    if active is None:
        return list(needs)
    return [(e and on, a and on) for (e, a), on in zip(needs, active, strict=True)]


def render_prompts(
    members: Sequence[Member], prompts: Sequence[Prompt]
) -> dict[str, list[list[int]]]:
    """Each member's token ids for each prompt; checks emptiness and context length, and that
    every member reads token-id prompts (:class:`~proxytune.prompts.TokenIds`) verbatim."""
    rendered: dict[str, list[list[int]]] = {}
    by_ids = any(isinstance(p, TokenIds) for p in prompts)
    for member in members:
        if by_ids and not member.prompt.verbatim:
            raise ConfigError(
                f"prompt: token-id prompts are read verbatim by every model, but the "
                f"{member.role} ({member.model.name}) reads {member.prompt.label!r} prompts; "
                "send the prompt as text, or serve that model on the raw prompt format",
                param="prompt",
            )
        ids = [member.prompt.render(p, member.model.tokenizer) for p in prompts]
        limit = member.model.context_length
        for i, row in enumerate(ids):
            if not row:
                raise ConfigError(
                    f"prompt {i} is empty after tokenization for the {member.role} "
                    f"({member.model.name}); give a non-empty prompt",
                    param="prompt",
                )
            if limit is not None and len(row) >= limit:
                raise PromptTooLongError(
                    f"prompt {i} is {len(row)} tokens for the {member.role} "
                    f"({member.model.name}), whose context holds {limit}; shorten the prompt "
                    "to leave room for at least one new token"
                )
        rendered[member.role] = ids
    return rendered


def rooms_left(members: Sequence[Member], rendered: dict[str, list[list[int]]]) -> list[int]:
    """Per prompt: the most new tokens every member's context still holds."""
    n_prompts = len(rendered[members[0].role])
    return [
        min((m.model.context_length or 1 << 62) - len(rendered[m.role][p]) for m in members)
        for p in range(n_prompts)
    ]


def row_seed(seed: int, sample_index: int) -> int:
    """The seed of a row: depends on the call's seed and the sample number only, so a prompt
    gets the same samples whether it is generated alone or in a batch."""
    return (seed * 1_000_003 + sample_index) % (2**63 - 1)


@dataclass(eq=False)
class Row:
    """One sequence being generated (a prompt's sample)."""

    index: int
    prompt_index: int
    sample_index: int
    budget: int
    """The most tokens it may emit: ``max_new_tokens``, or less where a context is full."""
    tracker: TextTracker
    history: list[int]
    """Prompt and generated ids in the base's vocabulary (kept only for penalties)."""
    generator: torch.Generator | None

    @property
    def ids(self) -> list[int]:
        """The ids generated so far."""
        return self.tracker.ids


@dataclass
class Prepared:
    """A request bound to the models: everything a loop needs before the first forward."""

    base: Member
    pairs: list[Pair]
    """The pairs with this request's alphas."""
    needs: list[Sides]
    """Per pair, which sides run."""
    members: list[Member]
    """The base, then every pair member that runs."""
    combine: Combiner
    """The rule, bound to this request."""
    prompts: list[Prompt]
    rendered: dict[str, list[list[int]]]
    """Each running member's token ids for each prompt."""
    rooms: list[int]
    """Per prompt: the most new tokens every running member's context still holds."""
    eos: frozenset[int]
    """Ids that end a row (empty with ``ignore_eos``)."""
    config: GenerationConfig
    vocab_size: int
    seed: int
    device: torch.device = field(init=False)

    def __post_init__(self) -> None:
        self.device = self.base.model.device

    @property
    def penalised(self) -> bool:
        return self.config.penalised

    @property
    def steered(self) -> bool:
        """Whether any pair model runs."""
        return any(e or a for e, a in self.needs)

    @property
    def n_rows(self) -> int:
        return len(self.prompts) * self.config.n

    def rows(self, factory: Any = Row, **extra: Any) -> list[Any]:
        """One row per prompt and sample (prompt-major), built by ``factory`` (:class:`Row` or
        a subclass, given ``extra`` fields): budget, text tracker, penalty history, RNG."""
        cfg = self.config
        tokenizer = self.base.model.tokenizer
        rows = []
        for p in range(len(self.prompts)):
            for s in range(cfg.n):
                generator = None
                if not cfg.greedy:
                    generator = torch.Generator(device=self.device).manual_seed(
                        row_seed(self.seed, s)
                    )
                rows.append(
                    factory(
                        index=len(rows),
                        prompt_index=p,
                        sample_index=s,
                        budget=min(cfg.max_new_tokens, self.rooms[p]),
                        tracker=TextTracker(tokenizer, cfg.stop),
                        history=list(self.rendered[self.base.role][p]) if cfg.penalised else [],
                        generator=generator,
                        **extra,
                    )
                )
        return rows


def prepare(
    base: Member,
    pairs: Sequence[Pair],
    prompts: Sequence[Prompt],
    config: GenerationConfig,
    vocab_size: int,
    eos_token_ids: Sequence[int],
    rule: Rule | None = None,
    active: Sequence[bool] | None = None,
) -> Prepared:
    """Check, bind and render one request (nothing runs on the models here).

    ``rule``: a :class:`~proxytune.rules.Rule` (default: the paper's ``proxy``); ``active``:
    per pair, whether it may run at all (the server's ``active_pairs``).
    """
    if not prompts:
        raise ConfigError("no prompts given: pass at least one prompt")
    combine, needs, _ = plan(rule, base, pairs, prompts, vocab_size, eos_token_ids)
    needs = mask_needs(needs, active)
    members = [base, *running_members(pairs, needs)]
    rendered = render_prompts(members, prompts)
    return Prepared(
        base=base,
        pairs=list(pairs),
        needs=needs,
        members=members,
        combine=combine,
        prompts=list(prompts),
        rendered=rendered,
        rooms=rooms_left(members, rendered),
        eos=frozenset() if config.ignore_eos else frozenset(eos_token_ids),
        config=config,
        vocab_size=vocab_size,
        seed=config.seed if config.seed is not None else secrets.randbits(62),
    )
