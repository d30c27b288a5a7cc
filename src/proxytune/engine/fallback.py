"""Fallback: a request whose pair fails mid-decode finishes on the base or the expert alone.

A pair fails when a model's logits are not finite, its forward raises, or the combined scores
hold NaN. Under the policy ``fail`` the request fails (an error for it alone); under ``base``
its rows continue on the base's log-probs; under ``expert`` on the failing pair's expert's
(where the expert itself is the one that failed, on the base's). The tokens already emitted
stay; the request's :class:`FellBack` says where and why it changed course.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..arithmetic import check_finite
from ..errors import ConfigError, NumericalError
from ..prompts import PromptFormat, TokenIds
from ..rules import StepContext
from .capabilities import is_top_k_only
from .members import Member
from .prepare import Prepared, prepare

POLICIES = ("fail", "base", "expert")
REASONS = ("non_finite", "error")
"""Why a request fell back: non-finite log-probs or scores; a model raised."""


def check_policy(policy: str, where: str = "fallback") -> str:
    if policy not in POLICIES:
        raise ConfigError(f"{where} must be one of {list(POLICIES)}, got {policy!r}", param=where)
    return policy


@dataclass(frozen=True)
class FellBack:
    """Where a request went when its pair failed, and why."""

    to: str
    """``base`` or ``expert`` (the failing pair's expert)."""
    reason: str
    """One of :data:`REASONS`."""
    detail: str
    """The failure's one-line message."""
    step: int
    """The step (tokens emitted before it) from which the fallback decoded."""

    @classmethod
    def of(cls, to: str, err: BaseException, step: int) -> FellBack:
        """A request sent to ``to`` by ``err`` at ``step``: the reason and the one-line detail."""
        text = str(err).strip()
        return cls(to, reason_of(err), text.splitlines()[0] if text else type(err).__name__, step)

    def as_dict(self) -> dict[str, object]:
        return {
            "fell_back": self.to,
            "reason": self.reason,
            "detail": self.detail,
            "step": self.step,
        }


def failing_member(prepared: Prepared, logits: dict[str, torch.Tensor]) -> Member | None:
    """The first pair member whose logits are missing (its forward failed) or not finite."""
    for m in prepared.members[1:]:
        raw = logits.get(m.role)
        if raw is None:
            return m
        try:
            check_finite(raw, m.role)
        except NumericalError:
            return m
    return None


def reason_of(err: BaseException) -> str:
    return "non_finite" if isinstance(err, ArithmeticError) else "error"


def fallback_target(
    prepared: Prepared,
    policy: str,
    failed: Member | None = None,
    other_tokenizer: set[int] | frozenset[int] = frozenset(),
) -> tuple[int | None, Member] | None:
    """The one model that finishes a request whose pair broke, with its pair's index.

    Under ``expert``: the expert of the first pair that ran its expert for this request, that
    holds ``failed`` (where it is known) without being it, and that reads the base's tokenizer
    (``other_tokenizer``: the indices of pairs that do not). Otherwise, under ``base`` or
    ``expert``, the base (index ``None``) where it is local. ``None``: nothing takes over
    (``fail``, or an API base and no expert).
    """
    if policy == "expert":
        for i, (p, (runs_expert, _)) in enumerate(zip(prepared.pairs, prepared.needs, strict=True)):
            owns = failed is None or failed in p.members
            fits = i not in other_tokenizer and p.expert is not failed
            if p.expert is not None and runs_expert and owns and fits:
                return i, p.expert
    if policy in ("base", "expert") and not is_top_k_only(prepared.base.model):
        return None, prepared.base
    return None


def fallback_prepared(
    prepared: Prepared, policy: str, failed: Member | None
) -> tuple[Prepared, str] | None:
    """``prepared`` decoding on its :func:`fallback_target` alone, in the running batch, after
    ``failed`` (a pair member, or ``None`` where the combination failed) broke. Returns it and
    where it went (``base`` or ``expert``), or ``None`` where nothing takes over."""
    target = fallback_target(prepared, policy, failed)
    if target is None:
        return None
    index, member = target
    if index is None:
        needs = [(False, False)] * len(prepared.pairs)
        return _narrowed(prepared, [member], needs, _base_alone), "base"
    needs = [(j == index, False) for j in range(len(prepared.pairs))]
    return _narrowed(prepared, [prepared.base, member], needs, _expert_alone(index)), "expert"


def _narrowed(
    prepared: Prepared, members: list[Member], needs: list[tuple[bool, bool]], combine: object
) -> Prepared:
    return dataclasses.replace(
        prepared,
        members=members,
        needs=needs,
        combine=combine,  # type: ignore[arg-type]
        rendered={m.role: prepared.rendered[m.role] for m in members},
    )


def _base_alone(ctx: StepContext) -> torch.Tensor:
    return ctx.base


def _expert_alone(index: int):  # type: ignore[no-untyped-def]
    def combine(ctx: StepContext) -> torch.Tensor:
        expert = ctx.pairs[index][0]
        assert expert is not None
        return expert

    combine.label = f"expert[{index}] alone"  # type: ignore[attr-defined]
    return combine


# a request on the tuner's own loop (engine/serial.py) ------------------------------------------


def continuation(
    prepared: Prepared, member: Member, rows: list[int], generated: dict[int, list[int]]
) -> Prepared:
    """Rows ``rows`` of ``prepared`` continued on ``member`` alone, one prompt each: the row's
    prompt as that member rendered it, then the ids it generated so far, read verbatim."""
    n, tokenizer = prepared.config.n, member.model.tokenizer
    prompts = []
    for r in rows:
        ids = [*prepared.rendered[member.role][r // n], *generated.get(r, [])]
        prompts.append(TokenIds(ids, tokenizer.decode(ids)))
    done = max((len(generated.get(r, [])) for r in rows), default=0)
    config = prepared.config.updated(n=1, max_new_tokens=prepared.config.max_new_tokens - done)
    alone = Member("base", member.model, PromptFormat.parse("raw"))
    return prepare(alone, [], prompts, config, prepared.vocab_size, sorted(prepared.eos))
