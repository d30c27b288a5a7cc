"""Training data: JSONL files in the common shapes, checked line by line.

One JSON object per line (blank lines are skipped, other keys are ignored)::

    {"prompt": "2 + 3 =", "completion": " 5"}                               SFT
    {"prompt": [{"role": "user", "content": "..."}],
     "completion": [{"role": "assistant", "content": "..."}]}                SFT, chat
    {"messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...]}    SFT, multi-turn
    {"prompt": "...", "chosen": "...", "rejected": "..."}                     DPO

A prompt is a string or a list of messages; a completion (``chosen``, ``rejected``) is a string
or a list holding one assistant message. Every problem is reported with its line number.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ProxyTuneError
from ..jsontext import loads, lone_surrogate
from ..paths import need_file
from ..prompts import Prompt

ROLES = ("system", "user", "assistant", "tool")
MAX_REPORTED = 10


class DataError(ProxyTuneError, ValueError):
    """Training data that cannot be used; the message names the file and line(s)."""


@dataclass(frozen=True)
class SFTExample:
    """One supervised example: a prompt and its completion, or a chat to learn turns of.

    Exactly one of ``completion`` (with ``prompt``) and ``messages`` is set.
    """

    line: int
    prompt: Prompt | None = None
    completion: str | None = None
    messages: tuple[Mapping[str, str], ...] | None = None


@dataclass(frozen=True)
class PreferenceExample:
    """One preference pair for DPO: the ``chosen`` completion is preferred to ``rejected``."""

    line: int
    prompt: Prompt
    chosen: str
    rejected: str


class _Problems:
    """Collects line-numbered problems and raises them together."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.items: list[str] = []

    def add(self, line: int, message: str) -> None:
        self.items.append(f"line {line}: {message}")

    def raise_if_any(self) -> None:
        if not self.items:
            return
        if len(self.items) == 1:  # one line: one line of error
            raise DataError(f"{self.path}: {self.items[0]}")
        shown = self.items[:MAX_REPORTED]
        more = len(self.items) - len(shown)
        tail = f"\n  ... and {more} more" if more else ""
        raise DataError(
            f"{self.path}: {len(self.items)} bad line(s):\n  " + "\n  ".join(shown) + tail
        )


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` for every non-blank line; bad JSON raises at once,
    with every bad line of the file named."""
    file = need_file(path, "data file", DataError)
    problems = _Problems(str(path))
    rows: list[tuple[int, Any]] = []
    with file.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                problems.add(number, f"not valid UTF-8 ({err.reason} at byte {err.start})")
                continue
            if not text.strip():
                continue
            try:
                row = loads(text)
            except json.JSONDecodeError as err:
                problems.add(number, f"not valid JSON ({err.msg} at column {err.colno})")
                continue
            except ValueError as err:  # nested too deeply, an integer of over 4300 digits
                problems.add(number, f"not valid JSON ({err})")
                continue
            where = lone_surrogate(row)
            if where is not None:
                problems.add(
                    number,
                    f"{where} holds a lone surrogate escape (\\ud800-\\udfff), which is not "
                    "text; write the character itself or a valid UTF-16 pair",
                )
                continue
            rows.append((number, row))
    problems.raise_if_any()
    if not rows:
        raise DataError(f"{path}: no examples (the file is empty)")
    return iter(rows)


def load_sft(path: str | Path) -> list[SFTExample]:
    """Read and check an SFT file (prompt/completion or ``messages`` lines)."""
    problems = _Problems(str(path))
    out = []
    for line, row in read_jsonl(path):
        try:
            out.append(_sft_example(line, row))
        except _Bad as bad:
            problems.add(line, str(bad))
    problems.raise_if_any()
    return out


def load_preferences(path: str | Path) -> list[PreferenceExample]:
    """Read and check a DPO file (``prompt``/``chosen``/``rejected`` lines)."""
    problems = _Problems(str(path))
    out = []
    for line, row in read_jsonl(path):
        try:
            obj = _object(row)
            _require(obj, ("prompt", "chosen", "rejected"), "a DPO example")
            out.append(
                PreferenceExample(
                    line,
                    _prompt(obj["prompt"]),
                    _completion(obj["chosen"], "chosen"),
                    _completion(obj["rejected"], "rejected"),
                )
            )
        except _Bad as bad:
            problems.add(line, str(bad))
    problems.raise_if_any()
    return out


class _Bad(Exception):
    """One line's problem (collected, then raised as a :class:`DataError`)."""


def _sft_example(line: int, row: Any) -> SFTExample:
    obj = _object(row)
    if "messages" in obj:
        messages = _messages(obj["messages"], "messages")
        turns = [m for m in messages if m["role"] == "assistant"]
        if not turns:
            raise _Bad("'messages' has no assistant message to learn from")
        if messages[0]["role"] == "assistant":
            raise _Bad("'messages' starts with an assistant message: it has no prompt")
        for i, m in enumerate(messages):
            if m["role"] == "assistant" and not m["content"].strip():
                raise _Bad(f"messages[{i}] is an empty assistant message")
        return SFTExample(line, messages=tuple(messages))
    _require(obj, ("prompt", "completion"), "an SFT example (or give 'messages')")
    return SFTExample(line, _prompt(obj["prompt"]), _completion(obj["completion"], "completion"))


def _object(row: Any) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise _Bad(f"expected a JSON object, got {type(row).__name__}")
    return row


def _require(obj: Mapping[str, Any], keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        names = ", ".join(repr(k) for k in missing)
        raise _Bad(f"missing field {names}: {what} needs {', '.join(repr(k) for k in keys)}")


def _messages(value: Any, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _Bad(f"'{field}' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _Bad(f"{field}[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise _Bad(f"{field}[{i}] has role {m['role']!r}; expected one of {ROLES}")
        if not isinstance(m.get("content"), str):
            raise _Bad(f"{field}[{i}] needs a string 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _prompt(value: Any) -> Prompt:
    if isinstance(value, str):
        if not value.strip():
            raise _Bad("empty prompt")
        return value
    messages = _messages(value, "prompt")
    if messages[-1]["role"] == "assistant":
        raise _Bad("the prompt ends with an assistant message; put it in the completion")
    return messages


def _completion(value: Any, field: str) -> str:
    if isinstance(value, list):
        if len(value) != 1:
            raise _Bad(f"'{field}' must be a string or a list of one assistant message")
        message = _messages(value, field)[0]
        if message["role"] != "assistant":
            raise _Bad(f"'{field}' must be an assistant message, got {message['role']!r}")
        value = message["content"]
    if not isinstance(value, str):
        raise _Bad(f"'{field}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _Bad(f"empty {field}")
    return value
