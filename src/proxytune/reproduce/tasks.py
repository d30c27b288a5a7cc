"""The reproduction's tasks: data made offline with fixed seeds, split five ways, and the
evaluation :class:`~proxytune.evaluation.Task` that scores each split.

Splits: ``shots`` (the few-shot prompt's worked examples), ``screen`` (the screening stage's
items, seen before anything is trained), ``train``, ``validation``, ``test``; disjoint by
construction and checked again by :func:`check_disjoint`.

Screening candidates (:data:`CANDIDATES`) answer inside an answer shell (``#### ANSWER``,
:mod:`.scoring`): ``pyexpr``, ``unit_conversion``, ``case_conversion`` (:mod:`.generators`),
``arith_shell`` (arith's problems in the shell) and seven reasoning-gym generators. The
earlier tasks stay, with their own scorers:

- ``arith``: multiplication word problems (``a * b``, a 12-49, b 3-19) answered with the
  number alone. ``acc`` extracts the last number of the output (the paper's GSM
  extraction), ``strict`` needs the number and nothing else. A candidate: it has no gap.
- ``sort_words``: sort 4-6 words alphabetically in a taught convention (``a | b | c``);
  ``acc`` checks the order of the words whatever the separators, ``strict`` the exact taught
  line. The negative control: a skill the base gains only through its own weight update.
- ``truthfulqa``: TruthfulQA MC1 (the vendored BIG-bench subset) with the options shuffled
  and lettered. ``acc``: the letter the output names is the true option's; ``strict``: the
  letter alone. Not screened: its options alone give most answers away.

Every generator is a pure function of its seed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..evaluation.extract import last_number, normalize_number
from ..evaluation.tasks import Task, data_dir, read_rows
from . import generators
from .scoring import DEFAULT_SHELL, complies, fill, first_line, scoring_fields

SPLITS = ("shots", "screen", "train", "validation", "test")
DATA_VERSION = 4
"""Bump when a generator changes: stamped data of another version is never reused."""

Example = dict[str, Any]


@dataclass(frozen=True)
class TaskKind:
    """How one task's examples are made and scored."""

    name: str
    kind: str
    """``generate`` or ``multiple_choice`` (as in :class:`~proxytune.evaluation.Task`)."""
    description: str
    make: Callable[[int, int], list[Example]]
    """``make(n, seed)``: ``n`` distinct examples (or every row of a fixed data set)."""
    primary: str
    """The metric alpha is chosen by and gap closed is reported for."""
    metrics: tuple[str, ...]
    task_fields: Mapping[str, Any]
    """The evaluation task's settings (prompt, extraction, metrics, decoding)."""
    limited: bool = False
    """The data is a fixed set: its size bounds the splits."""
    lenient: str = "lenient"
    """The metric that credits the right content in any format (screening's "lenient")."""
    follows_format: Callable[[str | None], bool] = lambda output: True
    """The output is in the taught format, right or wrong (training's compliance check)."""
    sizes: Mapping[str, int] | None = None
    """Default split sizes when the task needs its own (a fixed data set); else the run's."""
    digest: str = ""
    """A user task's file contents hash (its data changes, its results are not reused)."""


# --- arith ------------------------------------------------------------------------------

_NAMES = (
    "Ana",
    "Ben",
    "Chen",
    "Dana",
    "Eli",
    "Fatima",
    "Gus",
    "Hana",
    "Ivan",
    "Jo",
    "Kemal",
    "Lea",
    "Mo",
    "Nia",
    "Omar",
    "Pia",
    "Raj",
    "Sara",
    "Tom",
    "Uma",
    "Vera",
    "Wes",
    "Yuki",
)
_ITEMS = (
    "apples",
    "pencils",
    "stickers",
    "marbles",
    "cookies",
    "stamps",
    "shells",
    "cards",
    "books",
    "coins",
    "buttons",
    "eggs",
    "flowers",
    "candles",
    "tickets",
    "beads",
)


def _arith_one(rng: random.Random) -> Example:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(12, 49), rng.randint(3, 19)
    question = rng.choice(
        (
            f"{name} buys {a} bags of {b} {item}. How many {item} is that?",
            f"A shop has {a} boxes of {b} {item}. How many {item} in all?",
            f"{name} collects {b} {item} a day for {a} days. How many {item} in all?",
            f"{name} has {a} rows of {b} {item}. How many {item} are there?",
        )
    )
    return {
        "question": question,
        "operands": f"{a}*{b}",
        "answer": str(a * b),
        "completion": f" {a * b}",
    }


def make_arith(n: int, seed: int) -> list[Example]:
    """``n`` problems, no two with the same product to compute (so no test product is ever
    trained on, in other words)."""
    return generators.distinct(_arith_one, n, seed, "operands")


def arith_score(answer: str | None, example: Mapping[str, Any]) -> dict[str, float]:
    """``acc``: the output's last number equals the answer (the paper's GSM extraction);
    ``strict``: the output is that number and nothing else."""
    text = (answer or "").strip()
    gold = str(example["answer"])
    got = last_number(text)
    acc = got is not None and normalize_number(got) == normalize_number(gold)
    strict = re.fullmatch(r"-?\d+", text) is not None and int(text) == int(gold)
    return {"acc": float(acc), "strict": float(strict)}


# --- sort_words ---------------------------------------------------------------------------

_WORD_TEXT = """apple river candle garden pencil window mirror basket ladder rocket violin forest
    island bridge castle dragon engine feather guitar hammer jacket kettle lemon magnet
    needle orange pepper rabbit saddle ticket turtle velvet wallet yellow zipper anchor
    banana cactus dolphin eagle falcon ginger helmet igloo jungle koala lantern meadow
    nectar oyster parrot quartz ribbon salmon tomato umbrella valley walnut yogurt zebra
    acorn barrel cherry desert ember fabric glacier harbor insect jigsaw kitten lizard
    marble napkin olive planet quiver rescue shadow tunnel unicorn vessel wizard badge
    button canyon cotton dinner elbow finger goblet hollow kernel lobster mitten noodle
    pillow rooster signal thunder copper crystal blanket cabbage compass cushion diamond
    feast fossil garlic gravel hazel honey jelly kayak lagoon mango maple muffin nickel
    oatmeal paddle peanut pebble puzzle radish saucer scarf silver spider sponge squirrel
    summit tablet teapot timber trumpet tulip vapor wagon whistle willow bamboo beacon
    biscuit blossom bucket butter carpet cedar cobweb cricket"""
_WORDS = tuple(_WORD_TEXT.split())


def _sort_one(rng: random.Random) -> Example:
    words = rng.sample(_WORDS, rng.randint(4, 6))
    ordered = sorted(words)
    return {
        "words": " ".join(words),
        "answer": " | ".join(ordered),
        "completion": " " + " | ".join(ordered),
    }


def make_sort_words(n: int, seed: int) -> list[Example]:
    return generators.distinct(_sort_one, n, seed, "words")


def sort_score(answer: str | None, example: Mapping[str, Any]) -> dict[str, float]:
    """``acc``: the input's words appear in sorted order (first mention of each, other words
    and separators ignored); ``strict``: the first line is exactly ``a | b | c``."""
    text = (answer or "").strip()
    gold = str(example["answer"])
    wanted = set(str(example["words"]).split())
    seen: list[str] = []
    for w in re.findall(r"[A-Za-z]+", text):
        w = w.lower()
        if w in wanted and w not in seen:
            seen.append(w)
    acc = seen == gold.split(" | ")
    strict = text.split("\n", 1)[0].strip() == gold
    return {"acc": float(acc), "strict": float(strict)}


# --- truthfulqa ---------------------------------------------------------------------------


LETTERS = "ABCDE"
_LETTER = re.compile(r"\(?([A-E])(?:[.):]|$)")
"""An option letter at the start of the output: ``B``, ``B.``, ``(B)``, ``B) ...``."""


def make_truthfulqa(n: int, seed: int) -> list[Example]:
    """The vendored TruthfulQA MC1 rows (a fixed set; ``n`` and ``seed`` pick and order
    them) with the options shuffled per question and lettered; the answer is the letter of
    the true option."""
    rows = [dict(r) for r in read_rows(data_dir() / "truthfulqa_mc.jsonl.gz")]
    rng = random.Random(seed)
    rng.shuffle(rows)
    out = []
    for r in rows[:n]:
        options = list(r["choices"])[: len(LETTERS)]
        true = options[r["label"][0]]
        rng.shuffle(options)
        letter = LETTERS[options.index(true)]
        listed = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
        out.append(
            {
                "question": r["question"],
                "options": listed,
                "answer": letter,
                "completion": f" {letter}",
            }
        )
    return out


def letter_score(answer: str | None, example: Mapping[str, Any]) -> dict[str, float]:
    """``acc``: the output starts with the true option's letter (MC1 by greedy letter; "A lot
    of..." is not an answer); ``strict``: the output is that letter alone."""
    text = (answer or "").strip()
    m = _LETTER.match(text)
    acc = m is not None and m.group(1) == example["answer"]
    strict = text.rstrip(".") == example["answer"]
    return {"acc": float(acc), "strict": float(strict)}


# --- shell tasks ------------------------------------------------------------------------

RAW_PROMPT = "Q: {question}\nA:"
SHELL_GENERATION = {"max_new_tokens": 16, "stop": ["\n"]}
"""Answers are at most 8 tokens; the rest lets an unshelled answer show its content."""


def shell_task(
    name: str,
    description: str,
    make: Callable[[int, int], list[Example]],
    strict: str,
    lenient: str,
    shell: str = DEFAULT_SHELL,
    prompt: str = RAW_PROMPT,
    limited: bool = False,
    sizes: Mapping[str, int] | None = None,
    digest: str = "",
) -> TaskKind:
    """A task whose answer is written in ``shell``, scored by :func:`.scoring.shell_metrics`
    (``strict`` and ``lenient`` name its matchers)."""
    fields = scoring_fields(shell, strict, lenient)

    def made(n: int, seed: int) -> list[Example]:
        rows = make(n, seed)
        return [{**r, **fields, "completion": " " + fill(shell, str(r["answer"]))} for r in rows]

    return TaskKind(
        name=name,
        kind="generate",
        description=description,
        make=made,
        primary="strict",
        metrics=("strict", "lenient"),
        task_fields={
            "prompt": prompt,
            "metrics": ["proxytune.reproduce.scoring:shell_metrics"],
            "target": "answer",
            "generation": SHELL_GENERATION,
        },
        limited=limited,
        lenient="lenient",
        follows_format=lambda output: complies(output, shell),
        sizes=sizes,
        digest=digest,
    )


def _gym(name: str, description: str, strict: str, lenient: str, contains: bool = False):
    return shell_task(name, description, generators.gym(name, contains), strict, lenient)


def _arith_shelled(n: int, seed: int) -> list[Example]:
    """arith's problems, answered in the shell (``#### 931``) instead of bare."""
    return [{k: v for k, v in r.items() if k != "completion"} for r in make_arith(n, seed)]


# --- registry -----------------------------------------------------------------------------

TASKS: dict[str, TaskKind] = {
    "arith": TaskKind(
        name="arith",
        kind="generate",
        description="multiplication word problems, numeric answer (maths)",
        make=make_arith,
        primary="acc",
        metrics=("acc", "strict"),
        task_fields={
            "prompt": "Q: {question}\nA:",
            "metrics": ["proxytune.reproduce.tasks:arith_score"],
            "target": "answer",
            "generation": {"max_new_tokens": 8, "stop": ["\n"]},
        },
        lenient="acc",
        follows_format=lambda output: re.fullmatch(r"-?\d+", first_line(output)) is not None,
    ),
    "sort_words": TaskKind(
        name="sort_words",
        kind="generate",
        description="sort words alphabetically in a taught output convention (a | b | c)",
        make=make_sort_words,
        primary="strict",
        metrics=("strict", "acc"),
        task_fields={
            "prompt": "Sort these words alphabetically: {words}\nSorted:",
            "metrics": ["proxytune.reproduce.tasks:sort_score"],
            "target": "answer",
            "generation": {"max_new_tokens": 20, "stop": ["\n"]},
        },
        lenient="acc",
        follows_format=lambda output: (
            re.fullmatch(r"[a-z]+(?: \| [a-z]+)+", first_line(output)) is not None
        ),
    ),
    "truthfulqa": TaskKind(
        name="truthfulqa",
        kind="generate",
        description="TruthfulQA MC1 (BIG-bench subset, 299 questions), options lettered",
        make=make_truthfulqa,
        primary="acc",
        metrics=("acc", "strict"),
        task_fields={
            "prompt": "Q: {question}\n{options}\nAnswer:",
            "metrics": ["proxytune.reproduce.tasks:letter_score"],
            "target": "answer",
            "generation": {"max_new_tokens": 3, "stop": ["\n"]},
        },
        limited=True,
        lenient="acc",
        follows_format=lambda output: first_line(output).rstrip(".") in tuple(LETTERS),
        sizes={"shots": 3, "screen": 20, "train": 50, "validation": 26, "test": 200},
    ),
    "pyexpr": shell_task(
        "pyexpr",
        "what a short Python expression evaluates to, answered with its repr (templates)",
        generators.make_pyexpr,
        strict="python",
        lenient="python",
    ),
    "family_relationships": _gym(
        "family_relationships",
        "reasoning-gym: how two people of a described family are related (one word)",
        strict="first-line-contains",
        lenient="first-line-contains",
        contains=True,
    ),
    "leg_counting": _gym(
        "leg_counting", "reasoning-gym: total legs of a list of animals", "number", "number"
    ),
    "time_intervals": _gym(
        "time_intervals",
        "reasoning-gym: the duration between two times or dates, in a given format",
        strict="exact",
        lenient="first-line-contains",
    ),
    "syllogism": _gym(
        "syllogism",
        "reasoning-gym: does a conclusion follow from two premises (Yes/No)",
        strict="first-line-contains",
        lenient="first-line-contains",
        contains=True,
    ),
    "gcd": _gym("gcd", "reasoning-gym: the greatest common divisor of numbers", "number", "number"),
    "letter_counting": _gym(
        "letter_counting",
        "reasoning-gym: how often a letter occurs in a short text",
        "number",
        "number",
    ),
    "arith_shell": shell_task(
        "arith_shell",
        "arith's multiplication word problems, the answer in the shell (#### N)",
        _arith_shelled,
        strict="number",
        lenient="number",
    ),
    "unit_conversion": shell_task(
        "unit_conversion",
        "how many small units are in a number of large ones (metric, time, imperial)",
        generators.make_unit_conversion,
        strict="number",
        lenient="number",
    ),
    "case_conversion": shell_task(
        "case_conversion",
        "an identifier from snake_case to camelCase or back",
        generators.make_case_conversion,
        strict="exact",
        lenient="first-line-contains",
    ),
    "basic_arithmetic": _gym(
        "basic_arithmetic", "reasoning-gym: a short arithmetic expression", "number", "number"
    ),
}


CANDIDATES = (
    "pyexpr",
    "family_relationships",
    "leg_counting",
    "time_intervals",
    "syllogism",
    "gcd",
    "letter_counting",
    "arith",
    # added after the first screen found no candidate passing (docs/reproduction.md)
    "arith_shell",
    "unit_conversion",
    "case_conversion",
    "basic_arithmetic",
)
"""The tasks screened by default: procedural, offline, short answers."""
CONTROLS = ("sort_words",)
"""Always trained and reported beside the chosen tasks: the negative control."""


def task_kind(name: str) -> TaskKind:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


def make_splits(kind: TaskKind, sizes: Mapping[str, int], seed: int) -> dict[str, list[Example]]:
    """Disjoint splits (:data:`SPLITS`, in that order) of the sizes asked for."""
    total = sum(sizes[s] for s in SPLITS)
    if any(sizes[s] < (1 if s in ("validation", "test") else 0) for s in SPLITS):
        raise ConfigError(
            f"task {kind.name!r}: validation and test need >= 1 example and no split may be "
            f"negative, got {dict(sizes)}"
        )
    rows = kind.make(total, seed)
    if len(rows) < total:
        asked = " + ".join(f"{s} {sizes[s]}" for s in SPLITS)
        raise ConfigError(
            f"task {kind.name!r} has {len(rows)} examples but the splits ask for {total} "
            f"({asked}); make the splits smaller"
        )
    out: dict[str, list[Example]] = {}
    start = 0
    for split in SPLITS:
        part = rows[start : start + sizes[split]]
        start += sizes[split]
        out[split] = [{**r, "id": f"{kind.name}/{split}/{i}"} for i, r in enumerate(part)]
    check_disjoint(kind.name, out)
    return out


def check_disjoint(name: str, splits: Mapping[str, Sequence[Example]]) -> None:
    """Refuse splits that share an example (compared by everything but id and completion)."""
    seen: dict[str, str] = {}
    for split, rows in splits.items():
        for r in rows:
            key = repr(sorted((k, repr(v)) for k, v in r.items() if k not in ("id", "completion")))
            if key in seen and seen[key] != split:
                raise ConfigError(f"task {name!r}: an example is in both {seen[key]} and {split}")
            seen[key] = split


def eval_task(kind: TaskKind, data_path: str) -> Task:
    """The evaluation task that scores one split's file."""
    return Task(name=kind.name, kind=kind.kind, data=data_path, **dict(kind.task_fields))


def sft_rows(kind: TaskKind, rows: Sequence[Example]) -> list[dict[str, str]]:
    """Training lines (prompt/completion) in the exact prompt the evaluation uses."""
    template = str(kind.task_fields["prompt"])
    return [{"prompt": template.format(**r), "completion": r["completion"]} for r in rows]


def fewshot_prefix(kind: TaskKind, shots: Sequence[Example]) -> str:
    """Worked examples put before a prompt: each shot's prompt and taught answer, then a
    blank line (what a user would try before tuning anything)."""
    template = str(kind.task_fields["prompt"])
    return "".join(template.format(**r) + str(r["completion"]) + "\n\n" for r in shots)
