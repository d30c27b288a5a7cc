"""A user's own task for ``proxytune reproduce --task-file TASK.yaml``: screened, trained and
reported like the built-in tasks. ::

    name: capitals                      # a task name (letters, digits, - and _)
    data: capitals.jsonl                # rows of {"question": ..., "answer": ...}, relative
    strict: first-line-contains         # exact | number | first-line-contains | choice | python
    lenient: first-line-contains
    shell: "#### {answer}"              # optional: the taught answer format (this default)
    prompt: "Q: {question}\\nA:"        # optional (this default)
    alternatives: [Paris, Rome, Oslo]   # optional: first-line-contains' other answers
                                        # (default: every answer in the file)
    sizes: {shots: 3, screen: 40, train: 200, validation: 50, test: 200}   # optional

The rows are shuffled with the run's seed and cut into the splits in order; a file with fewer
rows than the splits ask for is refused with the numbers.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .scoring import DEFAULT_SHELL, MATCHERS
from .tasks import RAW_PROMPT, SPLITS, Example, TaskKind, shell_task

KEYS = ("name", "data", "strict", "lenient", "shell", "prompt", "alternatives", "sizes")


def load_task_file(path: str) -> TaskKind:
    """The task a YAML file describes (see the module docstring); errors name the file."""
    file = Path(path).expanduser()
    where = f"task file {path!r}"
    if not file.is_file():
        raise ConfigError(f"{where} does not exist; give the path of a YAML task file")
    try:
        spec = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{where} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where} must hold a mapping with {', '.join(KEYS[:4])}")
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; keys are {', '.join(KEYS)}")
    for key in ("name", "data", "strict", "lenient"):
        if not isinstance(spec.get(key), str) or not spec[key].strip():
            raise ConfigError(f"{where} needs '{key}' (a string)")
    name = spec["name"].strip()
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ConfigError(f"{where}: name {name!r} may hold only letters, digits, - and _")
    for key in ("strict", "lenient"):
        if spec[key] not in MATCHERS:
            raise ConfigError(
                f"{where}: {key} scorer {spec[key]!r} is unknown; choose from {', '.join(MATCHERS)}"
            )
    data = Path(spec["data"]).expanduser()
    if not data.is_absolute():
        data = file.parent / data
    rows = _read_rows(data, where)
    prompt = str(spec.get("prompt", RAW_PROMPT))
    _check_prompt(prompt, rows[0], where)
    alternatives = spec.get("alternatives")
    if alternatives is None and spec["lenient"] == "first-line-contains":
        alternatives = sorted({r["answer"] for r in rows})
    sizes = _sizes(spec.get("sizes"), where)
    digest = hashlib.sha256(file.read_bytes() + b"\0" + data.read_bytes()).hexdigest()[:16]

    def make(n: int, seed: int) -> list[Example]:
        shuffled = [dict(r) for r in rows]
        random.Random(seed).shuffle(shuffled)
        if alternatives:
            for r in shuffled:
                r["alternatives"] = [str(a) for a in alternatives]
        return shuffled[:n]

    try:
        return shell_task(
            name,
            f"user task from {file.name} ({len(rows)} rows)",
            make,
            strict=spec["strict"],
            lenient=spec["lenient"],
            shell=str(spec.get("shell", DEFAULT_SHELL)),
            prompt=prompt,
            limited=True,
            sizes=sizes,
            digest=digest,
        )
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _read_rows(data: Path, where: str) -> list[dict[str, Any]]:
    if not data.is_file():
        raise ConfigError(f"{where}: data file {str(data)!r} does not exist")
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, line in enumerate(data.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise ConfigError(f"{where}: {data.name} line {i} is not JSON") from None
        if not isinstance(row, dict) or not all(
            isinstance(row.get(k), str | int | float) for k in ("question", "answer")
        ):
            raise ConfigError(
                f"{where}: {data.name} line {i} needs 'question' and 'answer' (strings)"
            )
        row["question"], row["answer"] = str(row["question"]), str(row["answer"]).strip()
        if row["question"] in seen:
            raise ConfigError(f"{where}: {data.name} line {i} repeats an earlier question")
        seen.add(row["question"])
        rows.append(row)
    if not rows:
        raise ConfigError(f"{where}: {data.name} holds no rows")
    return rows


def _check_prompt(prompt: str, row: Mapping[str, Any], where: str) -> None:
    try:
        prompt.format(**row)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            f"{where}: prompt {prompt!r} does not fit the rows ({err!r}); use the rows' "
            "fields, e.g. {question}"
        ) from None


def _sizes(value: Any, where: str) -> dict[str, int] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) != set(SPLITS):
        raise ConfigError(f"{where}: sizes must give every split: {', '.join(SPLITS)}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value.values()):
        raise ConfigError(f"{where}: sizes must be whole numbers >= 0")
    return {s: int(value[s]) for s in SPLITS}
