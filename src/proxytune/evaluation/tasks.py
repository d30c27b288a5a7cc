"""Tasks as data: where the examples are, how a prompt is built, how an answer is scored.

A task is a small YAML file (or a :class:`Task` built in Python); no per-task script::

    # gsm.yaml -- proxytune eval gsm.yaml --recipe default --alpha 0,0.5,1
    name: gsm
    kind: generate              # generate | multiple_choice | code
    data: gsm.jsonl             # .jsonl / .jsonl.gz / .json list, relative to this file
    prompt: "Question: {question}\\nAnswer:"
    target: answer              # field with the gold answer (or a list of accepted answers)
    extract: gsm                # none | first_line | last_number | gsm | code | regex:...
    metrics: [exact_match]      # exact_match | contains | f1 | module:function | file.py:fn
    gold: " {solution}"         # optional: also score this continuation teacher-forced
    generation: {max_new_tokens: 256, stop: ["\\n\\nQuestion:"]}

Templates are :meth:`str.format` strings over an example's fields. Built-in tasks
(``gsm_symbolic``, ``truthfulqa_mc``, ``humaneval``) live beside their vendored data in
``evaluation/data``; a plain ``.jsonl`` file is a task too (its kind is read off its fields).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..paths import need_file
from .extract import get_extractor
from .metrics import GENERATION_METRICS

KINDS = ("generate", "multiple_choice", "code")
BUILTIN_PREFIX = "builtin:"
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
"""Codex's stop sequences: the function body ends where top-level code begins."""


def data_dir() -> Path:
    """The folder of the built-in task definitions and their vendored data."""
    return Path(str(resources.files("proxytune.evaluation") / "data"))


@dataclass(frozen=True)
class Task:
    """One evaluation task (see the module docstring for the YAML form)."""

    name: str
    kind: str = "generate"
    data: str = ""
    """Examples: a path (``.jsonl``, ``.jsonl.gz``, ``.json``), or ``builtin:FILE``."""
    prompt: str = "{prompt}"
    """Template of the prompt, over an example's fields."""
    target: str | None = "answer"
    """generate: the field holding the gold answer, or a list of accepted answers."""
    extract: str = "none"
    """generate: how the answer is pulled out of the output (:mod:`.extract`)."""
    metrics: tuple[str, ...] = ("exact_match",)
    """generate: metric names, or user functions ``module:function`` / ``file.py:function``
    called as ``fn(answer, example)`` and returning a number, a bool or a dict of them."""
    gold: str | None = None
    """Template of a gold continuation whose log-likelihood is also reported (``gold_logprob``,
    ``gold_logprob_per_token``, ``gold_greedy``); the few-shot answers use it too."""
    choices: str = "choices"
    """multiple_choice: the field holding the options."""
    label: str = "label"
    """multiple_choice: the field holding the correct option's index, or a list of indices."""
    choice_prefix: str = " "
    """multiple_choice: the text between the prompt and each option."""
    test: str = "test"
    """code: the field holding the test code (defines ``check(candidate)``)."""
    entry_point: str = "entry_point"
    """code: the field naming the function under test."""
    k: tuple[int, ...] = (1,)
    """code: the k of each pass@k reported (needs ``generation.n >= k``)."""
    timeout: float = 10.0
    """code: seconds each program may run."""
    generation: Mapping[str, Any] = field(default_factory=dict)
    """Decoding settings (``max_new_tokens``, ``stop``, ``temperature``, ``n``, ``seed``...)."""
    fewshot: int = 0
    """The first ``fewshot`` examples become worked examples in every prompt (and are not
    evaluated); each is ``prompt`` + ``gold`` (or the correct option)."""
    fewshot_separator: str = "\n\n"
    id_field: str = "id"
    description: str = ""
    root: str = ""
    """Folder that relative ``data`` paths and metric files are read from."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"task {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        object.__setattr__(self, "metrics", tuple(self.metrics))
        object.__setattr__(self, "k", tuple(int(k) for k in self.k))
        object.__setattr__(self, "generation", dict(self.generation))
        if self.kind == "generate":
            get_extractor(self.extract)  # fail on a bad name now, not after generating
            if self.target is None and not any(":" in m for m in self.metrics):
                raise ConfigError(
                    f"task {self.name!r}: a generate task needs a 'target' field, or metrics "
                    "that are user functions ('module:function')"
                )
            for m in self.metrics:
                if ":" not in m and m not in GENERATION_METRICS:
                    raise ConfigError(
                        f"task {self.name!r}: unknown metric {m!r}; use one of "
                        f"{sorted(GENERATION_METRICS)} or a user function 'module:function'"
                    )
        if self.kind == "code" and any(k < 1 for k in self.k):
            raise ConfigError(f"task {self.name!r}: every k of pass@k must be >= 1")
        if self.fewshot < 0:
            raise ConfigError(f"task {self.name!r}: fewshot must be >= 0")
        if self.fewshot and self.kind == "generate" and self.gold is None:
            raise ConfigError(f"task {self.name!r}: fewshot examples need a 'gold' template")

    # data --------------------------------------------------------------------------------

    def load(self) -> list[dict[str, Any]]:
        """Every example, in file order, each with an ``id`` (``id_field`` or its position)."""
        rows = read_rows(self.data_path())
        out = []
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise ConfigError(f"task {self.name!r}: example {i} is not a JSON object")
            ex = dict(row)
            ex["id"] = str(ex.get(self.id_field, ex.get("task_id", i)))
            out.append(ex)
        ids = [ex["id"] for ex in out]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ConfigError(f"task {self.name!r}: example id {dup!r} appears more than once")
        return out

    def data_path(self) -> Path:
        if not self.data:
            raise ConfigError(f"task {self.name!r} names no data file")
        if self.data.startswith(BUILTIN_PREFIX):
            path = data_dir() / self.data.removeprefix(BUILTIN_PREFIX)
        else:
            path = Path(self.data).expanduser()
            if not path.is_absolute() and self.root:
                path = Path(self.root) / path
        need_file(path, f"task {self.name!r}: data file")
        return path

    def examples(
        self, split: str = "all", validation_size: int = 0, seed: int = 0
    ) -> list[dict[str, Any]]:
        """The examples of ``split``: ``all``, or ``validation`` / ``test`` where
        ``validation_size`` examples drawn with ``seed`` are held out for tuning and the rest
        are the test set. The few-shot examples are never among them."""
        rows = self.load()[self.fewshot :]
        if split == "all":
            return rows
        if split not in ("validation", "test"):
            raise ConfigError(f"split must be 'all', 'validation' or 'test', got {split!r}")
        if not 0 < validation_size < len(rows):
            raise ConfigError(
                f"validation_size must be between 1 and {len(rows) - 1} for task "
                f"{self.name!r} ({len(rows)} examples), got {validation_size}"
            )
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        held = set(order[:validation_size])
        return [r for i, r in enumerate(rows) if (i in held) == (split == "validation")]

    # prompts -----------------------------------------------------------------------------

    def format(self, template: str, example: Mapping[str, Any]) -> str:
        try:
            return template.format(**example)
        except (KeyError, IndexError) as err:
            raise ConfigError(
                f"task {self.name!r}: template {template!r} uses {err}, which example "
                f"{example.get('id')!r} lacks; its fields are {sorted(example)}"
            ) from None

    def render(self, example: Mapping[str, Any]) -> str:
        """The full prompt of ``example``: few-shot examples, then its own prompt."""
        return self.preamble() + self.format(self.prompt, example)

    def preamble(self) -> str:
        if not self.fewshot:
            return ""
        shots = []
        for ex in self.load()[: self.fewshot]:
            if self.kind == "multiple_choice":
                answer = self.choice_prefix + str(self.options(ex)[self.correct(ex)[0]])
            else:
                answer = self.format(self.gold or "", ex)
            shots.append(self.format(self.prompt, ex) + answer)
        return self.fewshot_separator.join(shots) + self.fewshot_separator

    def golds(self, example: Mapping[str, Any]) -> list[str]:
        """The accepted answers of a generate example."""
        if self.target is None:
            return []
        if self.target not in example:
            raise ConfigError(
                f"task {self.name!r}: example {example.get('id')!r} has no target field "
                f"{self.target!r}; its fields are {sorted(example)}"
            )
        value = example[self.target]
        return [str(v) for v in value] if isinstance(value, list) else [str(value)]

    def options(self, example: Mapping[str, Any]) -> list[str]:
        value = example.get(self.choices)
        if not isinstance(value, list) or not value:
            raise ConfigError(
                f"task {self.name!r}: example {example.get('id')!r} needs a non-empty list in "
                f"field {self.choices!r}"
            )
        return [str(v) for v in value]

    def correct(self, example: Mapping[str, Any]) -> list[int]:
        value = example.get(self.label)
        labels = value if isinstance(value, list) else [value]
        n = len(self.options(example))
        if not labels or not all(isinstance(i, int) and 0 <= i < n for i in labels):
            raise ConfigError(
                f"task {self.name!r}: example {example.get('id')!r} needs field {self.label!r} "
                f"to be an option index (0..{n - 1}) or a list of them, got {value!r}"
            )
        return [int(i) for i in labels]

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """The decoding settings: the task's, then ``overrides`` (``None`` values ignored)."""
        out = dict(self.generation)
        if self.kind == "code":
            out.setdefault("stop", list(HUMANEVAL_STOP))
        out.update({k: v for k, v in overrides.items() if v is not None})
        out.setdefault("temperature", 0.0)
        if isinstance(out.get("stop"), list):
            out["stop"] = tuple(out["stop"])
        return out

    def fingerprint(self) -> str:
        """A hash of the definition and the data: results saved under another one are stale."""
        payload = json.dumps(asdict(self), sort_keys=True, default=str).encode()
        digest = hashlib.sha256(payload)
        digest.update(self.data_path().read_bytes())
        return digest.hexdigest()[:16]


def read_rows(path: Path) -> list[Any]:
    """Rows of a ``.jsonl`` / ``.jsonl.gz`` file, or of a ``.json`` list."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
        if path.name.endswith((".json", ".json.gz")):
            data = json.load(f)
            if isinstance(data, Mapping) and isinstance(data.get("examples"), list):
                return list(data["examples"])
            if not isinstance(data, list):
                raise ConfigError(f"{str(path)!r}: a .json data file must hold a list of objects")
            return data
        rows = []
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{str(path)!r} line {n} is not valid JSON: {err}") from None
        return rows


def builtin_tasks() -> list[str]:
    """Names of the built-in tasks."""
    return sorted(p.stem for p in data_dir().glob("*.yaml"))


def task_from_mapping(data: Mapping[str, Any], root: str = "", name: str = "task") -> Task:
    """A :class:`Task` from a parsed YAML mapping; unknown keys are refused by name."""
    known = {f.name for f in fields(Task)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"task {name!r}: unknown key(s) {unknown}; known: {sorted(known)}")
    values = dict(data)
    values.setdefault("name", name)
    values.setdefault("root", root)
    for key in ("metrics", "k"):
        if isinstance(values.get(key), (str, int)):
            values[key] = [values[key]]
    return Task(**values)


def infer_task(path: Path) -> Task:
    """A task for a plain data file, its kind read off the first example's fields:
    ``choices`` + ``label`` -> multiple_choice; ``test`` + ``entry_point`` -> code;
    otherwise generate (``prompt`` + ``answer``, compared by exact match)."""
    rows = read_rows(path)
    if not rows or not isinstance(rows[0], Mapping):
        raise ConfigError(f"{str(path)!r} holds no JSON objects to evaluate")
    first = rows[0]
    name = path.name.split(".")[0]
    if "choices" in first and "label" in first:
        prompt = "{prompt}" if "prompt" in first else "{question}"
        return Task(name=name, kind="multiple_choice", data=str(path), prompt=prompt)
    if "test" in first and "entry_point" in first:
        return Task(name=name, kind="code", data=str(path), prompt="{prompt}")
    if "prompt" not in first:
        raise ConfigError(
            f"{str(path)!r}: each example needs a 'prompt' field (and 'answer' for exact "
            "match), or write a task YAML that names its fields"
        )
    target = next((t for t in ("answer", "target", "references") if t in first), None)
    if target is None:
        raise ConfigError(
            f"{str(path)!r}: each example needs an 'answer' (or 'target'/'references') field "
            "with the gold answer, or write a task YAML with a user metric"
        )
    return Task(name=name, data=str(path), target=target)


def load_task(spec: str | Path | Task, **overrides: Any) -> Task:
    """A task from a built-in name, a ``.yaml``/``.yml`` definition or a data file."""
    if isinstance(spec, Task):
        task = spec
    else:
        text = str(spec)
        path = Path(text).expanduser()
        if text in builtin_tasks():
            path = data_dir() / f"{text}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"no task {text!r}: give a built-in task ({', '.join(builtin_tasks())}), a task "
                ".yaml file or a .jsonl data file"
            )
        if path.suffix in (".yaml", ".yml"):
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"task file {str(path)!r} is not valid YAML: {err}") from None
            if not isinstance(data, Mapping):
                raise ConfigError(f"task file {str(path)!r} must hold a mapping")
            task = task_from_mapping(data, root=str(path.parent), name=path.stem)
        else:
            task = infer_task(path)
    clean = {k: v for k, v in overrides.items() if v is not None}
    return replace(task, **clean) if clean else task


def option_continuations(task: Task, example: Mapping[str, Any]) -> list[str]:
    """The continuation scored for each option of a multiple-choice example."""
    return [task.choice_prefix + o for o in task.options(example)]


def code_program(task: Task, example: Mapping[str, Any], completion: str, marker: str) -> str:
    """The program that tests one completion: prompt + completion, the tests, the check call,
    then ``marker`` (printed only if every test ran)."""
    prompt = task.format(task.prompt, example)
    body = completion
    entry = str(example.get(task.entry_point, ""))
    if task.extract == "code":
        body = get_extractor("code")(completion) or ""
        if f"def {entry}" in body:  # a whole function: it redefines the prompt's stub
            body = "\n" + body
    test = str(example.get(task.test, ""))
    if not entry or not test:
        raise ConfigError(
            f"task {task.name!r}: example {example.get('id')!r} needs fields "
            f"{task.entry_point!r} and {task.test!r}"
        )
    return f"{prompt}{body}\n\n{test}\n\ncheck({entry})\nprint({marker!r})\n"


def examples_by_id(rows: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {str(r["id"]): r for r in rows}
