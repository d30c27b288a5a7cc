"""The reproduction's screened tasks: answer shells scored strict and lenient, the candidate
generators, the selection rule and its prediction, users' task files, the 3-shot prompt, the
paired differences and the alpha grid's extension."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxytune.errors import ConfigError
from proxytune.evaluation.stats import diff_interval, mean_interval
from proxytune.evaluation.systems import System
from proxytune.reproduce import preset
from proxytune.reproduce.config import next_value
from proxytune.reproduce.pipeline import _best
from proxytune.reproduce.scoring import (
    complies,
    first_literal,
    scoring_fields,
    shell_content,
    shell_metrics,
)
from proxytune.reproduce.screen import Screened, SelectionRule, failures, select
from proxytune.reproduce.taskfile import load_task_file
from proxytune.reproduce.tasks import CANDIDATES, fewshot_prefix, make_splits, task_kind

SIZES = {"shots": 3, "screen": 10, "train": 10, "validation": 5, "test": 10}


def row(answer: str, strict: str, lenient: str, **extra) -> dict:
    return {"answer": answer, **scoring_fields("#### {answer}", strict, lenient), **extra}


# --- scoring -------------------------------------------------------------------------------


def test_strict_needs_the_shell_and_lenient_the_first_candidate() -> None:
    ex = row("292", "number", "number")
    assert shell_metrics("#### 292", ex) == {"strict": 1.0, "lenient": 1.0}
    assert shell_metrics(" #### 292\nmore", ex) == {"strict": 1.0, "lenient": 1.0}
    assert shell_metrics("292", ex) == {"strict": 0.0, "lenient": 1.0}
    assert shell_metrics("The total is 292 legs.", ex) == {"strict": 0.0, "lenient": 1.0}
    assert shell_metrics("#### 292 legs", ex) == {"strict": 0.0, "lenient": 1.0}
    # a list of guesses scores only when its first guess is right
    assert shell_metrics("290, 291, 292", ex) == {"strict": 0.0, "lenient": 0.0}
    assert shell_metrics("#### 290", ex) == {"strict": 0.0, "lenient": 0.0}
    assert shell_metrics("\n292", ex) == {"strict": 0.0, "lenient": 1.0}  # first non-blank
    assert shell_metrics(None, ex) == {"strict": 0.0, "lenient": 0.0}


def test_python_literals_compare_by_value_and_type() -> None:
    ex = row("'a'", "python", "python")
    assert shell_metrics("#### 'a'", ex)["strict"] == 1.0
    assert shell_metrics('#### "a"', ex)["strict"] == 1.0  # the same string
    assert shell_metrics("It evaluates to 'a', the third letter", ex)["lenient"] == 1.0
    assert shell_metrics("'b' or 'a'", ex)["lenient"] == 0.0
    assert shell_metrics("a", ex)["lenient"] == 0.0  # a name, not the string
    lst = row("[1, 2]", "python", "python")
    assert shell_metrics("#### [1,2]", lst)["strict"] == 1.0
    assert shell_metrics("`[1, 2]`", lst)["lenient"] == 1.0
    assert shell_metrics("#### (1, 2)", lst)["strict"] == 0.0  # a tuple is not a list
    assert first_literal("-3 then 4") == -3
    assert first_literal("True, of course") is True


def test_contains_takes_the_first_possible_answer() -> None:
    ex = row("Yes", "first-line-contains", "first-line-contains", alternatives=["No", "Yes"])
    assert shell_metrics("#### Yes", ex) == {"strict": 1.0, "lenient": 1.0}
    assert shell_metrics("Yes, it follows.", ex) == {"strict": 0.0, "lenient": 1.0}
    assert shell_metrics("No. Yes.", ex)["lenient"] == 0.0
    assert shell_metrics("Eyes", ex)["lenient"] == 0.0  # whole words only
    exact = row("06:09", "exact", "first-line-contains")
    assert shell_metrics("#### 06:09", exact)["strict"] == 1.0
    assert shell_metrics("It took 06:09.", exact) == {"strict": 0.0, "lenient": 1.0}
    choice = row("B", "choice", "choice")
    assert shell_metrics("#### B", choice)["strict"] == 1.0
    assert shell_metrics("(B) because", choice)["lenient"] == 1.0
    assert shell_metrics("A or B", choice)["lenient"] == 0.0


def test_format_compliance_ignores_the_content() -> None:
    assert complies("#### anything at all", "#### {answer}")
    assert not complies("anything", "#### {answer}")
    assert not complies("####", "#### {answer}")
    assert shell_content('{"answer": 3}', '{"answer": {answer}}') == "3"
    with pytest.raises(ConfigError, match=r"must hold '\{answer\}' exactly once"):
        scoring_fields("####", "exact", "exact")
    with pytest.raises(ConfigError, match="unknown scorer 'fuzzy'"):
        scoring_fields("#### {answer}", "fuzzy", "exact")


# --- candidates --------------------------------------------------------------------------


def test_there_are_eight_candidates_with_short_shelled_answers() -> None:
    assert len(CANDIDATES) >= 8
    for name in CANDIDATES:
        kind = task_kind(name)
        splits = make_splits(kind, SIZES, seed=0)
        assert splits == make_splits(kind, SIZES, seed=0)  # a pure function of the seed
        for ex in splits["test"]:
            # the taught answer is the right one, strictly
            score = shell_metrics(ex["completion"], ex) if "shell" in ex else None
            if score is not None:
                assert score == {"strict": 1.0, "lenient": 1.0}, (name, ex)
                assert kind.follows_format(ex["completion"])


def test_pyexpr_answers_are_what_python_says() -> None:
    rows = task_kind("pyexpr").make(200, 5)
    assert len({r["expression"] for r in rows}) == 200
    for r in rows:
        assert repr(eval(r["expression"])) == r["answer"]  # our own templates
        assert r["question"] == f"What does {r['expression']} evaluate to?"
        assert r["completion"] == f" #### {r['answer']}"


def test_the_fewshot_prefix_is_the_shots_in_the_taught_format() -> None:
    kind = task_kind("gcd")
    shots = make_splits(kind, SIZES, 0)["shots"]
    prefix = fewshot_prefix(kind, shots)
    assert prefix.count("Q: ") == 3 and prefix.count(" #### ") == 3 and prefix.endswith("\n\n")
    assert prefix.startswith("Q: " + shots[0]["question"] + "\nA: #### " + shots[0]["answer"])


def test_a_system_prefix_goes_before_every_prompt_and_into_its_description() -> None:
    seen = []

    class Tuner:
        rule, members, pairs = "proxy", [], []

        def generate(self, prompts, **kw):
            seen.extend(prompts)
            return []

    system = System("base-3shot", Tuner(), "other", prefix="SHOTS\n\n")
    system.generate(["Q: a\nA:"])
    assert seen == ["SHOTS\n\nQ: a\nA:"]
    assert system.describe()["prefix"] == "SHOTS\n\n"
    assert "prefix" not in System("base", Tuner(), "base").describe()


# --- selection ---------------------------------------------------------------------------


def screened(**kw) -> Screened:
    values = {
        "base_strict": 0.0,
        "base_lenient": 0.7,
        "fewshot_strict": 0.6,
        "fewshot_lenient": 0.75,
        "small_strict": 0.0,
        "small_lenient": 0.3,
        "answer_tokens": 5,
        "n": 40,
    }
    return Screened(**{**values, **kw})


def test_the_selection_rule_by_hand() -> None:
    rule = SelectionRule()
    good = screened()
    assert failures(good, rule) == []
    assert good.expected_tuned == 0.75
    assert good.predicted_closure == pytest.approx(0.7 / 0.75)
    assert failures(screened(base_strict=0.5), rule)[0].startswith("base strict 50.0% > 20.0%")
    assert "expected tuned" in failures(screened(base_lenient=0.4, fewshot_lenient=0.5), rule)[0]
    assert "0.8 x expected tuned" in failures(screened(base_lenient=0.5), rule)[0]
    assert "leads small" in failures(screened(small_lenient=0.65), rule)[0]
    assert "tokens" in failures(screened(answer_tokens=9), rule)[0]
    no_gap = screened(base_strict=0.8, base_lenient=0.8, fewshot_lenient=0.8)
    assert no_gap.predicted_closure is None
    pool = {
        "a": screened(base_lenient=0.7),
        "b": screened(base_lenient=0.9, fewshot_lenient=0.9),
        "c": screened(base_strict=0.9),  # fails
        "d": screened(base_lenient=0.8, fewshot_lenient=0.8),
        "e": screened(base_lenient=0.65, fewshot_lenient=0.7),
    }
    assert select(pool, rule) == ["b", "d", "a"]  # largest expected gap first, three of them


# --- task files --------------------------------------------------------------------------


def write_task(tmp_path: Path, rows: int = 40, **spec) -> Path:
    data = tmp_path / "capitals.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": f"What is the capital of land {i}?", "answer": f"City{i}"})
            + "\n"
            for i in range(rows)
        )
    )
    spec = {
        "name": "capitals",
        "data": "capitals.jsonl",
        "strict": "exact",
        "lenient": "first-line-contains",
        **spec,
    }
    path = tmp_path / "capitals.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


def test_a_task_file_is_a_task_like_the_built_ins(tmp_path) -> None:
    kind = load_task_file(str(write_task(tmp_path, sizes=dict(SIZES, screen=10))))
    assert kind.name == "capitals" and kind.primary == "strict" and kind.limited
    splits = make_splits(kind, kind.sizes, seed=1)
    ex = splits["test"][0]
    assert ex["completion"] == f" #### {ex['answer']}"
    assert shell_metrics(f"#### {ex['answer']}", ex)["strict"] == 1.0
    assert shell_metrics(f"It is {ex['answer']}.", ex) == {"strict": 0.0, "lenient": 1.0}
    other = next(a for a in ex["alternatives"] if a != ex["answer"])
    assert shell_metrics(f"{other} or {ex['answer']}", ex)["lenient"] == 0.0
    config = preset("tiny", str(tmp_path / "out"), task_files=(str(tmp_path / "capitals.yaml"),))
    assert "capitals" in config.screened()
    assert config.run_tasks(["arith"]) == ("arith", "capitals", "sort_words")
    assert config.split_sizes("capitals")["screen"] == 10


@pytest.mark.parametrize(
    ("spec", "rows", "message"),
    [
        ({"strict": "fuzzy"}, 40, "strict scorer 'fuzzy' is unknown; choose from exact"),
        ({"name": "a b"}, 40, "may hold only letters"),
        ({"extra": 1}, 40, r"unknown key\(s\) \['extra'\]"),
        ({"prompt": "Q: {query}"}, 40, "does not fit the rows"),
        ({"shell": "####"}, 40, r"must hold '\{answer\}' exactly once"),
        ({"data": "missing.jsonl"}, 40, "does not exist"),
        ({"sizes": {"train": 1}}, 40, "sizes must give every split"),
    ],
)
def test_bad_task_files_are_refused_in_one_line(tmp_path, spec, rows, message) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_task_file(str(write_task(tmp_path, rows, **spec)))
    assert "\n" not in str(err.value) and "task file" in str(err.value)


def test_a_task_file_too_small_for_its_splits_names_the_numbers(tmp_path) -> None:
    kind = load_task_file(str(write_task(tmp_path, rows=20)))
    with pytest.raises(ConfigError, match="has 20 examples but the splits ask for 493"):
        sizes = {"shots": 3, "screen": 40, "train": 200, "validation": 50, "test": 200}
        make_splits(kind, sizes, 0)
    with pytest.raises(ConfigError, match=r"task file 'nope\.yaml' does not exist"):
        load_task_file("nope.yaml")


# --- evaluation --------------------------------------------------------------------------


def test_paired_differences_share_the_resamples() -> None:
    a = [1.0] * 60 + [0.0] * 40
    b = [1.0] * 30 + [0.0] * 70
    d = diff_interval(a, b)
    assert d.value == pytest.approx(0.3)
    assert d.low > 0.15 and d.high < 0.45
    assert diff_interval(a, a).low == 0.0 == diff_interval(a, a).high  # paired: no spread
    assert mean_interval([x - y for x, y in zip(a, b, strict=True)]) == d


def test_a_sweep_at_its_edge_goes_on_beyond_it() -> None:
    assert next_value("proxy", [0.5, 1.0, 3.0]) == 4.5
    assert next_value("product", [0.5, 4.5]) == 6.75
    # nudging's gamma is a probability: halfway to 1, never past it
    gammas = [0.2, 0.4, 0.6, 0.8]
    for expected in (0.9, 0.95, 0.975, 0.9875):
        gammas.append(next_value("nudging", gammas))
        assert gammas[-1] == expected
    assert max(gammas) < 1


def test_best_alpha_prefers_the_gentler_steer_on_ties() -> None:
    assert _best([0.5, 1.0, 2.0], {"0.5": 0.2, "1": 0.6, "2": 0.6}) == 1.0
    assert _best([0.5, 1.0], {"0.5": None, "1": None}) == 0.5
