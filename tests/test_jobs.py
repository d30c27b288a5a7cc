"""Batch jobs from a JSONL file: per-line settings, errors by line, resume after a kill."""

from __future__ import annotations

import json

import pytest

from proxytune.cli import main
from proxytune.jobs import iter_results, run_jobs

LINES = [
    {"id": "a", "prompt": "The quick brown fox", "max_new_tokens": 6},
    {"id": "b", "prompt": "Rain", "max_new_tokens": 6},
    "{not json",
    {"id": "c", "messages": [{"role": "user", "content": "Hi"}], "max_new_tokens": 5},
    {"id": "d", "prompt": "Numbers: 0 1", "alpha": 0.5, "temperature": 0.9, "seed": 3, "n": 2},
    {"id": "e", "prompt": "x", "colour": "red"},
    {"prompt": "Once upon a", "max_new_tokens": 4},
]


def write_input(path):
    path.write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x) for x in LINES) + "\n\n",
        encoding="utf-8",
    )
    return path


def alone(tuner, line: dict) -> list[list[int]]:
    """What the line's prompt gives generated on its own (the reference)."""
    settings = {k: v for k, v in line.items() if k not in ("id", "prompt", "messages", "alpha")}
    settings.setdefault("max_new_tokens", 8)
    prompt = line.get("prompt", line.get("messages"))
    return [r.token_ids for r in tuner.generate([prompt], line.get("alpha"), **settings)]


def by_id(path) -> dict[str, dict]:
    rows = list(iter_results(path))
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "an id written twice"
    return {r["id"]: r for r in rows}


def test_every_line_equals_its_prompt_alone_and_errors_name_their_line(tuner, tmp_path):
    source = write_input(tmp_path / "in.jsonl")
    summary = run_jobs(
        tuner, source, tmp_path / "out.jsonl", batch_size=2, defaults={"max_new_tokens": 8}
    )
    assert (summary.done, summary.failed, summary.skipped) == (5, 2, 0)
    rows = by_id(tmp_path / "out.jsonl")
    for line in (x for x in LINES if isinstance(x, dict) and "colour" not in x):
        key = line.get("id", "line-7")
        assert [r["token_ids"] for r in rows[key]["results"]] == alone(tuner, line), key
    assert rows["line-3"]["error"].startswith("line 3: not valid JSON")
    assert "unknown key(s) ['colour']" in rows["e"]["error"] and rows["e"]["line"] == 6


def test_a_killed_job_resumes_without_losing_or_repeating_a_line(tuner, tmp_path):
    source, target = write_input(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    run_jobs(tuner, source, target, batch_size=3)
    full = by_id(target)
    kept = target.read_text().splitlines()[:3]
    target.write_text("\n".join(kept) + "\n" + '{"id": "d", "results": [{"te')  # torn by a kill
    summary = run_jobs(tuner, source, target, batch_size=3)
    assert summary.skipped == 3 and summary.done + summary.failed == len(LINES) - 3
    assert by_id(target) == full
    again = run_jobs(tuner, source, target)
    assert (again.done, again.failed, again.skipped) == (0, 0, len(LINES))


def test_refusals(tuner, tmp_path):
    source = write_input(tmp_path / "in.jsonl")
    foreign = tmp_path / "notes.txt"
    foreign.write_text("my notes\n")
    with pytest.raises(Exception, match="not a result this command wrote"):
        run_jobs(tuner, source, foreign)
    assert foreign.read_text() == "my notes\n"  # untouched
    with pytest.raises(Exception, match="another file than the input"):
        run_jobs(tuner, source, source)
    with pytest.raises(Exception, match=r"line 3: not valid JSON.*stop-on-error"):
        run_jobs(tuner, source, tmp_path / "o.jsonl", stop_on_error=True)


def test_cli_input_output(tuner, tiny_dirs, tmp_path, capsys):
    source = write_input(tmp_path / "in.jsonl")
    models = ["--base", str(tiny_dirs["base"]), "--expert", str(tiny_dirs["expert"])]
    models += ["--anti-expert", str(tiny_dirs["anti"]), "--device", "cpu"]
    models += ["--base-prompt", "raw", "--expert-prompt", "chat", "--anti-expert-prompt", "raw"]
    out = tmp_path / "out.jsonl"
    args = ["generate", *models, "--input", str(source), "--output", str(out)]
    assert main([*args, "--batch-size", "4", "--max-new-tokens", "8"]) == 0
    assert "5 lines done, 2 failed" in capsys.readouterr().err
    rows = by_id(out)
    assert [r["token_ids"] for r in rows["b"]["results"]] == alone(tuner, LINES[1])
    assert main(["generate", *models, "--input", str(source)]) == 2  # --output missing
    assert main(["generate", *models, "--input", str(source), "--output", str(out), "x"]) == 2
