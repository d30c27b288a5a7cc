"""Short-answer weak-to-strong reranking: a system that picks among finished answers.

Candidates per prompt: the base's, the expert's and the proxy's greedy answers, plus the base's
next ``k`` first tokens (ranks 1..k; rank 0 is its own answer) each completed greedily by it
(the engine has no beam search: these stand in for a few base beams). The pick is::

    argmax_y  log p_M(y | x) + beta * (log p_E(y | x) - log p_A(y | x))

with each model's sequence log-prob scored teacher-forced (:func:`~.scoring.score_ids`) on
the candidate's generated ids (an EOS that ended it included), each model on its own prompt
format. Ties go to the earlier candidate (base, expert, proxy, then the first-token ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from ..rules import Base, StepContext
from .scoring import ContinuationScore, render, score, score_ids
from .systems import _rule_spec

if TYPE_CHECKING:
    from ..results import GenerationResult
    from ..tuner import ProxyTuner

SOURCES = ("base", "expert", "proxy")


def rerank_objective(
    base: torch.Tensor, expert: torch.Tensor, anti: torch.Tensor, beta: float
) -> torch.Tensor:
    """``(N,)`` sequence log-probs of each model -> ``(N,)`` scores
    ``log p_M + beta (log p_E - log p_A)``.

    >>> rerank_objective(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]),
    ...                  torch.tensor([-2.0, -2.0]), 1.0)
    tensor([-2., -1.])
    """
    return base + beta * (expert - anti)


def pick(scores: torch.Tensor, groups: Sequence[int]) -> list[int]:
    """The index of the best score in each group: ``groups[i]`` is candidate ``i``'s prompt;
    ties go to the earlier candidate. Returns one index per prompt, in prompt order.

    >>> pick(torch.tensor([0.5, 2.0, 2.0, -1.0]), [0, 0, 0, 1])
    [1, 3]
    """
    best: dict[int, int] = {}
    for i, g in enumerate(groups):
        if g not in best or scores[i] > scores[best[g]]:
            best[g] = i
    return [best[g] for g in sorted(best)]


@dataclass(frozen=True, kw_only=True)
class FirstToken(Base):
    """The base alone, with each row's first token forced (``first[prompt]``): completes the
    base's alternative first tokens greedily. Not registered: a helper of reranking."""

    name = "first_token"
    first: tuple[int, ...] = ()

    def step(self, ctx: StepContext, state: Any) -> torch.Tensor:
        if ctx.step > 0:
            return ctx.base
        ids = torch.tensor([self.first[p] for p in ctx.prompt_index], device=ctx.base.device)
        forced = torch.full_like(ctx.base, float("-inf"))
        return forced.scatter_(-1, ids[:, None], 0.0)


@dataclass
class Candidate:
    """One finished answer to one prompt, where it came from, and its rerank score."""

    source: str
    """``base``, ``expert``, ``proxy`` or ``first[j]`` (the base's first token of rank ``j``,
    0 = best, completed greedily; ``first[0]`` is the base's own answer and is not repeated)."""
    result: GenerationResult
    base: float = 0.0
    expert: float = 0.0
    anti: float = 0.0
    score: float = 0.0


@dataclass
class RerankSystem:
    """A system (like :class:`~.systems.System`) that answers with the reranked candidate.

    ``tuner`` holds the base and one pair (expert, anti-expert); ``alpha`` is the proxy
    candidate's (``None``: the tuner's), ``beta`` the rerank weight, ``k`` how many of the
    base's alternative first tokens (ranks 1..k) are completed (0: none).
    """

    name: str
    tuner: ProxyTuner
    beta: float = 1.0
    k: int = 3
    alpha: Any = None
    rule: Any = None
    """The proxy candidate's rule (``None``: the tuner's)."""
    role: str = "other"
    made: dict[Any, tuple[Any, list[list[Candidate]]]] | None = field(default=None, repr=False)
    """Candidates already made (with the tuner that made them), shared by systems that differ
    only in ``beta`` (a sweep): made and scored once per batch; only the pick is redone."""

    def __post_init__(self) -> None:
        pairs = self.tuner.pairs
        if len(pairs) != 1 or pairs[0].expert is None or pairs[0].anti_expert is None:
            raise ConfigError(
                f"rerank system {self.name!r} needs a tuner with one pair of expert and "
                f"anti-expert; it has {len(pairs)} pair(s)"
            )
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)):
            raise ConfigError(f"rerank beta must be a number, got {self.beta!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ConfigError(f"rerank k must be an integer >= 0, got {self.k!r}")

    def candidates(self, prompts: Sequence[str], **settings: Any) -> list[list[Candidate]]:
        """Every prompt's candidates, scored; ``settings`` as for generation (greedy)."""
        prompts = list(prompts)
        if settings.get("n", 1) != 1 or settings.get("temperature", 0.0) != 0.0:
            raise ConfigError(
                "the rerank system decodes greedily with one answer per prompt; drop n and "
                "temperature from its settings"
            )
        key = (self.k, repr(self._alpha()), tuple(prompts), repr(sorted(settings.items())))
        made = None if self.made is None else self.made.get(key)
        if made is not None and made[0] is self.tuner:
            return [[self._rescored(c) for c in cands] for cands in made[1]]
        per_prompt = self._made(prompts, settings)
        if self.made is not None:
            self.made[key] = (self.tuner, per_prompt)
        return per_prompt

    def _rescored(self, c: Candidate) -> Candidate:
        """``c`` scored at this system's beta (its sequence log-probs do not depend on it)."""
        sums = (torch.tensor([x], dtype=torch.float64) for x in (c.base, c.expert, c.anti))
        return replace(c, score=float(rerank_objective(*sums, float(self.beta))))

    def _made(self, prompts: list[str], settings: dict[str, Any]) -> list[list[Candidate]]:
        t = self.tuner
        expert_role = t.pairs[0].expert.role  # type: ignore[union-attr]
        runs = [
            ("base", t.alone("base").generate(prompts, **settings)),
            ("expert", t.alone(expert_role).generate(prompts, **settings)),
            ("proxy", t.generate(prompts, **self._alpha(), **settings)),
        ]
        per_prompt: list[list[Candidate]] = [[] for _ in prompts]
        for source, results in runs:
            for r in results:
                per_prompt[r.prompt_index].append(Candidate(source, r))
        for j, r in self._first_tokens(prompts, settings):
            per_prompt[r.prompt_index].append(Candidate(f"first[{j}]", r))
        self._score(prompts, per_prompt)
        return per_prompt

    def generate(self, prompts: Sequence[str], **settings: Any) -> list[GenerationResult]:
        """The best candidate of each prompt (its ``prompt_index`` that of the prompt)."""
        per_prompt = self.candidates(prompts, **settings)
        flat = [c for cands in per_prompt for c in cands]
        groups = [i for i, cands in enumerate(per_prompt) for _ in cands]
        chosen = pick(torch.tensor([c.score for c in flat]), groups)
        return [flat[i].result for i in chosen]

    def score(
        self, prompts: Sequence[str], continuations: Sequence[str], batch_size: int = 8
    ) -> list[ContinuationScore]:
        """Token scores of a given answer under the proxy candidate's distribution (reranking
        itself has no per-token distribution)."""
        return score(self.tuner, prompts, continuations, **self._alpha(), batch_size=batch_size)

    def describe(self) -> dict[str, Any]:
        """What produced this system's results (saved beside them; compared on resume)."""
        return {
            "name": self.name,
            "role": self.role,
            "kind": "rerank",
            "beta": self.beta,
            "k": self.k,
            "alpha": self.alpha,
            "rule": _rule_spec(self.rule if self.rule is not None else self.tuner.rule),
            "models": [
                {"role": m.role, "model": m.model.name, "prompt": repr(m.prompt)}
                for m in self.tuner.members
            ],
        }

    # -- the steps ---------------------------------------------------------------------------

    def _alpha(self) -> dict[str, Any]:
        out = {} if self.alpha is None else {"alpha": self.alpha}
        return out if self.rule is None else {**out, "rule": self.rule}

    def _first_tokens(
        self, prompts: list[str], settings: dict[str, Any]
    ) -> list[tuple[int, GenerationResult]]:
        """The base's 2nd to ``k + 1``-th best first tokens of each prompt, each completed
        greedily by it."""
        if self.k == 0:
            return []
        base = self.tuner.alone("base")
        firsts = base.generate(prompts, max_new_tokens=1, logprobs=True, top_logprobs=self.k + 1)
        tops = [[alt[0] for alt in r.logprobs[0].top] for r in firsts]  # type: ignore[index]
        # the best first token completed greedily is the base's own answer: skip it
        rows = [(p, j, tid) for p, ids in enumerate(tops) for j, tid in enumerate(ids) if j]
        out: list[tuple[int, GenerationResult]] = []
        # k rows per prompt: run them in batches no larger than the caller's, which fits the
        # backend (a llama.cpp context holds a bounded number of rows at once)
        for start in range(0, len(rows), len(prompts)):
            chunk = rows[start : start + len(prompts)]
            rule = FirstToken(first=tuple(tid for _, _, tid in chunk))
            done = base.generate([prompts[p] for p, _, _ in chunk], rule=rule, **settings)
            out += [
                (chunk[r.prompt_index][1], replace(r, prompt_index=chunk[r.prompt_index][0]))
                for r in done
            ]
        return out

    def _score(self, prompts: list[str], per_prompt: list[list[Candidate]]) -> None:
        """Each candidate's base, expert and anti-expert sequence log-probs and its score."""
        t = self.tuner
        pair = t.pairs[0]
        roles = (t.base.role, pair.expert.role, pair.anti_expert.role)  # type: ignore[union-attr]
        flat = [(i, c) for i, cands in enumerate(per_prompt) for c in cands]
        rendered = [render(t, p) for p in prompts]
        scored = score_ids(
            t,
            [rendered[i] for i, _ in flat],
            [c.result.token_ids for _, c in flat],
            prompts=[prompts[i] for i, _ in flat],
            detail=True,
        )
        sums = torch.tensor(
            [[sum(tok.model_logprobs[r] for tok in s.tokens) for r in roles] for s in scored],
            dtype=torch.float64,
        ).reshape(len(flat), 3)
        total = rerank_objective(sums[:, 0], sums[:, 1], sums[:, 2], float(self.beta))
        for (_, c), (b, e, a), s in zip(flat, sums.tolist(), total.tolist(), strict=True):
            c.base, c.expert, c.anti, c.score = b, e, a, s
