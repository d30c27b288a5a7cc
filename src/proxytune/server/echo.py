"""Prompts every model reads as the same raw ids: token-id prompts and ``echo``.

- **Token-id prompts** (``"prompt": [5, 9]``, or a batch ``[[5, 9], [7]]``) are read verbatim,
  which needs every model that runs to read the base's vocabulary on the raw prompt format.
- **Echo** returns the prompt's own tokens before the generated ones, with their log-probs
  under the request's rule, alphas and active pairs: the teacher-forced scorer
  (:func:`proxytune.evaluation.scoring.score_ids`) run on the prompt, its first token the
  context. The prompt's first token has no log-prob (``None``).

Both are refused with a 400 naming the field and the model where the models would read
different ids: an API base, a pair of another tokenizer, a chat template, a system text or a
``{prompt}`` template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..engine.controls import request_alphas, request_rule
from ..engine.prepare import Prepared
from ..errors import ConfigError
from ..evaluation.scoring import score_ids
from ..prompts import Prompt, token_prompt
from ..results import TokenLogprob
from .protocol import APIError, CompletionLogprobs

if TYPE_CHECKING:
    from ..tuner import ProxyTuner
    from .render import Renderer


def completion_prompts(prompt: str | list[Any], tuner: ProxyTuner) -> list[Prompt]:
    """A ``/v1/completions`` prompt (text, texts, ids, a list of id lists) as the engine's
    prompts: text as is, token ids as :class:`~proxytune.prompts.TokenIds` (checked: not
    empty, within the vocabulary)."""
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    blocker = tuner.ids_differ
    if blocker is not None:
        raise APIError(
            f"prompt: token-id prompts are read verbatim by every model, but {blocker}; "
            "send the prompt as text",
            param="prompt",
        )
    single = all(isinstance(t, int) for t in prompt)
    items = [prompt] if single else prompt
    out: list[Prompt] = []
    for i, item in enumerate(items):
        where = "prompt" if single else f"prompt[{i}]"
        try:
            out.append(token_prompt(item, tuner.tokenizer, tuner.vocab_size, where))
        except ConfigError as err:
            raise APIError(str(err), param="prompt") from None
    return out


def check_echo(tuner: ProxyTuner, prepared: Prepared) -> None:
    """Echo scores the base's ids of each prompt: every running model must read exactly those
    ids (the raw prompt format, one vocabulary, the same tokenization)."""
    blocker = tuner.ids_differ
    if blocker is not None:
        raise _no_echo(blocker)
    base_ids = prepared.rendered[prepared.base.role]
    for m in prepared.members:
        if not m.prompt.verbatim:
            raise _no_echo(f"the {m.role} reads {m.prompt.label!r} prompts, not the raw text")
        if prepared.rendered[m.role] != base_ids:
            raise _no_echo(f"the {m.role} tokenizes the prompt differently from the base")


def _no_echo(why: str) -> APIError:
    return APIError(
        f"echo: the prompt's log-probs need every model to read the same raw ids, but {why}; "
        "send echo: false (or serve every model on the raw prompt format)",
        param="echo",
    )


def prompt_logprobs(
    tuner: ProxyTuner,
    prompts: Sequence[Prompt],
    ids: Sequence[Sequence[int]],
    top: int,
    alpha: Any = None,
    active_pairs: Sequence[int] | None = None,
    rule: Any = None,
) -> list[list[TokenLogprob]]:
    """Per prompt, its tokens after the first with their log-probs (and ``top`` alternatives)
    under the request's steering: :func:`~proxytune.evaluation.scoring.score_ids` with the
    first token as the context. Runs the models: call it on the scheduler's thread."""
    schedules, active = request_alphas(tuner.pairs, alpha, active_pairs)
    chosen = tuner.rule if rule is None else request_rule(tuner, rule)
    scored = score_ids(
        tuner,
        [list(p[:1]) for p in ids],
        [list(p[1:]) for p in ids],
        prompts=list(prompts),
        alpha=schedules if tuner.pairs else None,
        rule=chosen,
        active=active,
        top=top,
    )
    convert = tuner.tokenizer.convert_ids_to_tokens

    def record(t: Any) -> TokenLogprob:
        top = [(i, convert(i), lp) for i, lp in t.top]
        return TokenLogprob(t.token_id, convert(t.token_id), t.logprob, top)

    return [[record(t) for t in s.tokens] for s in scored]


@dataclass
class Echo:
    """One prompt as a completion shows it: its text and, with ``logprobs``, its tokens."""

    text: str
    logprobs: CompletionLogprobs | None = None


def echoes(
    renderer: Renderer,
    prompts: Sequence[Prompt],
    ids: Sequence[Sequence[int]],
    records: Sequence[Sequence[TokenLogprob]] | None,
    as_ids: bool,
) -> list[Echo]:
    """Each prompt's :class:`Echo` (``records``: from :func:`prompt_logprobs`, or ``None``
    without ``logprobs``)."""
    out = []
    for i, prompt in enumerate(prompts):
        lp = None
        if records is not None:
            first = ids[i][0]
            lp = CompletionLogprobs(
                tokens=[renderer.tokens.text(first, as_ids)],
                token_logprobs=[None],
                top_logprobs=[None],
                text_offset=[0],
            )
            start = len(renderer.tokens.text(first))
            rest, _ = renderer.completion_logprobs(list(records[i]), start, as_ids)
            lp = joined(lp, rest)
        out.append(Echo(str(prompt), lp))
    return out


def joined(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    """``a``'s tokens, then ``b``'s."""
    return CompletionLogprobs(
        tokens=a.tokens + b.tokens,
        token_logprobs=a.token_logprobs + b.token_logprobs,
        top_logprobs=a.top_logprobs + b.top_logprobs,
        text_offset=a.text_offset + b.text_offset,
    )
