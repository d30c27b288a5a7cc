"""Examples -> token ids, with the loss on completion (assistant) tokens only.

The prompt is tokenized exactly as :class:`~proxytune.prompts.PromptFormat` renders it at
generation time (``chat``: the tokenizer's chat template with the generation prompt; ``raw``:
the text, with the tokenizer's special tokens), so the expert learns on the very ids it is
later steered with. The completion follows as its own ids: in ``chat`` mode the rest of the
templated turn (the end-of-turn marker included), in ``raw`` mode the text plus EOS.

``labels`` are the ids where the loss counts and ``IGNORE`` (-100) elsewhere.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..prompts import Prompt, PromptFormat, as_messages, raw_text
from .data import DataError, PreferenceExample, SFTExample

IGNORE = -100
TEMPLATES = ("auto", "chat", "raw")
OVERLONG = ("refuse", "truncate")


class TruncationWarning(UserWarning):
    """Examples were cut (or dropped) to fit ``max_length``."""


@dataclass(frozen=True)
class Encoded:
    """One SFT sequence: ``input_ids`` and ``labels`` (``IGNORE`` where no loss)."""

    line: int
    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class EncodedPair:
    """One DPO example: the prompt ids and the ids of each completion."""

    line: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def pick_template(template: str, tokenizer: Any) -> str:
    """``auto`` -> ``chat`` when the tokenizer has a chat template, else ``raw``."""
    if template not in TEMPLATES:
        raise DataError(f"template must be one of {TEMPLATES}, got {template!r}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat" if has_chat else "raw"
    if template == "chat" and not has_chat:
        raise DataError("template 'chat' was asked for, but the model's tokenizer has none")
    return template


class Encoder:
    """Tokenizes examples for one tokenizer, template (``chat``/``raw``) and system prompt."""

    def __init__(self, tokenizer: Any, template: str, system: str | None = None) -> None:
        self.tok = tokenizer
        self.template = template
        self.system = system
        self.prompt_format = PromptFormat(kind=template, system=system)

    def _ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def _chat_text(self, messages: Sequence[Mapping[str, str]], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=generation_prompt
        )

    def prompt_completion(self, prompt: Prompt, completion: str) -> tuple[list[int], list[int]]:
        """``(prompt ids, completion ids)`` as generation would see them."""
        prompt_ids = self.prompt_format.render(prompt, self.tok)
        if self.template == "raw":
            text = completion
            if isinstance(prompt, list) and raw_text(prompt).endswith("Assistant:"):
                text = " " + completion  # a transcript: "...Assistant:" + " answer"
            eos = self.tok.eos_token_id
            return prompt_ids, self._ids(text) + ([int(eos)] if eos is not None else [])
        messages = as_messages(prompt, self.system)
        before = self._chat_text(messages, True)
        full = self._chat_text([*messages, {"role": "assistant", "content": completion}], False)
        if not full.startswith(before):
            raise ValueError("the chat template renders the reply in a way that changes the prompt")
        return prompt_ids, self._ids(full[len(before) :])

    def sft(self, example: SFTExample) -> Encoded:
        """Ids and labels of one SFT example (not yet fitted to a length)."""
        if example.messages is None:
            assert example.prompt is not None and example.completion is not None
            p, c = self.prompt_completion(example.prompt, example.completion)
            return Encoded(example.line, p + c, [IGNORE] * len(p) + c)
        messages = list(example.messages)
        if self.template == "raw":  # a transcript; the last assistant turn is learned
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            p, c = self.prompt_completion(messages[:last], messages[last]["content"])
            return Encoded(example.line, p + c, [IGNORE] * len(p) + c)
        return self._chat_turns(example.line, messages)

    def _chat_turns(self, line: int, messages: list[Mapping[str, str]]) -> Encoded:
        """Every assistant turn learned, the rest context: render the chat turn by turn."""
        messages = as_messages(messages, self.system)
        ids: list[int] = []
        labels: list[int] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._chat_text(messages[:i], True)
            upto = self._chat_text(messages[: i + 1], False)
            if not (before.startswith(done) and upto.startswith(before)):
                raise ValueError(
                    "the chat template does not render this conversation turn by turn (it "
                    "rewrites earlier turns); split it into prompt/completion examples"
                )
            context, reply = self._ids(before[len(done) :]), self._ids(upto[len(before) :])
            ids += context + reply
            labels += [IGNORE] * len(context) + reply
            done = upto
        return Encoded(line, ids, labels)

    def preference(self, example: PreferenceExample) -> EncodedPair:
        p, chosen = self.prompt_completion(example.prompt, example.chosen)
        _, rejected = self.prompt_completion(example.prompt, example.rejected)
        return EncodedPair(example.line, p, chosen, rejected)


def encode_all(encode: Any, examples: Sequence[Any], path: str) -> list[Any]:
    """``encode`` every example; template problems are reported with their line numbers."""
    out, problems = [], []
    for ex in examples:
        try:
            out.append(encode(ex))
        except ValueError as err:
            problems.append(f"line {ex.line}: {err}")
    if problems:
        raise DataError(f"{path}: {len(problems)} bad line(s):\n  " + "\n  ".join(problems[:10]))
    return out


def fit_sft(items: Sequence[Encoded], max_length: int, overlong: str, path: str) -> list[Encoded]:
    """Apply the length policy: ``refuse`` (error naming every long line) or ``truncate``
    (cut the end, with a warning; an example left with no completion token is dropped)."""
    _check_policy(overlong)
    long = [e for e in items if len(e.input_ids) > max_length]
    if not long:
        return list(items)
    if overlong == "refuse":
        _refuse(path, [(e.line, len(e.input_ids)) for e in long], max_length)
    out, dropped = [], []
    for e in items:
        if len(e.input_ids) > max_length:
            e = Encoded(e.line, e.input_ids[:max_length], e.labels[:max_length])
            if all(label == IGNORE for label in e.labels):
                dropped.append(e.line)
                continue
        out.append(e)
    _warn(path, [e.line for e in long], dropped, max_length)
    return out


def fit_pairs(
    items: Sequence[EncodedPair], max_length: int, overlong: str, path: str
) -> list[EncodedPair]:
    """The length policy for preference pairs: the prompt plus the longer completion."""
    _check_policy(overlong)

    def size(e: EncodedPair) -> int:
        return len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids))

    long = [e for e in items if size(e) > max_length]
    if not long:
        return list(items)
    if overlong == "refuse":
        _refuse(path, [(e.line, size(e)) for e in long], max_length)
    out, dropped = [], []
    for e in items:
        room = max_length - len(e.prompt_ids)
        if size(e) > max_length:
            if room <= 0:
                dropped.append(e.line)
                continue
            e = EncodedPair(e.line, e.prompt_ids, e.chosen_ids[:room], e.rejected_ids[:room])
        out.append(e)
    _warn(path, [e.line for e in long], dropped, max_length)
    return out


def _check_policy(overlong: str) -> None:
    if overlong not in OVERLONG:
        raise DataError(f"overlong must be one of {OVERLONG}, got {overlong!r}")


def _refuse(path: str, long: list[tuple[int, int]], max_length: int) -> None:
    shown = "\n  ".join(f"line {line}: {n} tokens" for line, n in long[:10])
    more = f"\n  ... and {len(long) - 10} more" if len(long) > 10 else ""
    raise DataError(
        f"{path}: {len(long)} example(s) longer than max_length {max_length}:\n  {shown}{more}\n"
        "Shorten them, raise max_length (up to the model's context), or truncate them "
        "(--overlong truncate)."
    )


def _warn(path: str, cut: list[int], dropped: list[int], max_length: int) -> None:
    lines = ", ".join(map(str, cut[:10])) + (" ..." if len(cut) > 10 else "")
    message = f"{path}: {len(cut)} example(s) truncated to {max_length} tokens (lines {lines})"
    if dropped:
        message += (
            f"; {len(dropped)} dropped, nothing of the completion was left "
            f"(lines {', '.join(map(str, dropped[:10]))})"
        )
    warnings.warn(message, TruncationWarning, stacklevel=3)
