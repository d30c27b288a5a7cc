"""Teacher-forced scoring: the log-likelihood of a given continuation under a tuner's
combined distribution, token by token, exactly as generation scores the tokens it picks.

For a prompt x and continuation y_1..y_T, every model reads its own rendering of x (the
expert its chat template, say) followed by y_<j, and at each position j the tuner's rule
combines their log-probs into the distribution that generation would sample from::

    log p(y_j | x, y_<j) = log_softmax(rule(log p_base, (log p_E_i, log p_A_i), alpha_i(j)))[y_j]

The models run once over the whole continuation (one prefill, then all positions in one
forward pass per chunk), not once per token. Multiple-choice tasks, the gold-answer
likelihood and lm-eval's ``loglikelihood`` requests all use :func:`score`;
:mod:`proxytune.analysis` reads the per-model details (``detail=True``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..arithmetic import log_probs
from ..engine.members import Member
from ..engine.prepare import mask_needs, plan
from ..engine.step import checked_scores, model_logprobs, step_context
from ..errors import ConfigError, PromptTooLongError
from ..prompts import Prompt

if TYPE_CHECKING:
    from ..tuner import ProxyTuner

MEMORY_BUDGET = 1 << 27
"""Most logits (floats) held at once per chunk of positions: 512 MiB in float32."""


@dataclass
class TokenScore:
    """One continuation token under the combined distribution (details with ``detail=True``)."""

    token_id: int
    logprob: float
    """log p_combined of this token."""
    greedy: bool
    """The token is the combined distribution's most likely one (ties count as greedy)."""
    model_logprobs: dict[str, float] = field(default_factory=dict)
    """Per role (``base``, ``expert[0]``, ``anti_expert[0]``, ...): log p of this token."""
    rank: int | None = None
    """Rank of the token under the combined distribution (0 = most likely)."""
    model_ranks: dict[str, int] = field(default_factory=dict)
    kl_base_combined: float | None = None
    """KL(p_base || p_combined) at this position, in nats (``inf`` where the rule masks a
    token the base allows)."""
    kl_combined_base: float | None = None
    """KL(p_combined || p_base) in nats (finite whenever the base has full support)."""
    top: list[tuple[int, float]] = field(default_factory=list)
    """The combined distribution's most likely ``(id, logprob)`` at this position (``top``)."""
    top_base: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class ContinuationScore:
    """A scored continuation: its tokens and their sum."""

    token_ids: list[int]
    tokens: list[TokenScore]

    @property
    def logprob(self) -> float:
        """Sum of the tokens' log-probabilities (0.0 for an empty continuation)."""
        return float(sum(t.logprob for t in self.tokens))

    @property
    def greedy(self) -> bool:
        """Greedy decoding would have produced exactly this continuation."""
        return all(t.greedy for t in self.tokens)


def prefix_id(tuner: ProxyTuner) -> int:
    """The token that stands for an empty context: BOS if the tokenizer has one, else EOS."""
    tok = tuner.tokenizer
    for value in (getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None)):
        if value is not None:
            return int(value)
    if tuner.eos_token_ids:
        return int(tuner.eos_token_ids[0])
    raise ConfigError("the tokenizer has neither a BOS nor an EOS token to stand for no context")


def encode(tuner: ProxyTuner, text: str) -> list[int]:
    """``text`` in the base tokenizer's ids, without special tokens."""
    return list(tuner.tokenizer(text, add_special_tokens=False)["input_ids"])


def render(tuner: ProxyTuner, prompt: Prompt) -> dict[str, list[int]]:
    """Each member's ids for ``prompt`` in its own prompt format (an empty prompt -> the prefix
    token, so that the first continuation token has something to be predicted from)."""
    out = {}
    for m in tuner.members:
        ids = m.prompt.render(prompt, m.model.tokenizer)
        out[m.role] = ids or [prefix_id(tuner)]
    return out


def score(
    tuner: ProxyTuner,
    prompts: Sequence[Prompt],
    continuations: Sequence[str],
    *,
    alpha: Any = None,
    rule: Any = None,
    detail: bool = False,
    top: int = 0,
    batch_size: int = 8,
) -> list[ContinuationScore]:
    """Score each ``continuations[i]`` after ``prompts[i]``; the continuation is tokenized on
    its own with the base tokenizer, as generation appends tokens after each rendered prompt.

    ``alpha`` and ``rule`` override the tuner's, as in :meth:`ProxyTuner.generate`.
    ``detail`` adds every member's log-prob and rank, the KLs and the base's ``top``
    alternatives; the combined distribution's ``top`` alternatives come with or without it.

    >>> score(tuner, ["Q: 2+2?\\nA:"], [" 4"])[0].logprob  # doctest: +SKIP
    -0.31
    """
    if len(prompts) != len(continuations):
        raise ConfigError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    rendered = [render(tuner, p) for p in prompts]
    ids = [encode(tuner, c) for c in continuations]
    return score_ids(
        tuner,
        rendered,
        ids,
        prompts=list(prompts),
        alpha=alpha,
        rule=rule,
        detail=detail,
        top=top,
        batch_size=batch_size,
    )


def score_ids(
    tuner: ProxyTuner,
    prompt_ids: Sequence[Mapping[str, Sequence[int]] | Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    prompts: Sequence[Prompt] | None = None,
    alpha: Any = None,
    rule: Any = None,
    active: Sequence[bool] | None = None,
    detail: bool = False,
    top: int = 0,
    batch_size: int = 8,
) -> list[ContinuationScore]:
    """:func:`score` on token ids: ``prompt_ids[i]`` maps each role to its prompt ids (a plain
    list of ids is used for every role); ``prompts`` (the text) is only shown to rules.
    ``active``: per pair, whether it may run (the server's ``active_pairs``)."""
    return score_sweep(
        tuner,
        prompt_ids,
        continuations,
        [alpha],
        prompts=prompts,
        rule=rule,
        active=active,
        detail=detail,
        top=top,
        batch_size=batch_size,
    )[0]


def score_sweep(
    tuner: ProxyTuner,
    prompt_ids: Sequence[Mapping[str, Sequence[int]] | Sequence[int]],
    continuations: Sequence[Sequence[int]],
    alphas: Sequence[Any],
    *,
    prompts: Sequence[Prompt] | None = None,
    rule: Any = None,
    active: Sequence[bool] | None = None,
    detail: bool = False,
    top: int = 0,
    batch_size: int = 8,
) -> list[list[ContinuationScore]]:
    """:func:`score_ids` at several alphas for the price of one: the models run once and only
    the (cheap) combination is repeated per alpha. Returns one list of scores per alpha."""
    if len(prompt_ids) != len(continuations):
        raise ConfigError(f"{len(prompt_ids)} prompts but {len(continuations)} continuations")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if not alphas:
        raise ConfigError("give at least one alpha (None: the tuner's)")
    variants = [tuner._pairs_with(a) for a in alphas]
    bound_rule = tuner.rule if rule is None else tuner._checked_rule(rule)
    roles = [m.role for m in tuner.members]
    per_role = [{r: list(p[r] if isinstance(p, Mapping) else p) for r in roles} for p in prompt_ids]
    texts = list(prompts) if prompts is not None else [""] * len(per_role)
    out = [[ContinuationScore([], []) for _ in continuations] for _ in variants]
    todo = [i for i, c in enumerate(continuations) if len(c) > 0]
    for start in range(0, len(todo), batch_size):
        rows = todo[start : start + batch_size]
        scored = _score_batch(
            tuner,
            variants,
            bound_rule,
            [per_role[i] for i in rows],
            [list(continuations[i]) for i in rows],
            [texts[i] for i in rows],
            detail,
            top,
            active,
        )
        for k, per_variant in enumerate(scored):
            for i, s in zip(rows, per_variant, strict=True):
                out[k][i] = s
    return out


def _score_batch(
    tuner: ProxyTuner,
    variants: Sequence[Sequence[Any]],
    rule: Any,
    prompt_ids: list[dict[str, list[int]]],
    conts: list[list[int]],
    prompts: list[Prompt],
    detail: bool,
    top: int,
    active: Sequence[bool] | None = None,
) -> list[list[ContinuationScore]]:
    """Score one batch under each variant (the pairs with one alpha each)."""
    vocab = tuner.vocab_size
    base = tuner.base
    plans = []
    for pairs in variants:
        combine, needs, _ = plan(rule, base, pairs, prompts, vocab, tuner.eos_token_ids)
        plans.append((combine, mask_needs(needs, active)))
    members: list[Member] = [base]
    for i, pair in enumerate(tuner.pairs):  # pair order, as the decode loop runs them
        for side, m in enumerate((pair.expert, pair.anti_expert)):
            if m is not None and (detail or any(needs[i][side] for _, needs in plans)):
                members.append(m)
    for m in members:
        _check_length(m, prompt_ids, conts)
    device = base.model.device
    rows, longest = len(conts), max(len(c) for c in conts)
    padded = torch.zeros((rows, longest), dtype=torch.long)
    for i, c in enumerate(conts):
        padded[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    width = max(m.model.vocab_width for m in members)
    chunk = max(1, MEMORY_BUDGET // (rows * width * len(members)))

    states, window = {}, {}
    for m in members:  # every model starts before any advances (one-pass LoRA pairs merge)
        states[m.role], last = m.model.start([p[m.role] for p in prompt_ids], use_cache=True)
        window[m.role] = last[:, None]
    results: list[list[list[TokenScore]]] = [[[] for _ in conts] for _ in variants]
    pos = 0
    while pos < longest:
        size = next(iter(window.values())).shape[1]
        for offset in range(size):
            j = pos + offset
            live = [i for i in range(rows) if len(conts[i]) > j]
            index = torch.tensor(live, device=device)
            logits = {role: w[:, offset].to(device)[index] for role, w in window.items()}
            targets = torch.tensor([conts[i][j] for i in live], device=device)
            for k, (pairs, (combine, needs)) in enumerate(zip(variants, plans, strict=True)):
                base_lp, pair_lps = model_logprobs(base, pairs, needs, logits, vocab, device)
                generated = [conts[i][:j] for i in live]
                ctx = step_context(base_lp, pair_lps, pairs, j, live, generated)
                scores = torch.log_softmax(checked_scores(combine, ctx).float(), dim=-1)
                extra = None
                if detail:
                    extra = _details(members, logits, base_lp, scores, targets, vocab, top)
                best = _top(scores, top) if top and not detail else None
                chosen = scores.gather(-1, targets[:, None]).squeeze(-1)
                greedy = chosen >= scores.max(dim=-1).values
                for r, i in enumerate(live):
                    token = TokenScore(int(targets[r]), float(chosen[r]), bool(greedy[r]))
                    if extra is not None:
                        extra(r, token)
                    if best is not None:
                        token.top = best[r]
                    results[k][i].append(token)
        pos += size
        if pos < longest:
            step = min(chunk, longest - pos)
            feed = padded[:, pos - 1 : pos - 1 + step]
            window = {role: states[role].advance(feed) for role in window}
    return [
        [ContinuationScore(c, r) for c, r in zip(conts, per_variant, strict=True)]
        for per_variant in results
    ]


def _check_length(member: Member, prompt_ids: list[dict[str, list[int]]], conts: list[list[int]]):
    limit = member.model.context_length
    if limit is None:
        return
    for p, c in zip(prompt_ids, conts, strict=True):
        needed = len(p[member.role]) + len(c) - 1
        if needed > limit:
            raise PromptTooLongError(
                f"prompt ({len(p[member.role])} tokens) + continuation ({len(c)} tokens) do not "
                f"fit in the context of the {member.role} ({member.model.name}, {limit} "
                "positions); shorten them"
            )


def _details(
    members: Sequence[Member],
    logits: Mapping[str, torch.Tensor],
    base_lp: torch.Tensor,
    combined: torch.Tensor,
    targets: torch.Tensor,
    vocab: int,
    top: int,
):
    """Per-row extras for ``detail=True``: every model's log-prob and rank of the target, the
    two KLs between base and combined, and the top alternatives of both."""
    lps = {m.role: log_probs(logits[m.role], vocab) for m in members}
    lps["base"] = base_lp
    tgt = targets[:, None]
    picked = {role: lp.gather(-1, tgt).squeeze(-1) for role, lp in lps.items()}
    ranks = {role: (lp > lp.gather(-1, tgt)).sum(-1) for role, lp in lps.items()}
    rank = (combined > combined.gather(-1, tgt)).sum(-1)
    p_base, p_comb = base_lp.exp(), combined.exp()
    kl_bc = torch.where(p_base > 0, p_base * (base_lp - combined), 0.0).sum(-1)
    kl_cb = torch.where(p_comb > 0, p_comb * (combined - base_lp), 0.0).sum(-1)
    top_c, top_b = _top(combined, top), _top(base_lp, top)

    def fill(r: int, token: TokenScore) -> None:
        token.model_logprobs = {role: float(v[r]) for role, v in picked.items()}
        token.model_ranks = {role: int(v[r]) for role, v in ranks.items()}
        token.rank = int(rank[r])
        token.kl_base_combined = float(kl_bc[r])
        token.kl_combined_base = float(kl_cb[r])
        if top_c and top_b:
            token.top, token.top_base = top_c[r], top_b[r]

    return fill


def _top(lp: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """Per row of ``(B, V)`` log-probs, the ``k`` most likely ``(id, logprob)``, best first
    (``[]`` when ``k`` is 0)."""
    k = min(k, lp.shape[-1])
    if not k:
        return []
    found = torch.topk(lp, k, dim=-1)
    return [
        list(zip(i, v, strict=True))
        for i, v in zip(found.indices.tolist(), found.values.tolist(), strict=True)
    ]


def rolling_windows(
    tokens: Sequence[int], prefix: int, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """Split ``tokens`` into ``(context, targets)`` windows that score every token exactly once
    in at most ``max_length`` positions each, as lm-eval's ``loglikelihood_rolling`` does: the
    first window reads from ``prefix``, later full windows from the one token before them, and
    the last window keeps as much earlier text as fits as its context.

    >>> rolling_windows([1, 2, 3, 4, 5], prefix=0, max_length=2)
    [([0], [1, 2]), ([2], [3, 4]), ([3, 4], [5])]
    """
    if max_length < 1:
        raise ConfigError(f"max_length must be >= 1, got {max_length}")
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    out = [([prefix], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_length)
        end = done + n
        window = tokens[end - max_length - 1 : end - 1]  # max_length inputs ending before `end`
        out.append((window[: len(window) - (n - 1)], tokens[done:end]))
        done = end
    return out


def score_rolling(
    tuner: ProxyTuner,
    texts: Sequence[str],
    *,
    alpha: Any = None,
    rule: Any = None,
    max_length: int | None = None,
    batch_size: int = 8,
) -> list[float]:
    """The log-likelihood of each whole text (lm-eval's ``loglikelihood_rolling``).

    Every model reads the same raw tokens (no prompt format), starting from the prefix token
    (BOS, else EOS), in windows that fit every model's context.
    """
    limits = [m.model.context_length for m in tuner.members if m.model.context_length]
    length = max_length or (min(limits) - 1 if limits else 2048)
    windows, owners = [], []
    for i, text in enumerate(texts):
        for context, targets in rolling_windows(encode(tuner, text), prefix_id(tuner), length):
            windows.append((context, targets))
            owners.append(i)
    scored = score_ids(
        tuner,
        [w[0] for w in windows],
        [w[1] for w in windows],
        alpha=alpha,
        rule=rule,
        batch_size=batch_size,
    )
    totals = [0.0] * len(texts)
    for i, s in zip(owners, scored, strict=True):
        totals[i] += s.logprob
    return totals
