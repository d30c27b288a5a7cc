"""JSON written by users (request bodies, data and job files): two ways a valid-looking
document still fails deep inside a library, caught where it is read."""

from __future__ import annotations

import json
from typing import Any


class NestedTooDeeply(ValueError):
    """JSON nested deeper than Python's parser goes (it raises ``RecursionError``)."""


def loads(text: str | bytes) -> Any:
    """``json.loads``, with a document nested too deeply a :class:`NestedTooDeeply` (a
    ``ValueError`` like every other bad document) instead of a ``RecursionError``."""
    try:
        return json.loads(text)
    except RecursionError:
        raise NestedTooDeeply("it is nested too deeply") from None


def lone_surrogate(data: Any) -> str | None:
    """The path (``messages[0].content``) of the first string in ``data`` that cannot be
    encoded (a lone surrogate from a ``\\ud800`` escape), or ``None``.

    >>> lone_surrogate({"messages": [{"content": "\\ud800"}]})
    'messages[0].content'
    """
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(value, dict):
            for key, item in value.items():
                stack.append((key, path or "body"))
                stack.append((item, f"{path}.{key}" if path else str(key)))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(value))
    return None
