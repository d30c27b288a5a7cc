"""The regression gate: a new eval run against a saved one, example by example."""

from __future__ import annotations

import json

import pytest

from proxytune.cli import main
from proxytune.errors import ConfigError
from proxytune.evaluation.commands import _gate
from proxytune.evaluation.gate import compare_runs, failures


def write_run(folder, systems: dict[str, list[int]]):
    folder.mkdir(parents=True, exist_ok=True)
    for name, scores in systems.items():
        lines = [json.dumps({"id": f"ex{i}", "scores": {"acc": s, "strict": s}}) for i, s in
                 enumerate(scores)]  # fmt: skip
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


OLD = {"base": [1, 0, 1, 0] * 10, "proxy@1": [1, 1, 1, 0] * 10}


def test_an_identical_run_passes_and_a_worse_one_fails(tmp_path, capsys):
    old = write_run(tmp_path / "old", OLD)
    same = write_run(tmp_path / "same", OLD)
    assert _gate(same, old, "acc", 0.0, seed=0) == 0
    assert "gate: passed" in capsys.readouterr().out
    worse = write_run(tmp_path / "worse", {**OLD, "proxy@1": [1, 0, 1, 0] * 10})
    assert _gate(worse, old, "acc", 0.0, seed=0) == 1
    printed = capsys.readouterr().out
    assert "gate: FAILED (proxy@1 acc -0.250" in printed and "| proxy@1 | acc | 40 |" in printed
    assert _gate(worse, old, "acc", 0.3, seed=0) == 0  # within the allowed drop
    changes = compare_runs(worse, old)
    change = next(c for c in changes if c.system == "proxy@1" and c.metric == "acc")
    assert (change.better, change.worse, change.same) == (0, 10, 30)


def test_noise_is_not_a_drop(tmp_path):
    old = write_run(tmp_path / "old", {"proxy": [1, 0] * 20})
    new = write_run(tmp_path / "new", {"proxy": [0, 1] * 19 + [0, 0]})  # one example worse
    assert failures(compare_runs(new, old), "acc", 0.0) == []  # its interval includes 0


def test_refusals(tmp_path):
    old = write_run(tmp_path / "old", OLD)
    with pytest.raises(ConfigError, match="not a folder of an earlier eval run"):
        compare_runs(old, tmp_path / "missing")
    other = write_run(tmp_path / "other", {"tuned": [1]})
    with pytest.raises(ConfigError, match="share no system"):
        compare_runs(other, old)
    with pytest.raises(ConfigError, match="'f1' is in neither run"):
        failures(compare_runs(old, old), "f1", 0.0)
    assert main(["eval", "arith", "--gate-metric", "acc"]) == 2  # before any model loads


def test_a_results_file_with_a_foreign_line_is_refused_and_kept(tmp_path):
    from proxytune.evaluation.store import ResultStore

    path = tmp_path / "proxy.jsonl"
    text = '{"id": "a", "scores": {"acc": 1}}\nmy notes\n{"id": "b", "scores": {"acc": 0}}\n'
    path.write_text(text)
    with pytest.raises(ConfigError, match="line 2 is not a result this command wrote"):
        ResultStore(path).load()
    assert path.read_text() == text  # nothing cut (it used to be truncated from line 2)
    path.write_text(text.replace("my notes\n", "") + '{"id": "c", "sco')  # torn last line
    assert list(ResultStore(path).load()) == ["a", "b"]
    assert path.read_text().endswith('"acc": 0}}\n')
