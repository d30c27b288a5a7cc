"""Per-model prompt formats: the same request rendered as each model expects it.

The paper feeds the expert its chat template and the base and anti-expert the raw prompt.
Formats are chosen per model role: ``raw``, ``chat``, a ``{prompt}`` template, or ``auto``,
which :func:`resolve_prompt` turns into one of them once the model is known (the format a
``proxytune train`` expert was tuned on, else ``chat`` when the tokenizer has a chat template,
else ``raw``). Nothing is inferred from a model's name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .paths import TRAIN_META

Message = Mapping[str, str]
Prompt = str | Sequence[Message]
"""A plain string, or a chat as a list of ``{"role": ..., "content": ...}`` messages."""


class TokenIds(str):
    """A prompt given as token ids of the base's vocabulary, which every model reads verbatim
    (so every model must be on the raw prompt format: :attr:`PromptFormat.verbatim`).

    As a string it is the ids' decoded text: what rules, reports and logs see. Make one with
    :func:`token_prompt`, which checks the ids.
    """

    ids: tuple[int, ...]

    def __new__(cls, ids: Sequence[int], text: str) -> TokenIds:
        obj = super().__new__(cls, text)
        obj.ids = tuple(ids)
        return obj


def token_prompt(
    ids: Sequence[int], tokenizer: Any, vocab_size: int, where: str = "prompt"
) -> TokenIds:
    """``ids`` as a :class:`TokenIds` prompt; an empty list and ids outside ``0..vocab_size-1``
    are refused with a message that starts with ``where``.

    >>> class Tok:
    ...     def decode(self, ids, skip_special_tokens=False): return "".join(map(chr, ids))
    >>> p = token_prompt([72, 105], Tok(), 128)
    >>> p, p.ids
    ('Hi', (72, 105))
    >>> token_prompt([72, 200], Tok(), 128)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    proxytune.errors.ConfigError: prompt: token id 200 at position 1 is outside the vocabulary ...
    """
    if not ids:
        raise ConfigError(f"{where}: an empty list of token ids; give at least one id", param=where)
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise ConfigError(
                f"{where}: token id {t!r} at position {i} is outside the vocabulary "
                f"(ids 0..{vocab_size - 1})",
                param=where,
            )
    return TokenIds(ids, tokenizer.decode(list(ids), skip_special_tokens=False))


def as_messages(prompt: Prompt, system: str | None = None) -> list[dict[str, str]]:
    """The prompt as a chat: a string becomes one user message; ``system`` is prepended."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(m) for m in prompt]
        for i, m in enumerate(messages):
            if "role" not in m or "content" not in m:
                raise ConfigError(
                    f"message {i} needs 'role' and 'content' keys, got {sorted(m)}", param="message"
                )
    if system is not None and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def raw_text(prompt: Prompt) -> str:
    """A chat flattened for a model without a chat template.

    One user message is passed through unchanged; longer chats become a transcript
    (``System: ...``, ``User: ...``, ``Assistant: ...``) ending in ``Assistant:``.
    """
    if isinstance(prompt, str):
        return prompt
    messages = as_messages(prompt)
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join([*lines, "Assistant:"])


KINDS = ("auto", "raw", "chat", "template")
TRAINED_KINDS = ("chat", "raw")
"""What ``proxytune train`` records as a run's ``expert_prompt``."""


@dataclass(frozen=True)
class PromptFormat:
    """How one model sees a prompt.

    ``kind``: ``"raw"`` (the text as is), ``"chat"`` (the tokenizer's chat template with the
    generation prompt added), ``"template"`` (``template.format(prompt=...)``), or ``"auto"``
    (one of ``chat``/``raw``, chosen by :func:`resolve_prompt` when the model is loaded).
    """

    kind: str = "raw"
    system: str | None = None
    template: str | None = None
    add_special_tokens: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(
                f"prompt format must be 'auto', 'raw', 'chat' or 'template', got {self.kind!r}",
                param="prompt",
            )
        if self.kind == "template" and (not self.template or "{prompt}" not in self.template):
            raise ConfigError("a 'template' prompt format needs a template containing '{prompt}'")

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any] | PromptFormat | None) -> PromptFormat:
        """From ``"auto"``, ``"raw"``, ``"chat"``, a string containing ``{prompt}``, or a recipe
        mapping."""
        if spec is None:
            return cls()
        if isinstance(spec, PromptFormat):
            return spec
        if isinstance(spec, str):
            if "{prompt}" in spec:
                return cls(kind="template", template=spec)
            return cls(kind=spec)
        return cls(**dict(spec))

    @property
    def verbatim(self) -> bool:
        """Whether the model reads a prompt's ids as they are: the raw format, no system text
        (what token-id prompts and the server's ``echo`` need)."""
        return self.kind == "raw" and not self.system

    @property
    def label(self) -> str:
        """A short name for reports: the kind, or the template text of a ``template``."""
        return self.template if self.kind == "template" else self.kind  # type: ignore[return-value]

    def render(self, prompt: Prompt, tokenizer: Any) -> list[int]:
        """Token ids of ``prompt`` for a model with ``tokenizer`` (``auto`` not yet resolved:
        by the tokenizer alone, see :func:`resolve_prompt`)."""
        if self.kind == "auto":
            return resolve_prompt(self, None, tokenizer).render(prompt, tokenizer)
        if isinstance(prompt, TokenIds):
            if not self.verbatim:
                raise ConfigError(
                    f"prompt: token-id prompts are read verbatim, but this model reads "
                    f"{self.label!r} prompts; send the prompt as text",
                    param="prompt",
                )
            return list(prompt.ids)
        if self.kind == "chat":
            if not getattr(tokenizer, "chat_template", None):
                raise ConfigError(
                    "prompt format 'chat' was chosen for a model whose tokenizer has no chat "
                    "template; use 'raw' or a '{prompt}' template for that model instead",
                    param="prompt",
                )
            text = tokenizer.apply_chat_template(
                as_messages(prompt, self.system), tokenize=False, add_generation_prompt=True
            )
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        text = raw_text(prompt)
        if self.kind == "template":
            text = self.template.format(prompt=text)  # type: ignore[union-attr]
        if self.system:
            text = f"{self.system}\n\n{text}"
        return list(tokenizer(text, add_special_tokens=self.add_special_tokens)["input_ids"])


def resolve_prompt(
    fmt: str | Mapping[str, Any] | PromptFormat | None, model: Any, tokenizer: Any
) -> PromptFormat:
    """The format a model gets: ``fmt`` as it is, unless it is ``auto``; then

    1. the format a ``proxytune train`` expert was tuned on (``proxytune_train.json`` in its
       adapter or model directory), with the run's system prompt unless ``fmt`` names one;
    2. else ``chat`` when ``tokenizer`` has a chat template;
    3. else ``raw``.

    ``model``: a :class:`~proxytune.specs.ModelSpec` (its ``adapter`` and ``path`` are
    looked at), a path, or ``None`` (the tokenizer alone decides). Reads at most two small
    files; loads nothing.

    >>> class Tok: chat_template = None
    >>> resolve_prompt("auto", None, Tok()).kind
    'raw'
    >>> Tok.chat_template = "{{ messages }}"
    >>> resolve_prompt("auto", "no/such/model", Tok()).kind
    'chat'
    >>> resolve_prompt("raw", None, Tok()).kind
    'raw'
    """
    fmt = PromptFormat.parse(fmt)
    if fmt.kind != "auto":
        return fmt
    trained = trained_format(model)
    if trained is not None:
        kind, system = trained
        return replace(fmt, kind=kind, system=fmt.system if fmt.system is not None else system)
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    return replace(fmt, kind="chat" if has_chat else "raw")


def trained_format(model: Any) -> tuple[str, str | None] | None:
    """``(kind, system)`` a ``proxytune train`` run recorded for ``model`` (a spec or a path:
    its adapter directory first, then its model directory), or ``None``."""
    if model is None:
        return None
    if isinstance(model, (str, Path)):
        places = [model]
    else:
        places = [getattr(model, "adapter", None), getattr(model, "path", None)]
    for place in places:
        if not isinstance(place, (str, Path)):
            continue
        folder = Path(place).expanduser()
        if folder.suffix == ".gguf":  # a GGUF file: its run's record sits beside it
            folder = folder.parent
        try:
            meta = json.loads((folder / TRAIN_META).read_text("utf-8"))
        except (OSError, ValueError):
            continue
        kind = meta.get("expert_prompt") if isinstance(meta, Mapping) else None
        if kind in TRAINED_KINDS:
            system = meta.get("system")
            return kind, system if isinstance(system, str) and system else None
    return None
