"""The real lm-evaluation-harness against ``proxytune serve`` (issue 14): ``lm_eval run
--model local-completions`` with its default settings (token-id prompts; ``echo`` +
``logprobs`` for log-likelihoods) on a generation task and a multiple-choice task written here,
scored exactly as ``proxytune eval`` scores the same items.

Needs ``pip install 'proxytune[lmeval]'`` (``scripts/install.sh`` installs it); skipped without.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "lm_eval",
    reason="lm-eval is not importable (pip install 'proxytune[lmeval]')",
    exc_type=ImportError,
)
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from serving import serve_in_thread

from proxytune.evaluation import System, Task, evaluate
from proxytune.evaluation.scoring import score
from proxytune.evaluation.store import ResultStore
from proxytune.server import ServerSettings, create_app

MODEL = "tiny"
MAX_TOKENS = 12
STOP = "\n"
QUESTIONS = [
    "The quick brown fox",
    "Question: what is two plus three? Answer:",
    "def add(a, b):",
    "Rain falls on the quiet town",
    "Once upon a time there was",
    "Numbers: 0 1 2",
]
CHOICES = ["five", "the lazy dog", "programming in Python", "the sea", "books", "tuning"]


def options(i: int) -> list[str]:
    return CHOICES[i:] + CHOICES[:i]


def recorded(app: Any, bodies: list[dict[str, Any]]) -> Any:
    """``app``, keeping the JSON body of every ``/v1/completions`` request in ``bodies``."""

    async def wrapper(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/completions":
            return await app(scope, receive, send)
        messages = [await receive()]
        while messages[-1].get("more_body"):
            messages.append(await receive())
        bodies.append(json.loads(b"".join(m.get("body", b"") for m in messages)))

        async def replay() -> dict[str, Any]:
            return messages.pop(0) if messages else await receive()

        return await app(scope, replay, send)

    return wrapper


def write_tasks(folder: Path, answers: list[str], labels: list[int]) -> dict[str, Task]:
    """The same two tasks for lm-eval (YAML + JSONL) and for ``proxytune eval`` (Task)."""
    gen = folder / "gen.jsonl"
    mc = folder / "mc.jsonl"
    pairs = enumerate(zip(QUESTIONS, answers, strict=True))
    rows = [{"id": str(i), "question": q, "answer": a} for i, (q, a) in pairs]
    gen.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mc_rows = [
        {"id": str(i), "question": q, "choices": options(i), "label": labels[i]}
        for i, q in enumerate(QUESTIONS)
    ]
    mc.write_text("".join(json.dumps(r) + "\n" for r in mc_rows))
    common = "dataset_path: json\ntest_split: test\ndoc_to_text: '{{question}}'\n"
    (folder / "pt_gen.yaml").write_text(
        "task: pt_gen\n"
        + common
        + f"dataset_kwargs:\n  data_files:\n    test: {gen}\n"
        + "output_type: generate_until\n"
        + "doc_to_target: '{{answer}}'\n"
        + f"generation_kwargs:\n  until: [{json.dumps(STOP)}]\n  max_gen_toks: {MAX_TOKENS}\n"
        + "  do_sample: false\n  temperature: 0.0\n"
        + "metric_list:\n  - metric: exact_match\n"
    )
    (folder / "pt_mc.yaml").write_text(
        "task: pt_mc\n"
        + common
        + f"dataset_kwargs:\n  data_files:\n    test: {mc}\n"
        + "output_type: multiple_choice\n"
        + "doc_to_choice: choices\ndoc_to_target: label\n"
        + "metric_list:\n  - metric: acc\n"
    )
    settings = {"max_new_tokens": MAX_TOKENS, "stop": [STOP]}
    return {
        "pt_gen": Task("pt_gen", "generate", str(gen), "{question}", generation=settings),
        "pt_mc": Task("pt_mc", "multiple_choice", str(mc), "{question}"),
    }


def run_lm_eval(url: str, tokenizer: Path, tasks: Path, out: Path) -> dict[str, list[dict]]:
    """``lm_eval run`` in a subprocess, as a user types it; its per-item samples by task."""
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(out / "hf"))
    args = f"model={MODEL},base_url={url}/v1/completions,tokenizer={tokenizer}"
    command = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions",
               "--model_args", args, "--tasks", "pt_gen", "pt_mc", "--include_path", str(tasks),
               "--output_path", str(out), "--log_samples"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    samples = {}
    for task in ("pt_gen", "pt_mc"):
        (path,) = out.rglob(f"samples_{task}_*.jsonl")
        samples[task] = sorted(
            (json.loads(line) for line in path.read_text().splitlines()),
            key=lambda s: s["doc_id"],
        )
    return samples


def test_lm_eval_local_completions_scores_equal_proxytune_eval(tiny_dirs, raw_tuner, tmp_path):
    tuner = raw_tuner
    # gold answers: the proxy-tuned greedy output for every other item, so that exact match
    # is 1/2 on both sides only if both generate the same text
    outputs = [r.text for r in tuner.generate(QUESTIONS, max_new_tokens=MAX_TOKENS, stop=[STOP])]
    answers = [o if i % 2 == 0 else f"not {o}!" for i, o in enumerate(outputs)]
    # labels: the proxy's likeliest option for every other item (accuracy 1/2)
    labels = []
    for i, q in enumerate(QUESTIONS):
        opts = options(i)
        lls = [s.logprob for s in score(tuner, [q] * len(opts), [" " + o for o in opts])]
        best = lls.index(max(lls))
        labels.append(best if i % 2 == 0 else (best + 1) % len(opts))
    tasks = write_tasks(tmp_path, answers, labels)
    proxy = System("proxy", tuner, "proxy")
    ours = {
        name: evaluate(task, [proxy], tmp_path / "ours" / name, progress=False)
        for name, task in tasks.items()
    }
    bodies: list[dict[str, Any]] = []
    app = recorded(create_app(tuner, ServerSettings(model_name=MODEL)), bodies)
    with serve_in_thread(app) as url:
        theirs = run_lm_eval(url, tiny_dirs["base"], tmp_path, tmp_path / "lm_eval")
    # lm-eval's defaults: token-id prompts; echo + logprobs for the log-likelihoods
    assert bodies and all(isinstance(b["prompt"][0][0], int) for b in bodies)
    options_asked = sum(len(options(i)) for i in range(len(QUESTIONS)))
    assert sum(bool(b.get("echo")) for b in bodies) == options_asked

    records = {}
    for name, report in ours.items():
        found = ResultStore(report.systems[0].path).load()
        records[name] = [found[str(i)] for i in range(len(QUESTIONS))]
    # generation: the same text for every item, and the same exact match (1/2)
    gen, ref = theirs["pt_gen"], records["pt_gen"]
    assert [s["filtered_resps"][0] for s in gen] == [r["outputs"][0] for r in ref]
    assert [s["exact_match"] for s in gen] == [r["scores"]["exact_match"] for r in ref]
    assert ours["pt_gen"].score("proxy", "exact_match") == 0.5
    # multiple choice: the same log-likelihood per option (to float32 noise), the same pick
    mc = theirs["pt_mc"]
    for s, r in zip(mc, records["pt_mc"], strict=True):
        lls = [float(lp) for lp, _ in s["filtered_resps"]]  # logged as strings
        assert lls == pytest.approx(r["logprobs"], abs=1e-4)
        assert s["acc"] == r["scores"]["acc"]
    acc = sum(s["acc"] for s in mc) / len(mc)
    assert acc == ours["pt_mc"].score("proxy", "acc") == 0.5
