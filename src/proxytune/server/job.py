"""A request as the scheduler sees it: its rows, settings, bound rule and fate."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from ..config import GenerationConfig
from ..generation import Pair
from ..prompts import Prompt
from ..results import StepUpdate
from ..rules import Combiner, Sides


@dataclass(eq=False)
class Job:
    """One request's share of the batch: ``len(prompts) * config.n`` rows and their settings.

    Built (rendered, rule bound, validated) by :meth:`ContinuousBatch.prepare` before it is
    queued. ``cancel()`` may be called from any thread; the rows leave at the next step.
    """

    prompts: list[Prompt]
    rendered: dict[str, list[list[int]]]
    """Each running member's token ids for each prompt."""
    config: GenerationConfig
    pairs: list[Pair]
    """The tuner's pairs with this request's alphas."""
    needs: list[Sides]
    """Per pair, which sides run for this request."""
    combine: Combiner
    """The rule, bound to this request."""
    seed: int
    rooms: list[int]
    """Per prompt: the most new tokens every running member's context still holds."""
    cancelled: bool = False
    error: BaseException | None = None
    rows_left: int = 0
    steps: Iterator[list[StepUpdate]] | None = None
    """The engine's own iterator, when the job runs on :class:`~.serial.EngineLoop`."""

    @property
    def n_rows(self) -> int:
        return len(self.prompts) * self.config.n

    @property
    def prompt_tokens(self) -> list[int]:
        """Each prompt's length in the base model's tokens."""
        return [len(ids) for ids in self.rendered["base"]]

    @property
    def steered(self) -> bool:
        """Whether any pair model runs for this request."""
        return any(e or a for e, a in self.needs)

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
