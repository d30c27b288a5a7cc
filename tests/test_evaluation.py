"""Evaluation: extraction, metrics, the teacher-forced scorer, the sandbox, the runner
(resume, sweeps, gap closed), tasks, alpha search, the lm-eval adapter and the CLI."""

from __future__ import annotations

import gzip
import json
import math
import os
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from proxytune.cli import main
from proxytune.cli.options import parse_alphas
from proxytune.errors import ConfigError
from proxytune.evaluation.extract import gsm_answer, last_number, normalize_number
from proxytune.evaluation.metrics import (
    contains,
    exact_match,
    gap_closed,
    multiple_choice_scores,
    pass_at_k,
    token_f1,
)
from proxytune.evaluation.runner import SystemResult, evaluate, gaps
from proxytune.evaluation.sandbox import network_isolation, run_program, run_programs
from proxytune.evaluation.scoring import render, rolling_windows, score, score_ids
from proxytune.evaluation.systems import System, standard_systems
from proxytune.evaluation.tasks import Task, builtin_tasks, load_task
from proxytune.results import GenerationResult


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# -- answer extraction --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She has 1,234 apples.", "1234"),
        ("The total is 1,234,567.00 dollars", "1234567"),
        ("It dropped to -5 degrees", "-5"),
        ("It dropped to \u22127 degrees", "-7"),  # unicode minus
        ("Each costs 3.50", "3.5"),
        ("0.25 of 12.", "12"),  # a sentence's full stop is not a decimal point
        ("pages 3-5", "5"),  # a range's hyphen is not a minus sign
        ("1,2,3", "3"),  # not a thousands separator
        ("$1,000.50 in total", "1000.5"),
        ("mp3 files", None),  # a digit glued to a word is not a number
        ("no number here", None),
        ("", None),
        ("-0", "0"),
    ],
)
def test_last_number(text: str, expected: str | None) -> None:
    assert last_number(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3 + 4 = 7\n#### 7", "7"),
        ("#### 1,200\nThen 5 more.", "1200"),  # the marker wins over a later number
        ("####-3", "-3"),
        ("So the answer is 42. Check: 40 + 2", "42"),
        ("The answer is: $1,050.", "1050"),
        ("first 3 then 8", "8"),
        ("#### nothing\nbut 9 later", "9"),  # a marker without a number falls back
        ("no digits at all", None),
    ],
)
def test_gsm_answer(text: str, expected: str | None) -> None:
    assert gsm_answer(text) == expected


def test_normalize_number() -> None:
    assert normalize_number("1,000.0") == "1000"
    assert normalize_number("-2.50") == "-2.5"
    assert normalize_number("12.") == "12"
    assert normalize_number("abc") is None


# -- metrics ------------------------------------------------------------------------------


def test_generation_metrics_by_hand() -> None:
    assert exact_match("1,000", ["1000"]) == 1.0
    assert exact_match("1000.5", ["1000"]) == 0.0
    assert exact_match(None, ["3"]) == 0.0
    assert exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0  # articles, punctuation
    assert exact_match("paris", ["London", "Paris"]) == 1.0
    assert contains("It is in Paris, France.", ["paris"]) == 1.0
    assert contains("It is in Rome.", ["paris"]) == 0.0
    # pred "the cat sat" -> [cat, sat]; gold "cat sat down" -> [cat, sat, down]:
    # precision 2/2, recall 2/3, F1 = 2 * 1 * (2/3) / (1 + 2/3) = 0.8
    assert token_f1("the cat sat", ["cat sat down"]) == pytest.approx(0.8)
    assert token_f1("dog", ["cat sat down", "dog"]) == 1.0


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 0.4),  # c / n
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (4, 1, 3, 0.75),  # 1 - C(3,3)/C(4,3) = 1 - 1/4
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (10, 0, 5, 0.0),
        (3, 3, 1, 1.0),
        (5, 4, 2, 1.0),  # n - c < k: every draw of 2 holds a pass
        (1, 1, 1, 1.0),
    ],
)
def test_pass_at_k_hand_computed(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_the_combinatorial_definition() -> None:
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)  # k > n is undefined
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_multiple_choice_scores_by_hand() -> None:
    logprobs, lengths = [-1.0, -2.0, -0.5], [10, 2, 10]
    s = multiple_choice_scores(logprobs, lengths, [0])
    assert s["acc"] == 0.0  # option 2 is most likely
    assert s["acc_norm"] == 0.0  # per byte: -0.1, -1.0, -0.05 -> option 2
    weights = [math.exp(v) for v in logprobs]
    assert s["mc2"] == pytest.approx(weights[0] / sum(weights))


def test_multiple_choice_acc_norm_by_hand() -> None:
    # raw: option 1 best (-2 > -3); per byte: -3/1 = -3, -2/10 = -0.2, -9/1 = -9 -> option 1.
    s = multiple_choice_scores([-3.0, -2.0, -9.0], [1, 10, 1], [1])
    assert (s["acc"], s["acc_norm"]) == (1.0, 1.0)
    # raw: option 0 best; per byte: -4/40 = -0.1 beats -1/2 = -0.5 -> option 0 vs 1 flips
    s = multiple_choice_scores([-4.0, -1.0], [40, 2], [0])
    assert (s["acc"], s["acc_norm"]) == (0.0, 1.0)


def test_gap_closed_arithmetic() -> None:
    assert gap_closed(26.4, 6.6, 32.4) == pytest.approx(19.8 / 25.8)  # the paper's GSM8K 13B
    assert gap_closed(0.5, 0.5, 0.9) == 0.0
    assert gap_closed(0.9, 0.5, 0.9) == pytest.approx(1.0)
    assert gap_closed(1.0, 0.5, 0.9) == pytest.approx(1.25)  # beats the tuned model
    assert gap_closed(0.4, 0.5, 0.9) == pytest.approx(-0.25)  # worse than the base
    assert gap_closed(-10.0, -20.0, -15.0) == pytest.approx(2.0)  # log-likelihoods work too
    assert gap_closed(0.7, 0.5, 0.5) is None  # no gap to close
    assert gap_closed(None, 0.5, 0.9) is None
    results = [
        SystemResult("base", "base", None, 10, {"em": 0.2, "ll": -5.0}, ""),
        SystemResult("proxy@1", "proxy", 1.0, 10, {"em": 0.5, "ll": -4.0}, ""),
        SystemResult("expert", "expert", None, 10, {"em": 0.1, "ll": -6.0}, ""),
        SystemResult("tuned", "tuned", None, 10, {"em": 0.6, "ll": -3.0}, ""),
    ]
    g = gaps(results)
    assert set(g) == {"proxy@1"}
    assert g["proxy@1"]["em"] == pytest.approx(0.75)
    assert g["proxy@1"]["ll"] == pytest.approx(0.5)
    assert gaps(results[:3]) == {}  # no tuned reference, no gap


def test_parse_alphas() -> None:
    assert parse_alphas("0,0.25,0.5,1,2") == [0.0, 0.25, 0.5, 1.0, 2.0]
    assert parse_alphas("0:1:0.5") == [0.0, 0.5, 1.0]
    assert parse_alphas("0:0.3:0.1,1") == [0.0, 0.1, 0.2, 0.3, 1.0]
    assert parse_alphas(None) == []
    with pytest.raises(ConfigError):
        parse_alphas("0:1:0")
    with pytest.raises(ConfigError):
        parse_alphas("a,b")


# -- the teacher-forced scorer ------------------------------------------------------------

PROMPTS = ["The quick brown", "def add(a, b):", "Rain falls on"]


@pytest.mark.parametrize("alpha", [None, 0.0, 0.5, 2.0])
def test_scorer_equals_generate_logprobs_greedy(tuner, alpha) -> None:
    results = tuner.generate(PROMPTS, alpha=alpha, max_new_tokens=10, logprobs=True)
    scored = score_ids(
        tuner,
        [render(tuner, p) for p in PROMPTS],
        [r.token_ids for r in results],
        prompts=PROMPTS,
        alpha=alpha,
        batch_size=2,  # batches of a different shape than generate's
    )
    for r, s in zip(results, scored, strict=True):
        assert s.token_ids == r.token_ids
        assert [t.logprob for t in s.tokens] == pytest.approx(
            [t.logprob for t in r.logprobs], abs=1e-4
        )
        assert s.greedy  # greedy decoding produced it
        assert s.logprob == pytest.approx(sum(t.logprob for t in r.logprobs), abs=1e-3)


def test_scorer_equals_generate_logprobs_sampled_and_alone(tuner) -> None:
    results = tuner.generate(
        PROMPTS[:2], max_new_tokens=8, logprobs=True, temperature=1.0, seed=7, n=2
    )
    scored = score_ids(
        tuner,
        [render(tuner, PROMPTS[r.prompt_index]) for r in results],
        [r.token_ids for r in results],
        detail=True,
        top=3,
    )
    for r, s in zip(results, scored, strict=True):
        assert [t.logprob for t in s.tokens] == pytest.approx(
            [t.logprob for t in r.logprobs], abs=1e-4
        )
        for t in s.tokens:
            assert set(t.model_logprobs) == {"base", "expert[0]", "anti_expert[0]"}
            assert t.kl_base_combined >= -1e-6 and t.kl_combined_base >= -1e-6
            assert len(t.top) == 3 and t.top[0][1] >= t.top[-1][1]
    base = tuner.alone("base")
    r = base.generate(PROMPTS[:1], max_new_tokens=6, logprobs=True)[0]
    s = score_ids(base, [render(base, PROMPTS[0])], [r.token_ids])[0]
    assert s.logprob == pytest.approx(sum(t.logprob for t in r.logprobs), abs=1e-4)


def test_sweep_scores_every_alpha_in_one_pass(tuner) -> None:
    from proxytune.evaluation.scoring import encode, score_sweep

    conts = [" fox jumps", " over the lazy dog"]
    ids = [encode(tuner, c) for c in conts]
    rendered = [render(tuner, p) for p in PROMPTS[:2]]
    swept = score_sweep(tuner, rendered, ids, [0.0, 0.5, 2.0], prompts=PROMPTS[:2])
    for alpha, got in zip([0.0, 0.5, 2.0], swept, strict=True):
        want = score_ids(tuner, rendered, ids, prompts=PROMPTS[:2], alpha=alpha)
        assert [g.logprob for g in got] == pytest.approx([w.logprob for w in want], abs=1e-5)
    base = score_ids(tuner.alone("base"), rendered, ids)
    assert [g.logprob for g in swept[0]] == pytest.approx([b.logprob for b in base], abs=1e-5)


def test_scorer_edge_cases(tuner) -> None:
    empty = score(tuner, ["Question:"], [""])[0]
    assert empty.tokens == [] and empty.logprob == 0.0 and empty.greedy
    no_context = score(tuner, [""], [" five"])[0]  # read after the BOS/EOS prefix token
    assert len(no_context.tokens) >= 1 and no_context.logprob < 0
    with pytest.raises(ConfigError):
        score(tuner, ["a", "b"], ["c"])


def test_rolling_windows_by_hand() -> None:
    # lm-eval's docstring example: 10 tokens, context 4
    windows = rolling_windows(list(range(10)), prefix=-1, max_length=4)
    assert windows == [([-1], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]), ([5, 6, 7], [8, 9])]
    assert rolling_windows([], 0, 4) == []
    assert rolling_windows([7], 0, 4) == [([0], [7])]


# -- the sandbox --------------------------------------------------------------------------


def test_sandbox_survives_hanging_crashing_and_network_samples(tmp_path: Path) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    marker = tmp_path / "pid"
    programs = {
        "passed": f"import os\nopen({str(marker)!r}, 'w').write(str(os.getpid()))",
        "failed": "assert 1 + 1 == 3, 'wrong'",
        "hang": "while True:\n    pass",
        "segfault": "import ctypes\nctypes.string_at(0)",
        "network": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
        "raw_socket": f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))",
        "subprocess": "import subprocess\nsubprocess.run(['true'])",
    }
    results = dict(zip(programs, run_programs(list(programs.values()), timeout=1.5), strict=True))
    assert results["passed"].status == "passed"
    assert int(marker.read_text()) != os.getpid()  # never in the evaluating process
    assert results["failed"].status == "failed" and "AssertionError" in results["failed"].detail
    assert results["hang"].status == "timeout"
    assert results["segfault"].status == "crashed"
    assert results["network"].status == "failed"
    assert results["subprocess"].status == "failed"
    if network_isolation():  # a network namespace: even the raw socket module finds no network
        assert results["raw_socket"].status == "failed"
    with pytest.raises(socket.timeout):
        server.accept()  # nothing ever connected
    server.close()


def test_sandbox_marker_catches_an_early_exit() -> None:
    early = run_program("import os\nos._exit(0)\nprint('DONE')", timeout=5, marker="DONE")
    assert early.status == "failed"
    assert run_program("print('DONE')", timeout=5, marker="DONE").passed


# -- tasks --------------------------------------------------------------------------------


def test_builtin_tasks_load_with_their_vendored_data() -> None:
    assert builtin_tasks() == ["gsm_symbolic", "humaneval", "truthfulqa_mc"]
    gsm = load_task("gsm_symbolic")
    examples = gsm.examples()
    assert len(examples) == 300 - gsm.fewshot
    assert gsm_answer(gsm.format(gsm.gold, examples[0])) == examples[0]["answer"]
    assert "#### " in gsm.render(examples[0])  # the few-shot solutions
    assert len(load_task("humaneval").examples()) == 164
    tqa = load_task("truthfulqa_mc")
    rows = tqa.examples()
    assert len(rows) == 299 and all(r["canary"].startswith("BENCHMARK DATA") for r in rows)
    assert all(tqa.correct(r) for r in rows)
    val, test = gsm.examples("validation", 50), gsm.examples("test", 50)
    assert len(val) == 50 and len(test) == len(examples) - 50
    assert not {r["id"] for r in val} & {r["id"] for r in test}
    assert [r["id"] for r in gsm.examples("validation", 50)] == [r["id"] for r in val]


def test_task_yaml_jsonl_inference_and_errors(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "qa.jsonl", [{"q": "2+2?", "a": "4"}])
    (tmp_path / "qa.yaml").write_text(
        'kind: generate\ndata: qa.jsonl\nprompt: "Q: {q}\\nA:"\ntarget: a\nextract: last_number\n'
    )
    task = load_task(tmp_path / "qa.yaml")
    assert task.name == "qa" and task.render(task.examples()[0]) == "Q: 2+2?\nA:"
    assert task.golds(task.examples()[0]) == ["4"]
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": "x", "choices": ["a", "b"], "label": 1}])
    assert load_task(mc).kind == "multiple_choice"
    code = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "test": "t", "entry_point": "f"}])
    assert load_task(code).kind == "code"
    gen = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "p", "answer": "1"}])
    assert load_task(gen).kind == "generate"
    (tmp_path / "bad.yaml").write_text("data: qa.jsonl\npromt: typo\n")
    with pytest.raises(ConfigError, match="promt"):
        load_task(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="missing"):
        Task(name="t", data=gen, prompt="{missing}").render({"id": "0", "prompt": "p"})
    with pytest.raises(ConfigError, match="extract"):
        Task(name="t", extract="nonsense")
    with pytest.raises(ConfigError, match="no task"):
        load_task("no_such_task")


# -- the runner ---------------------------------------------------------------------------


class ScriptedTuner:
    """A stand-in tuner that 'generates' scripted texts and counts its calls."""

    def __init__(self, texts: dict[str, list[str]]) -> None:
        self.texts = texts
        self.calls: list[list[str]] = []
        self.members: list[Any] = []
        self.pairs: list[Any] = []
        self.rule = None

    def generate(self, prompts: list[str], n: int = 1, **settings: Any) -> list[GenerationResult]:
        self.calls.append(list(prompts))
        out = []
        for i, p in enumerate(prompts):
            for s, text in enumerate(self.texts[p][:n]):
                out.append(GenerationResult(text, [], "stop", 0, 0, i, s))
        return out


def code_task(tmp_path: Path) -> Task:
    rows = [
        {
            "task_id": f"t/{i}",
            "prompt": f"def f{i}(x):\n",
            "entry_point": f"f{i}",
            "test": "def check(g):\n    assert g(2) == 4\n",
        }
        for i in range(3)
    ]
    data = write_jsonl(tmp_path / "code.jsonl", rows)
    return Task(name="code", kind="code", data=data, id_field="task_id", k=(1, 2), timeout=1.5)


def test_code_task_pass_at_k_with_hanging_and_crashing_samples(tmp_path: Path) -> None:
    texts = {
        "def f0(x):\n": ["    return 2 * x\n", "    return x + 2\n"],  # both pass
        "def f1(x):\n": ["    while True:\n        pass\n", "    return x * x\n"],  # hang, pass
        "def f2(x):\n": ["    import ctypes\n    ctypes.string_at(0)\n", "    return 0\n"],
    }
    system = System("scripted", ScriptedTuner(texts), "other")
    report = evaluate(
        code_task(tmp_path),
        [system],
        tmp_path / "out",
        settings={"n": 2, "temperature": 0.8},
        progress=False,
    )
    rows = [json.loads(line) for line in (tmp_path / "out" / "scripted.jsonl").open()]
    statuses = {r["id"]: [x["status"] for x in r["results"]] for r in rows}
    assert statuses == {
        "t/0": ["passed", "passed"],
        "t/1": ["timeout", "passed"],
        "t/2": ["crashed", "failed"],
    }
    # pass@1 per problem: 1, 1/2, 0 -> mean 0.5; pass@2: 1, 1, 0 -> 2/3
    assert report.score("scripted", "pass@1") == pytest.approx(0.5)
    assert report.score("scripted", "pass@2") == pytest.approx(2 / 3)
    with pytest.raises(ConfigError, match="temperature"):  # greedy samples would all be equal
        evaluate(code_task(tmp_path), [system], tmp_path / "o2", settings={"n": 2})


def test_resume_after_interruption(tmp_path: Path) -> None:
    rows = [{"id": f"q{i}", "prompt": f"q{i}", "answer": str(i)} for i in range(5)]
    task = Task(name="qa", data=write_jsonl(tmp_path / "qa.jsonl", rows), extract="last_number")
    texts = {f"q{i}": [f"it is {i if i % 2 == 0 else -1}"] for i in range(5)}

    class Interrupting(ScriptedTuner):
        def generate(self, prompts, **settings):
            if len(self.calls) == 2:
                raise KeyboardInterrupt  # the user pressed Ctrl-C during the third batch
            return super().generate(prompts, **settings)

    flaky = Interrupting(texts)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        evaluate(task, [System("s", flaky, "other")], out, batch_size=2, progress=False)
    saved = (out / "s.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in saved] == ["q0", "q1", "q2", "q3"]
    with open(out / "s.jsonl", "a") as f:
        f.write('{"id": "q4", "outp')  # killed mid-write: a torn last line
    steady = ScriptedTuner(texts)
    report = evaluate(task, [System("s", steady, "other")], out, batch_size=2, progress=False)
    assert steady.calls == [["q4"]]  # only the missing example ran
    assert report.score("s", "exact_match") == pytest.approx(3 / 5)  # q0, q2, q4
    assert len((out / "s.jsonl").read_text().splitlines()) == 5
    with pytest.raises(ConfigError, match="other settings"):
        evaluate(replace(task, extract="gsm"), [System("s", steady, "other")], out, progress=False)
    again = ScriptedTuner(texts)
    evaluate(task, [System("s", again, "other")], out, resume=False, progress=False)
    assert len(again.calls) == 1 and len(again.calls[0]) == 5  # started over


def test_user_metric_function(tmp_path: Path) -> None:
    (tmp_path / "my_metric.py").write_text(
        "def score(answer, example):\n"
        "    return {'length_ok': len(answer) <= example['max_len'], 'chars': len(answer)}\n"
    )
    rows = [{"id": "a", "prompt": "p1", "max_len": 5}, {"id": "b", "prompt": "p2", "max_len": 1}]
    write_jsonl(tmp_path / "free.jsonl", rows)
    (tmp_path / "free.yaml").write_text(
        "kind: generate\ndata: free.jsonl\ntarget: null\nmetrics: [my_metric.py:score]\n"
    )
    system = System("s", ScriptedTuner({"p1": ["hello"], "p2": ["hi"]}), "other")
    report = evaluate(load_task(tmp_path / "free.yaml"), [system], tmp_path / "o", progress=False)
    assert report.score("s", "length_ok") == 0.5
    assert report.score("s", "chars") == 3.5


def tiny_mc_task(tmp_path: Path, n: int = 4) -> Task:
    rows = [
        {
            "id": f"m{i}",
            "question": "The quick brown",
            "choices": ["fox", "dog", "rain"],
            "label": i % 3,
        }
        for i in range(n)
    ]
    return Task(
        name="mc",
        kind="multiple_choice",
        data=write_jsonl(tmp_path / "mc.jsonl", rows),
        prompt="{question}",
    )


def test_multiple_choice_on_tiny_models_matches_the_scorer(tuner, tmp_path: Path) -> None:
    task = tiny_mc_task(tmp_path, 3)
    report = evaluate(task, [System("proxy", tuner, "proxy", 0.5)], tmp_path / "o", progress=False)
    row = json.loads((tmp_path / "o" / "proxy.jsonl").read_text().splitlines()[0])
    direct = score(tuner, ["The quick brown"] * 3, [" fox", " dog", " rain"], alpha=0.5)
    assert row["logprobs"] == pytest.approx([s.logprob for s in direct], abs=1e-5)
    assert 0.0 <= report.score("proxy", "mc2") <= 1.0


def test_alpha_sweep_writes_table_and_plots(tuner, tmp_path: Path) -> None:
    task = tiny_mc_task(tmp_path)
    systems = standard_systems(tuner, alphas=[0, 1, 2], include=("base", "proxy"))
    assert [s.name for s in systems] == ["base", "proxy@0", "proxy@1", "proxy@2"]
    report = evaluate(task, systems, tmp_path / "sweep", progress=False)
    out = tmp_path / "sweep"
    for name in ("summary.json", "summary.md", "summary.csv", "sweep.csv"):
        assert (out / name).is_file()
    for metric in ("acc", "acc_norm", "mc2"):
        assert (out / f"sweep_{metric}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (out / "sweep.csv").read_text().splitlines()
    assert lines[0] == "alpha,acc,acc_norm,mc2" and len(lines) == 4
    # alpha 0 is the base, bit for bit
    assert report.score("proxy@0", "mc2") == pytest.approx(report.score("base", "mc2"), abs=1e-6)
    assert "| proxy@1 |" in (out / "summary.md").read_text()


def test_gap_closed_reported_with_a_tuned_system(tuner, tmp_path: Path) -> None:
    task = tiny_mc_task(tmp_path, 3)
    systems = standard_systems(
        tuner, alphas=[1], include=("base", "proxy"), tuned=tuner.alone("expert[0]")
    )
    report = evaluate(task, systems, tmp_path / "g", progress=False)
    base, proxy, tuned = (report.score(s, "mc2") for s in ("base", "proxy@1", "tuned"))
    assert report.gap_closed["proxy@1"]["mc2"] == pytest.approx((proxy - base) / (tuned - base))
    assert "gap closed (mc2)" in report.table()


def test_gold_likelihood_task(tuner, tmp_path: Path) -> None:
    rows = [{"id": f"g{i}", "q": f"{i} plus {i}", "answer": str(2 * i)} for i in range(2)]
    task = Task(
        name="gold",
        data=write_jsonl(tmp_path / "g.jsonl", rows),
        prompt="Question: {q}\nAnswer:",
        extract="gsm",
        gold=" #### {answer}",
    )
    report = evaluate(
        task,
        [System("base", tuner.alone("base"), "base")],
        tmp_path / "o",
        gold_only=True,
        progress=False,
    )
    direct = score(tuner.alone("base"), ["Question: 0 plus 0\nAnswer:"], [" #### 0"])[0]
    row = json.loads((tmp_path / "o" / "base.jsonl").read_text().splitlines()[0])
    assert row["outputs"] == [] and row["scores"]["gold_logprob"] == pytest.approx(direct.logprob)
    assert set(report.systems[0].metrics) == {
        "gold_logprob",
        "gold_logprob_per_token",
        "gold_greedy",
    }


def test_grid_search_reports_validation_and_test_apart(tuner, tmp_path: Path) -> None:
    from proxytune.evaluation.search import search

    task = tiny_mc_task(tmp_path, 6)
    result = search(
        task, tuner, tmp_path / "s", validation_size=2, alphas=[0, 1], metric="mc2", progress=False
    )
    assert [t["system"] for t in result.trials] == ["proxy@0", "proxy@1"]
    best = max(result.trials, key=lambda t: t["validation"])
    assert result.best["system"] == best["system"]
    assert {s.examples for s in result.test.systems} == {4}  # the 4 test examples only
    assert {s.name for s in result.test.systems} >= {"base", "expert", best["system"]}
    saved = json.loads((tmp_path / "s" / "search.json").read_text())
    assert saved["best"]["system"] == best["system"]
    assert saved["best_test_score"] == pytest.approx(result.best_test_score)


# -- lm-evaluation-harness ----------------------------------------------------------------


@dataclass
class FakeInstance:
    """The part of lm-eval's ``Instance`` that models read."""

    args: tuple


def test_lm_eval_adapter_three_request_types(tuner) -> None:
    from proxytune.evaluation.lm_eval_adapter import ProxyTuneLM, split_whitespace

    lm = ProxyTuneLM(tuner=tuner, alpha=0.5, batch_size=2, progress=False)
    requests = [
        FakeInstance(("The quick ", "brown")),
        FakeInstance(("", " fox")),
        FakeInstance(("Rain", " falls")),
    ]
    got = lm.loglikelihood(requests)
    contexts, conts = zip(*(split_whitespace(*r.args) for r in requests), strict=True)
    want = score(tuner, list(contexts), list(conts), alpha=0.5)
    assert [g[0] for g in got] == pytest.approx([w.logprob for w in want], abs=1e-5)
    assert [g[1] for g in got] == [w.greedy for w in want]

    text = "The quick brown fox jumps over the lazy dog."
    rolling = lm.loglikelihood_rolling([FakeInstance((text,))])
    assert rolling[0] < 0
    from proxytune.evaluation.scoring import encode, prefix_id

    ids = encode(tuner, text)
    by_hand = score_ids(tuner, [[prefix_id(tuner)]], [ids], alpha=0.5)[0].logprob
    assert rolling[0] == pytest.approx(by_hand, abs=1e-4)  # one window: the whole text

    gen = lm.generate_until([FakeInstance(("Rain falls", {"until": ["\n"], "max_gen_toks": 6}))])
    direct = tuner.generate(["Rain falls"], alpha=0.5, max_new_tokens=6, stop=("\n",))[0].text
    assert gen == [direct] and "\n" not in gen[0]
    assert lm.generation_settings({"do_sample": True, "temperature": 0.7})["temperature"] == 0.7


def test_lm_eval_harness_task_runs_when_installed(tuner, tmp_path: Path) -> None:
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from proxytune.evaluation.lm_eval_adapter import ProxyTuneLM

    data = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"question": "The quick brown", "choices": [" fox", " dog"], "label": 0},
            {"question": "Rain falls on", "choices": [" the", " a"], "label": 1},
        ],
    )
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n"
    )
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    results = lm_eval.simple_evaluate(
        model=ProxyTuneLM(tuner=tuner, progress=False),
        tasks=["tiny_mc"],
        task_manager=manager,
        log_samples=False,
    )
    assert 0.0 <= results["results"]["tiny_mc"]["acc,none"] <= 1.0


# -- the CLI ------------------------------------------------------------------------------


def test_cli_eval_sweep_and_analyze(tiny_dirs, tmp_path: Path, capsys) -> None:
    task = tiny_mc_task(tmp_path, 2)
    (tmp_path / "mc.yaml").write_text(
        f"kind: multiple_choice\ndata: {task.data}\nprompt: '{{question}}'\n"
    )
    models = [
        "--base",
        str(tiny_dirs["base"]),
        "--expert",
        str(tiny_dirs["expert"]),
        "--anti-expert",
        str(tiny_dirs["anti"]),
        "--device",
        "cpu",
        "--dtype",
        "float32",
    ]
    out = tmp_path / "eval"
    code = main(
        [
            "eval",
            str(tmp_path / "mc.yaml"),
            *models,
            "--alpha",
            "0,1",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| proxy@1 |" in printed and (out / "sweep_acc.png").is_file()
    assert {p.name for p in out.glob("*.jsonl")} == {
        "base.jsonl",
        "expert.jsonl",
        "proxy@0.jsonl",
        "proxy@1.jsonl",
    }
    code = main(
        [
            "analyze",
            "The quick brown",
            *models,
            "--max-new-tokens",
            "5",
            "--out",
            str(tmp_path / "an"),
            "--json",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tokens"] == 5
    assert (tmp_path / "an" / "report.html").is_file()
    assert main(["eval", "no_such_task", *models]) == 2
    code = main(
        [
            "eval",
            str(tmp_path / "mc.yaml"),
            *models,
            "--search",
            "grid",
            "--validation-size",
            "1",
            "--alpha",
            "0,1",
            "--metric",
            "mc2",
            "--out",
            str(tmp_path / "search"),
            "--no-progress",
            "--json",
        ]
    )
    assert code == 0
    found = json.loads(capsys.readouterr().out)
    assert found["best"]["system"] in {"proxy@0", "proxy@1"} and len(found["trials"]) == 2
    assert (tmp_path / "search" / "test" / "summary.md").is_file()


def test_vendored_files_are_gzip_jsonl() -> None:
    from proxytune.evaluation.tasks import data_dir

    for name in ("gsm_symbolic", "humaneval", "truthfulqa_mc"):
        with gzip.open(data_dir() / f"{name}.jsonl.gz", "rt") as f:
            assert json.loads(f.readline())
