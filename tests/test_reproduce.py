"""``proxytune reproduce``: the tasks and their scores, the statistics, and a tiny end-to-end
run on the tiny test models (every stage, resume, refusal to mix settings, bad input)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from proxytune.cli import main
from proxytune.errors import ConfigError
from proxytune.evaluation.metrics import multiple_choice_scores
from proxytune.evaluation.stats import gap_interval, mean_gap_interval, mean_interval
from proxytune.reproduce import STAGES, Experiment, preset, reproduce
from proxytune.reproduce.analysis import token_class
from proxytune.reproduce.command import parse_sizes
from proxytune.reproduce.tasks import (
    TASKS,
    arith_score,
    check_disjoint,
    eval_task,
    letter_score,
    make_splits,
    sort_score,
    task_kind,
)
from proxytune.testing import build_tokenizer, save_tiny_model

# --- tasks ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_are_disjoint_deterministic_and_sized(name: str) -> None:
    kind = task_kind(name)
    sizes = {"shots": 2, "screen": 3, "train": 20, "validation": 10, "test": 30}
    a = make_splits(kind, sizes, seed=3)
    assert a == make_splits(kind, sizes, seed=3)
    assert a != make_splits(kind, sizes, seed=4)
    assert {s: len(rows) for s, rows in a.items()} == sizes
    fields = {"arith": "operands", "sort_words": "words"}.get(name, "question")
    seen = [r[fields] for rows in a.values() for r in rows]
    assert len(seen) == len(set(seen))  # no example in two splits
    ids = [r["id"] for rows in a.values() for r in rows]
    assert len(ids) == len(set(ids))


def test_check_disjoint_refuses_a_shared_example() -> None:
    row = {"question": "q", "answer": "1"}
    with pytest.raises(ConfigError, match="both train and test"):
        check_disjoint("t", {"train": [{**row, "id": "a"}], "test": [{**row, "id": "b"}]})


def test_arith_examples_are_right_and_scored_both_ways() -> None:
    sizes = {"shots": 0, "screen": 0, "train": 5, "validation": 5, "test": 40}
    for ex in make_splits(task_kind("arith"), sizes, 0)["test"]:
        assert ex["completion"] == f" {ex['answer']}"
    ex = {"answer": "265"}
    assert arith_score("265", ex) == {"acc": 1.0, "strict": 1.0}
    assert arith_score("23 * 14 = 322, 322 - 57 = 265", ex) == {"acc": 1.0, "strict": 0.0}
    assert arith_score("It is 265 apples, not 300", ex) == {"acc": 0.0, "strict": 0.0}
    assert arith_score("To determine how many", ex) == {"acc": 0.0, "strict": 0.0}
    assert arith_score(None, ex) == {"acc": 0.0, "strict": 0.0}
    assert arith_score("$265", ex) == {"acc": 1.0, "strict": 0.0}
    assert arith_score("265.0", ex)["strict"] == 0.0


def test_sort_score_separates_order_from_format() -> None:
    ex = {"words": "pear apple fig", "answer": "apple | fig | pear"}
    assert sort_score("apple | fig | pear", ex) == {"acc": 1.0, "strict": 1.0}
    assert sort_score("apple, fig, pear", ex) == {"acc": 1.0, "strict": 0.0}
    assert sort_score("1. Apple\n2. Fig\n3. Pear", ex) == {"acc": 1.0, "strict": 0.0}
    assert sort_score("apple | pear | fig", ex) == {"acc": 0.0, "strict": 0.0}
    assert sort_score("apple | fig", ex) == {"acc": 0.0, "strict": 0.0}


def test_truthfulqa_letters_point_at_the_true_option() -> None:
    rows = task_kind("truthfulqa").make(299, 0)
    assert len(rows) == 299
    letters = {r["answer"] for r in rows}
    assert len(letters) > 2  # shuffled: the true option is not always A
    for r in rows[:20]:
        line = next(x for x in r["options"].split("\n") if x.startswith(r["answer"] + ". "))
        assert line  # the gold letter names an option
    assert letter_score("B", {"answer": "B"}) == {"acc": 1.0, "strict": 1.0}
    assert letter_score("B. Nothing happens", {"answer": "B"}) == {"acc": 1.0, "strict": 0.0}
    assert letter_score("A", {"answer": "B"}) == {"acc": 0.0, "strict": 0.0}
    assert letter_score("(B) nothing", {"answer": "B"})["acc"] == 1.0
    assert letter_score("A lot of people say B", {"answer": "A"})["acc"] == 0.0


def test_fixed_data_refuses_splits_that_do_not_fit() -> None:
    with pytest.raises(ConfigError, match="has 299 examples but the splits ask for 400"):
        make_splits(
            task_kind("truthfulqa"),
            {"shots": 0, "screen": 0, "train": 200, "validation": 100, "test": 100},
            0,
        )


def test_token_classes() -> None:
    assert [token_class(t) for t in ("12", " 3", " The", "|", " ", ".")] == [
        "number",
        "number",
        "word",
        "format",
        "format",
        "format",
    ]


# --- statistics -------------------------------------------------------------------------


def test_mean_interval_brackets_the_mean() -> None:
    est = mean_interval([1.0] * 30 + [0.0] * 70)
    assert est.value == pytest.approx(0.3)
    assert est.low < 0.3 < est.high
    assert est.low > 0.15 and est.high < 0.45
    assert mean_interval([1.0] * 10).low == 1.0  # no spread, no width


def test_gap_interval_matches_the_hand_computation() -> None:
    rng = np.random.default_rng(0)
    base = (rng.random(200) < 0.2).astype(float)
    tuned = np.maximum(base, (rng.random(200) < 0.6).astype(float))
    proxy = np.where(rng.random(200) < 0.5, tuned, base)
    est, undefined = gap_interval(proxy, base, tuned)
    expected = (proxy.mean() - base.mean()) / (tuned.mean() - base.mean())
    assert est.value == pytest.approx(expected)
    assert est.low < est.value < est.high
    assert undefined == 0
    same, undefined = gap_interval(base, base, base)
    assert same.value is None and undefined == 2000


def test_mean_gap_interval_averages_tasks_resampled_on_their_own() -> None:
    rng = np.random.default_rng(1)
    base = (rng.random(200) < 0.2).astype(float)
    tuned = np.maximum(base, (rng.random(200) < 0.6).astype(float))
    half = np.where(rng.random(200) < 0.5, tuned, base)
    one = mean_gap_interval([(half, base, tuned)])
    alone, _ = gap_interval(half, base, tuned)
    assert one.value == pytest.approx(alone.value)  # one task: its own gap and interval
    assert (one.low, one.high) == pytest.approx((alone.low, alone.high))
    both = mean_gap_interval([(half, base, tuned), (tuned, base, tuned)])
    assert both.value == pytest.approx((alone.value + 1.0) / 2)
    assert both.low < both.value < both.high
    # two copies of one task are resampled independently: the mean's interval is narrower
    twice = mean_gap_interval([(half, base, tuned)] * 2)
    assert twice.value == pytest.approx(alone.value)
    assert twice.high - twice.low < 0.85 * (alone.high - alone.low)
    # a task without a gap has no closure: no mean
    assert mean_gap_interval([(half, base, tuned), (base, base, base)]).value is None
    assert mean_gap_interval([]).value is None


def test_tied_options_share_the_credit() -> None:
    inf = float("-inf")
    s = multiple_choice_scores([inf, inf, inf, inf], [1, 1, 1, 1], [0])
    assert s["acc"] == 0.25  # every option ruled out: chance, not "the first wins"
    assert s["mc2"] == 0.25
    s = multiple_choice_scores([-1.0, -1.0, -5.0], [1, 1, 1], [1])
    assert s["acc"] == 0.5


# --- end to end on tiny models ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("repro-models")
    small = save_tiny_model(root / "small", seed=1, context=1024)
    big = save_tiny_model(root / "big", seed=0, context=1024)
    return str(small), str(big)


def _config(out: Path, tiny_pair: tuple[str, str], **overrides):
    small, big = tiny_pair
    return preset("tiny", str(out), small=small, big=big, device="cpu", progress=False, **overrides)


def test_tiny_run_every_stage_then_resume_and_refuse_to_mix(tmp_path, tiny_pair) -> None:
    out = tmp_path / "exp"
    lines: list[str] = []
    data = reproduce(_config(out, tiny_pair), log=lines.append)
    assert [line.split("]")[0][1:] for line in lines] == list(STAGES)
    assert all(re.search(r"\d+ s$", line) for line in lines)  # a summary line with wall time
    for name in (
        "results.md",
        "results.csv",
        "results.json",
        "alpha_sweep.png",
        "expert/adapter_model.safetensors",
        "tuned/adapter_model.safetensors",
        "residual/adapter_model.safetensors",
        "analysis/arith/report.html",
    ):
        assert (out / name).is_file(), name
    table = (out / "results.md").read_text()
    assert "| arith | acc | 6 |" in table and "gap closed" in table
    # the format part of each system's score, from its outputs
    assert "## Format or content (test split)" in table
    expert_out = [
        json.loads(x)["outputs"][0] for x in (out / "eval/arith/test/expert.jsonl").open()
    ]
    share = sum(map(task_kind("arith").follows_format, expert_out)) / len(expert_out)
    assert data["format"]["arith"]["expert"] == share
    assert "## Screening (untuned, before training)" in table and "base 3-shot" in table
    # the mean closure averages the chosen tasks with a gap, never the control
    averaged = data["mean_closure"]
    primary = {t: r["metrics"][r["primary"]] for t, r in data["tasks"].items()}
    gapped = [t for t in ("arith", "gcd") if primary[t]["has_gap"]]
    assert averaged["tasks"] == gapped
    assert ("## Gap closed averaged over the chosen tasks" in table) == bool(gapped)
    if gapped:
        gaps = [primary[t]["systems"]["proxy"]["gap"] for t in gapped]
        mean = sum(g["value"] for g in gaps) / len(gaps)
        assert averaged["systems"]["proxy"]["value"] == pytest.approx(mean)
    # the tiny preset's rule passes every candidate; the two with the largest expected gap
    # (all tie at 0: by name) are chosen, then the control
    assert list(data["tasks"]) == ["arith", "gcd", "sort_words"]
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions["chosen"] == ["arith", "gcd"]
    assert set(predictions["screened"]) == {"arith", "pyexpr", "gcd"}
    assert (out / "predictions.json").stat().st_mtime_ns < (
        out / "expert" / "adapter_model.safetensors"
    ).stat().st_mtime_ns  # written before the expert was trained
    for task in data["tasks"]:
        splits = {
            s: [json.loads(x) for x in (out / "data" / task / f"{s}.jsonl").open()]
            for s in ("shots", "screen", "train", "validation", "test")
        }
        check_disjoint(task, splits)
        test_ids = {r["id"] for r in splits["test"]}
        stored = [
            json.loads(x)["id"] for x in (out / "eval" / task / "test" / "proxy.jsonl").open()
        ]
        assert set(stored) == test_ids  # evaluated on the test split only
    # the training file holds every train example and no validation or test prompt
    train_prompts = {json.loads(x)["prompt"] for x in (out / "data" / "train.jsonl").open()}
    assert len(train_prompts) == 8 + 8 + 8
    held_out = {
        eval_task(task_kind(t), str(out / "data" / t / f"{s}.jsonl")).render(ex)
        for t in data["tasks"]
        for s in ("validation", "test")
        for ex in eval_task(task_kind(t), str(out / "data" / t / f"{s}.jsonl")).examples()
    }
    assert len(held_out) == 3 * 4 + 3 * 6 and not held_out & train_prompts
    stamp = json.loads((out / "stages" / "expert.json").read_text())["result"]
    assert set(stamp["compliance"]) == set(data["tasks"]) and stamp["epochs"] == 1.0
    assert stamp["validation_loss_first_last"] is not None
    test_systems = {p.stem for p in (out / "eval" / "arith" / "test").glob("*.jsonl")}
    assert {"base", "base-3shot", "expert", "tuned", "proxy", "product"} <= test_systems
    # the residual rule: its own expert (trained against the frozen big base), at alpha 1
    assert "residual" in test_systems and "residual (loss of the alpha-1 proxy)" in table
    residual = json.loads((out / "stages" / "residual.json").read_text())
    assert residual["settings"]["base"] == tiny_pair[1]
    described = (out / "eval" / "arith" / "test" / "residual.meta.json").read_text()
    assert str(out / "residual") in described and str(out / "expert") not in described
    shot = json.loads((out / "eval" / "arith" / "test" / "base-3shot.jsonl").open().readline())
    assert shot["outputs"] is not None
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert csv_rows[0].startswith("task,metric,system,alpha")

    # resume: every stage is skipped, nothing is retrained or re-evaluated
    before = (out / "expert" / "adapter_model.safetensors").stat().st_mtime_ns
    again: list[str] = []
    reproduce(_config(out, tiny_pair), log=again.append)
    assert all("skipped" in line for line in again[:-1])
    assert again[-1].startswith("[report]")  # the tables are rewritten from stored results
    assert (out / "expert" / "adapter_model.safetensors").stat().st_mtime_ns == before

    # a changed evaluation setting is refused by name, and nothing is lost
    with pytest.raises(ConfigError, match=r"stage 'validation'.*alphas"):
        reproduce(_config(out, tiny_pair, alphas=(0.5, 1.5)), log=lambda _: None)
    # changed data: another experiment
    with pytest.raises(ConfigError, match=r"holds another experiment.*seed"):
        reproduce(_config(out, tiny_pair, seed=1), log=lambda _: None)
    assert (out / "results.md").read_text() == table


def test_interrupted_stages_resume_where_they_stopped(tmp_path, tiny_pair) -> None:
    out = tmp_path / "exp"
    config = _config(out, tiny_pair, tasks=("sort_words",))
    reproduce(config, until="expert", log=lambda _: None)
    assert not (out / "stages" / "tuned.json").exists()
    lines: list[str] = []
    reproduce(config, until="test", log=lines.append)
    assert all("skipped" in line for line in lines[:3])  # screen, data, expert
    assert "skipped" not in lines[3] and lines[3].startswith("[tuned]")

    # a test stage killed mid-write: finished examples are kept, the torn line is dropped,
    # only the rest runs again
    results = out / "eval" / "sort_words" / "test"
    kept = (results / "proxy.jsonl").read_text().splitlines(keepends=True)[:2]
    (results / "proxy.jsonl").write_text("".join(kept) + '{"id": "sort_words/te')
    untouched = (results / "base.jsonl").stat().st_mtime_ns
    (out / "stages" / "test.json").unlink()
    reproduce(config, until="test", log=lambda _: None)
    again = (results / "proxy.jsonl").read_text().splitlines(keepends=True)
    assert again[:2] == kept and len(again) == 6
    assert (results / "base.jsonl").stat().st_mtime_ns == untouched

    # training interrupted, then resumed with another learning rate: refused by name
    (out / "stages" / "expert.json").unlink()
    assert list((out / "expert").glob("checkpoint-*"))
    other = config.with_overrides(learning_rate=1e-3)
    with pytest.raises(ConfigError, match=r"stage 'expert' was interrupted.*learning_rate"):
        reproduce(other, until="expert", log=lambda _: None)
    # another model is another experiment: the screen measured these models
    with pytest.raises(ConfigError, match=r"holds another experiment.*screen\.big"):
        reproduce(config.with_overrides(big=tiny_pair[0]), until="tuned", log=lambda _: None)


def test_bad_input_is_refused_clearly(tmp_path, tiny_pair) -> None:
    with pytest.raises(ConfigError, match="unknown task 'gsm8k'; choose from arith"):
        _config(tmp_path / "x", tiny_pair, tasks=("gsm8k",))
    with pytest.raises(ConfigError, match="unknown rule"):
        _config(tmp_path / "x", tiny_pair, rules=("proxy", "magic"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty and holds no reproduction"):
        reproduce(_config(foreign, tiny_pair), log=lambda _: None)
    assert (foreign / "notes.txt").read_text() == "mine"  # untouched
    big = _config(
        tmp_path / "big",
        tiny_pair,
        tasks=("truthfulqa",),
        sizes={"truthfulqa": {"train": 250, "validation": 40, "test": 100}},
    )
    with pytest.raises(ConfigError, match="make the splits smaller"):
        Experiment(big, lambda _: None).run("data")
    # nothing was finished there, so the same folder takes the corrected sizes
    Experiment(_config(tmp_path / "big", tiny_pair, tasks=("truthfulqa",)), lambda _: None).run(
        "data"
    )
    assert (tmp_path / "big" / "stages" / "data.json").is_file()
    with pytest.raises(ConfigError, match="TASK=TRAIN,VALIDATION,TEST"):
        parse_sizes(["arith=1,2"], ("arith",))


def test_cli_refuses_an_unknown_task_in_one_line(tmp_path, capsys) -> None:
    code = main(["reproduce", "--out", str(tmp_path / "o"), "--tasks", "arith,nope"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown task 'nope'") and "\n" not in err


def test_variants_script_runs_on_a_finished_run(tmp_path, tiny_pair) -> None:
    import subprocess
    import sys

    out = tmp_path / "exp"
    reproduce(_config(out, tiny_pair, tasks=("arith",)), log=lambda _: None)
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "repro_variants.py"
    done = subprocess.run(
        [sys.executable, str(script), str(out), "--variants", "gated,fading,end-only,alpha=3"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = (out / "variants.md").read_text()
    for name in ("proxy", "gated", "fading", "end-only", "proxy@3"):
        assert f"| arith | acc | {name} |" in table
    stored = [json.loads(x) for x in (out / "eval" / "arith" / "variants" / "gated.jsonl").open()]
    assert len(stored) == 6


def test_the_end_only_variant_steers_the_ending_tokens_only() -> None:
    import importlib.util

    import torch

    from proxytune.rules import StepContext

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "repro_variants.py"
    spec = importlib.util.spec_from_file_location("repro_variants", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tok = build_tokenizer()
    ends = module.ending_ids(tok, [tok.eos_token_id])
    assert tok.eos_token_id in ends and len(ends) < len(tok)
    assert all("\n" in tok.decode([i]) for i in ends if i != tok.eos_token_id)
    torch.manual_seed(0)
    base, expert, anti = (torch.randn(2, len(tok)).log_softmax(-1) for _ in range(3))
    rule = module.end_only(ends)
    steered = rule(StepContext(base=base, pairs=((expert, anti),), alphas=(1.5,)))
    others = [i for i in range(len(tok)) if i not in set(ends)]
    assert torch.equal(steered[:, others], base[:, others])
    expected = base[:, ends] + 1.5 * (expert[:, ends] - anti[:, ends])
    torch.testing.assert_close(steered[:, ends], expected)


def test_the_run_evaluates_on_llamacpp_with_the_same_results(tmp_path, tiny_pair) -> None:
    """With GGUFs beside the models, ``backend: auto`` evaluates on llama.cpp (the trained
    LoRAs as llama.cpp adapters): the same greedy outputs as on transformers, and a run made
    on one backend is never resumed on the other."""
    import shutil

    from proxytune.backends import llamacpp
    from proxytune.backends.gguf_write import export_gguf

    if not llamacpp.available():
        pytest.skip(f"llama-cpp-python is not installed ({llamacpp.INSTALL})")
    pair = []
    for path in tiny_pair:
        copy = tmp_path / Path(path).name
        shutil.copytree(path, copy)
        export_gguf(path, tmp_path / "gguf")
        (tmp_path / "gguf" / "model.gguf").rename(copy / "model.gguf")
        shutil.rmtree(tmp_path / "gguf")
        pair.append(str(copy))
    outputs = {}
    for backend in ("transformers", "auto"):
        config = _config(tmp_path / backend, tuple(pair), tasks=("arith",), backend=backend)
        want = "transformers" if backend == "transformers" else "llamacpp"
        assert config.backends() == {"small": want, "big": want}
        reproduce(config, log=lambda _: None)
        outputs[backend] = {
            s: [
                json.loads(x)["outputs"]
                for x in (tmp_path / backend / "eval" / "arith" / "test" / f"{s}.jsonl").open()
            ]
            for s in ("base", "expert", "tuned", "proxy", "product")
        }
    assert outputs["auto"] == outputs["transformers"]
    # the transformers run's evaluation is not resumed on llama.cpp
    with pytest.raises(ConfigError, match=r"another experiment.*backends"):
        reproduce(
            _config(tmp_path / "transformers", tuple(pair), tasks=("arith",)), log=lambda _: None
        )
    with pytest.raises(ConfigError, match="backend must be one of"):
        _config(tmp_path / "x", tiny_pair, backend="vllm")


def test_an_expert_that_misses_the_format_is_trained_again_and_the_tuned_follows(
    tmp_path, tiny_pair
) -> None:
    out = tmp_path / "exp"
    config = _config(out, tiny_pair, tasks=("sort_words",), min_compliance=1.0, max_epochs=2.0)
    lines: list[str] = []
    reproduce(config, until="tuned", log=lines.append)
    # a tiny random model never writes "a | b | c": one retraining, then the cap
    assert any("training again with 2" in line for line in lines)
    expert = json.loads((out / "stages" / "expert.json").read_text())["result"]
    assert expert["epochs"] == 2.0 and [r["epochs"] for r in expert["runs"]] == [1.0, 2.0]
    assert all(r["compliance"]["sort_words"] < 1.0 for r in expert["runs"])
    tuned = json.loads((out / "stages" / "tuned.json").read_text())["result"]
    assert tuned["epochs"] == 2.0  # one recipe for both
    assert (out / "eval" / "sort_words" / "validation" / "expert-e2.jsonl").is_file()


def test_a_screen_that_chooses_nothing_stops_before_training(tmp_path, tiny_pair) -> None:
    from proxytune.reproduce.screen import SelectionRule

    out = tmp_path / "exp"
    strict_rule = SelectionRule(max_base_strict=-1.0)  # no candidate can pass
    with pytest.raises(ConfigError, match="no candidate task passed the selection rule"):
        reproduce(_config(out, tiny_pair, selection=strict_rule), log=lambda _: None)
    assert (out / "predictions.md").is_file() and not (out / "expert").exists()
    assert not (out / "stages" / "screen.json").exists()  # screened again next time


def test_a_task_file_runs_even_where_no_candidate_passes(tmp_path, tiny_pair) -> None:
    from proxytune.reproduce.screen import SelectionRule

    data = tmp_path / "mine.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"q{i}?", "answer": str(i)}) + "\n" for i in range(30))
    )
    spec = {"name": "mine", "data": str(data), "strict": "number", "lenient": "number"}
    spec["sizes"] = {"shots": 2, "screen": 4, "train": 8, "validation": 4, "test": 6}
    (tmp_path / "mine.yaml").write_text(json.dumps(spec))
    config = _config(
        tmp_path / "exp",
        tiny_pair,
        selection=SelectionRule(max_base_strict=-1.0),
        task_files=(str(tmp_path / "mine.yaml"),),
    )
    exp = Experiment(config, lambda _: None)
    exp.run("data")
    assert exp.tasks == ("mine", "sort_words")
    predictions = json.loads((tmp_path / "exp" / "predictions.json").read_text())
    assert "mine" in predictions["screened"] and predictions["chosen"] == []
