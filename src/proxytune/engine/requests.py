"""A request's share of a server core, what a step reports, and :class:`RequestCore`: the one
contract the scheduler drives.

Two cores implement it: :class:`~.continuous.ContinuousBatch` (requests share one running
batch) and :class:`~.serial.EngineLoop` (each request runs the tuner's own loop, interleaved by
step). They share how a request is prepared (:meth:`RequestCore.prepare`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config import GenerationConfig
from ..prompts import Prompt
from ..results import StepUpdate
from .controls import Steerable, prepare_request
from .fallback import FellBack
from .members import Member
from .prepare import Prepared

__all__ = ["Job", "RequestCore", "SlotKey", "StepStats", "member_key"]

SlotKey = tuple[str, int]


def member_key(member: Member) -> SlotKey:
    """Which decode state holds a member's rows: its role and its model object. A pair swapped
    in under the same role (:meth:`~proxytune.tuner.ProxyTuner.adopt`) gets its own
    state, so rows that started on the old pair finish on it."""
    return member.role, id(member.model)


@dataclass(eq=False)
class Job:
    """One request's share of the batch: ``len(prompts) * config.n`` rows and their settings.

    Prepared (rendered, rule bound, validated) before it is queued. ``cancel()`` may be called
    from any thread; the rows leave at the next step.
    """

    prepared: Prepared
    steps: Iterator[list[StepUpdate]] | None = None
    """The engine's own iterator, when the job runs on the server's ``EngineLoop``."""
    cancelled: bool = False
    error: BaseException | None = None
    rows_left: int = 0
    fallback: str = "fail"
    """What to do when a pair fails mid-decode (:mod:`~proxytune.engine.fallback`)."""
    fell_back: FellBack | None = None
    """Set once the request left its pair for its fallback."""

    @property
    def prompts(self) -> list[Prompt]:
        return self.prepared.prompts

    @property
    def config(self) -> GenerationConfig:
        return self.prepared.config

    @property
    def rendered(self) -> dict[str, list[list[int]]]:
        """Each running member's token ids for each prompt."""
        return self.prepared.rendered

    @property
    def rooms(self) -> list[int]:
        """Per prompt: the most new tokens every running member's context still holds."""
        return self.prepared.rooms

    @property
    def n_rows(self) -> int:
        return self.prepared.n_rows

    @property
    def prompt_tokens(self) -> list[int]:
        """Each prompt's length in the base model's tokens."""
        return [len(ids) for ids in self.prepared.rendered[self.prepared.base.role]]

    @property
    def steered(self) -> bool:
        """Whether any pair model runs for this request."""
        return self.prepared.steered

    @property
    def keys(self) -> frozenset[SlotKey]:
        """The decode states (:func:`member_key`) this request's rows run in."""
        return frozenset(member_key(m) for m in self.prepared.members)

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class StepStats:
    """What one step did (for metrics)."""

    rows: int = 0
    kl_sum: float = 0.0
    kl_rows: int = 0
    drafts_proposed: int = 0
    """Speculative drafts tested against the target in this step."""
    drafts_accepted: int = 0
    failed: list[Job] = field(default_factory=list)
    fallbacks: list[Job] = field(default_factory=list)
    """Jobs that fell back in this step."""
    pairs: dict[str, list[float]] = field(default_factory=dict)
    """Per pair name: sums of KL, changed top tokens, entropy, and the rows they cover."""


class RequestCore(Protocol):
    """What the server's scheduler drives: requests in (:meth:`prepare`), one step of every
    running request out (:meth:`step`). Not thread-safe: one worker thread drives it, except
    :meth:`prepare`, which touches no model."""

    tuner: Steerable
    stats: StepStats
    """What the last step did."""
    deferred: list[Job]
    """Jobs the last step could not admit; the scheduler queues them again, at the front."""

    @property
    def live_rows(self) -> int:
        """Rows still decoding (not finished, cancelled or failed)."""
        ...

    @property
    def can_join(self) -> bool:
        """Whether new rows can be admitted at the next step."""
        ...

    def step(self, new_jobs: Sequence[Job] = ()) -> list[tuple[Job, StepUpdate]]:
        """Admit ``new_jobs``, then advance every running request by one step."""
        ...

    def retire(self) -> None:
        """Let go of finished, cancelled and failed requests (their caches or loops)."""
        ...

    def reset(self) -> None:
        """Forget every request (after a failed step); the models keep their weights."""
        ...

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
        the tuner's own rule); see :func:`~proxytune.engine.controls.prepare_request`.
        """
        return self.job(prepare_request(self.tuner, prompts, config, alpha, active_pairs, rule))

    def job(self, prepared: Prepared) -> Job:
        """The queued form of a prepared request."""
        return Job(prepared)
