"""Strict and lenient scoring of short answers in an answer shell (pure functions).

A task's answer is written inside a *shell*, a template with one ``{answer}`` slot such as the
paper's GSM ``#### {answer}``: the format tuning teaches and an untuned model rarely writes.

- ``strict``: the output's first line is the shell, exactly, around a right answer;
- ``lenient``: the right content anywhere in the first line, shell or not. The first candidate
  answer of the line is the one compared (the first number, the first option letter, the first
  Python literal, the first of the task's possible answers), so a list of guesses scores only
  when its first guess is right.

How content is compared is a *matcher*, named in a task (and in a user's task file):

- ``exact``: the text itself (lenient: quotes, backticks and a final period dropped, any case);
- ``number``: numerically equal (``1,200`` = ``1200`` = ``1200.0``);
- ``first-line-contains``: the answer as a whole word or phrase, any case; lenient: the first
  of the example's ``alternatives`` (its other possible answers) to occur in the line;
- ``choice``: an option letter A-E;
- ``python``: equal Python literals (``'a'`` = ``"a"``, ``[1, 2]`` = ``[1,2]``).

Rows carry their own scoring fields (``answer``, ``shell``, ``strict``, ``lenient`` and, for
``first-line-contains``, ``alternatives``), so :func:`shell_metrics` scores any row alone.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import ConfigError
from ..evaluation.extract import normalize_number, numbers

DEFAULT_SHELL = "#### {answer}"
SLOT = "{answer}"
_NO_VALUE = object()


def check_shell(shell: str) -> str:
    """``shell`` if it has exactly one ``{answer}`` slot and no line break."""
    if shell.count(SLOT) != 1 or "\n" in shell:
        raise ConfigError(
            f"answer shell {shell!r} must hold '{SLOT}' exactly once and no line break, "
            f"e.g. {DEFAULT_SHELL!r}"
        )
    return shell


def fill(shell: str, answer: str) -> str:
    """The shell around ``answer``: what a strict answer is."""
    return shell.replace(SLOT, answer)


def first_line(text: str | None) -> str:
    """The first line of ``text`` (leading whitespace dropped), stripped."""
    return (text or "").lstrip().split("\n", 1)[0].strip()


def shell_content(line: str, shell: str) -> str | None:
    """What stands in the slot when ``line`` is the shell exactly, else ``None``.

    >>> shell_content("#### 42", "#### {answer}"), shell_content("42", "#### {answer}")
    ('42', None)
    """
    before, _, after = shell.partition(SLOT)
    pattern = re.escape(before.strip()) + r"\s*(\S.*?)\s*" + re.escape(after.strip())
    m = re.fullmatch(pattern, line)
    return m.group(1) if m else None


def complies(output: str | None, shell: str) -> bool:
    """The first line is the shell around some non-empty content (format only)."""
    return shell_content(first_line(output), shell) is not None


def unshelled(line: str, shell: str) -> str:
    """``line`` with the shell's fixed text removed wherever it occurs."""
    for part in shell.split(SLOT):
        if part.strip():
            line = line.replace(part.strip(), " ")
    return line.strip()


# --- matchers ------------------------------------------------------------------------------


def _plain(text: str) -> str:
    return text.strip().strip("`\"'").rstrip(".").strip().lower()


def _exact_whole(content: str, gold: str, example: Mapping[str, Any]) -> bool:
    return content.strip() == gold


def _exact_first(line: str, gold: str, example: Mapping[str, Any]) -> bool:
    return _plain(line) == _plain(gold)


def _number_whole(content: str, gold: str, example: Mapping[str, Any]) -> bool:
    found = numbers(content)
    return len(found) == 1 and found[0] == content.strip() and _same_number(found[0], gold)


def _number_first(line: str, gold: str, example: Mapping[str, Any]) -> bool:
    found = numbers(line)
    return bool(found) and _same_number(found[0], gold)


def _same_number(a: str, b: str) -> bool:
    return normalize_number(a) == normalize_number(b)


def _word(phrase: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)" + re.escape(phrase.strip()) + r"(?!\w)", re.IGNORECASE)


def _contains_whole(content: str, gold: str, example: Mapping[str, Any]) -> bool:
    return _plain(content) == _plain(gold)


def _contains_first(line: str, gold: str, example: Mapping[str, Any]) -> bool:
    """The answer occurs, and before every other possible answer that occurs."""
    m = _word(gold).search(line)
    if m is None:
        return False
    for other in example.get("alternatives") or ():
        if _plain(str(other)) == _plain(gold):
            continue
        o = _word(str(other)).search(line)
        if o is not None and o.start() < m.start():
            return False
    return True


_LETTER = re.compile(r"(?<![A-Za-z])\(?([A-E])(?![A-Za-z])")


def _choice_whole(content: str, gold: str, example: Mapping[str, Any]) -> bool:
    return content.strip().strip("()").rstrip(".") == gold.strip()


def _choice_first(line: str, gold: str, example: Mapping[str, Any]) -> bool:
    m = _LETTER.search(line)
    return m is not None and m.group(1) == gold.strip()


def literal(text: str) -> Any:
    """The Python literal ``text`` denotes, or a private sentinel when it is none."""
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return _NO_VALUE


def first_literal(line: str) -> Any:
    """The first Python literal in ``line``: a string, number, ``True``/``False``/``None``, or
    a bracketed list/tuple/dict/set; the sentinel when there is none.

    >>> first_literal("It is 'n', not 'a'"), first_literal("[1, 2] then 3")
    ('n', [1, 2])
    """
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        tokens = []
    opens = {"[": "]", "(": ")", "{": "}"}
    for i, tok in enumerate(tokens):
        if tok.type in (tokenize.STRING, tokenize.NUMBER):
            value = literal(tok.string)
            prev = tokens[i - 1].string if i else ""
            if prev == "-" and tok.type == tokenize.NUMBER:
                value = literal("-" + tok.string)
            if value is not _NO_VALUE:
                return value
        if tok.type == tokenize.NAME and tok.string in ("True", "False", "None"):
            return literal(tok.string)
        if tok.string in opens:
            depth = 0
            for tok2 in tokens[i:]:
                if tok2.string in opens:
                    depth += 1
                elif tok2.string in opens.values():
                    depth -= 1
                    if depth == 0:
                        value = literal(line[tok.start[1] : tok2.end[1]])
                        if value is not _NO_VALUE:
                            return value
                        break
    return _NO_VALUE


def _python_whole(content: str, gold: str, example: Mapping[str, Any]) -> bool:
    value = literal(content)
    return value is not _NO_VALUE and _same_literal(value, literal(gold))


def _python_first(line: str, gold: str, example: Mapping[str, Any]) -> bool:
    value = first_literal(line)
    return value is not _NO_VALUE and _same_literal(value, literal(gold))


def _same_literal(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


Matcher = Callable[[str, str, Mapping[str, Any]], bool]
MATCHERS: dict[str, tuple[Matcher, Matcher]] = {
    "exact": (_exact_whole, _exact_first),
    "number": (_number_whole, _number_first),
    "first-line-contains": (_contains_whole, _contains_first),
    "choice": (_choice_whole, _choice_first),
    "python": (_python_whole, _python_first),
}
"""Matcher name -> (whole: the shell's content is the answer, first: the line's first
candidate is the answer)."""


def check_matcher(name: str, where: str) -> str:
    if name not in MATCHERS:
        raise ConfigError(f"{where}: unknown scorer {name!r}; choose from {', '.join(MATCHERS)}")
    return name


def shell_metrics(answer: str | None, example: Mapping[str, Any]) -> dict[str, float]:
    """``strict`` and ``lenient`` of one output (see the module docstring) from the row's own
    scoring fields."""
    gold = str(example["answer"])
    shell = str(example.get("shell", DEFAULT_SHELL))
    line = first_line(answer)
    whole, _ = MATCHERS[str(example.get("strict", "exact"))]
    _, first = MATCHERS[str(example.get("lenient", "exact"))]
    content = shell_content(line, shell)
    strict = content is not None and whole(content, gold, example)
    lenient = strict or first(unshelled(line, shell), gold, example)
    return {"strict": float(strict), "lenient": float(lenient)}


def scoring_fields(
    shell: str, strict: str, lenient: str, alternatives: Sequence[str] | None = None
) -> dict[str, Any]:
    """The fields a row carries for :func:`shell_metrics`."""
    out: dict[str, Any] = {
        "shell": check_shell(shell),
        "strict": check_matcher(strict, "strict"),
        "lenient": check_matcher(lenient, "lenient"),
    }
    if alternatives:
        out["alternatives"] = list(alternatives)
    return out
