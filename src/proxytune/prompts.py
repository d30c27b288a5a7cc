"""Per-model prompt formats: the same request rendered as each model expects it.

The paper feeds the expert its chat template and the base and anti-expert the raw prompt.
Formats are chosen explicitly per model role; nothing is inferred from a model's name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

Message = Mapping[str, str]
Prompt = str | Sequence[Message]
"""A plain string, or a chat as a list of ``{"role": ..., "content": ...}`` messages."""


def as_messages(prompt: Prompt, system: str | None = None) -> list[dict[str, str]]:
    """The prompt as a chat: a string becomes one user message; ``system`` is prepended."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(m) for m in prompt]
        for i, m in enumerate(messages):
            if "role" not in m or "content" not in m:
                raise ConfigError(f"message {i} needs 'role' and 'content' keys, got {sorted(m)}")
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


@dataclass(frozen=True)
class PromptFormat:
    """How one model sees a prompt.

    ``kind``: ``"raw"`` (the text as is), ``"chat"`` (the tokenizer's chat template with the
    generation prompt added), or ``"template"`` (``template.format(prompt=...)``).
    """

    kind: str = "raw"
    system: str | None = None
    template: str | None = None
    add_special_tokens: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("raw", "chat", "template"):
            raise ConfigError(
                f"prompt format must be 'raw', 'chat' or 'template', got {self.kind!r}"
            )
        if self.kind == "template" and (not self.template or "{prompt}" not in self.template):
            raise ConfigError("a 'template' prompt format needs a template containing '{prompt}'")

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any] | PromptFormat | None) -> PromptFormat:
        """From ``"raw"``, ``"chat"``, a string containing ``{prompt}``, or a recipe mapping."""
        if spec is None:
            return cls()
        if isinstance(spec, PromptFormat):
            return spec
        if isinstance(spec, str):
            if "{prompt}" in spec:
                return cls(kind="template", template=spec)
            return cls(kind=spec)
        return cls(**dict(spec))

    def render(self, prompt: Prompt, tokenizer: Any) -> list[int]:
        """Token ids of ``prompt`` for a model with ``tokenizer``."""
        if self.kind == "chat":
            if not getattr(tokenizer, "chat_template", None):
                raise ConfigError(
                    "prompt format 'chat' was chosen for a model whose tokenizer has no chat "
                    "template; use 'raw' or a '{prompt}' template for that model instead"
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
