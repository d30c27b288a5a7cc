"""The reproduction's tasks: data made offline with fixed seeds, split three ways, and the
evaluation :class:`~proxytune.evaluation.Task` that scores each split.

Three kinds, as in the paper's evaluation (maths, a learned behaviour, truthfulness):

- ``arith``: multiplication word problems (``a * b``, a 12-39, b 3-19) answered with the
  number alone. The instruct base, asked in this raw format, starts explaining instead; tuning
  teaches the bare answer. ``acc`` extracts the last number of the output (the paper's GSM
  extraction), ``strict`` needs the number and nothing else.
- ``sort_words``: sort 4-6 words alphabetically. An instruct model can sort, but tuning
  teaches a new convention (``a | b | c``); ``acc`` checks the order of the words whatever
  the separators, ``strict`` the exact taught line.
- ``truthfulqa``: TruthfulQA MC1 (the vendored BIG-bench subset) with the options shuffled
  and lettered; tuned on the letters of the training questions' true answers. ``acc``: the
  letter the output names is the true option's; ``strict``: the letter alone.

Every generator is a pure function of its seed; the splits are disjoint by construction and
checked again by :func:`check_disjoint`.
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

SPLITS = ("train", "validation", "test")
DATA_VERSION = 3
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
    a, b = rng.randint(12, 39), rng.randint(3, 19)
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
    return _distinct(_arith_one, n, seed, "operands")


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
    return _distinct(_sort_one, n, seed, "words")


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
    ),
}


def task_kind(name: str) -> TaskKind:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


def make_splits(kind: TaskKind, sizes: Mapping[str, int], seed: int) -> dict[str, list[Example]]:
    """Disjoint ``train`` / ``validation`` / ``test`` splits of the sizes asked for."""
    total = sum(sizes[s] for s in SPLITS)
    if any(sizes[s] < (0 if s == "train" else 1) for s in SPLITS):
        raise ConfigError(
            f"task {kind.name!r}: split sizes must be >= 1 (train >= 0), got {dict(sizes)}"
        )
    rows = kind.make(total, seed)
    if len(rows) < total:
        raise ConfigError(
            f"task {kind.name!r} has {len(rows)} examples but the splits ask for {total} "
            f"(train {sizes['train']} + validation {sizes['validation']} + test "
            f"{sizes['test']}); make the splits smaller"
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


def _distinct(
    one: Callable[[random.Random], Example], n: int, seed: int, key: str
) -> list[Example]:
    rng = random.Random(seed)
    out: list[Example] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ConfigError(f"cannot make {n} distinct examples; ask for fewer")
        ex = one(rng)
        if ex[key] not in seen:
            seen.add(ex[key])
            out.append(ex)
    return out
