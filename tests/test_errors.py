"""Bad input gets an early, clear error that names the problem and the fix."""

from __future__ import annotations

import sys

import pytest
import torch

from proxytune import ProxyTuner
from proxytune.cli import main
from proxytune.config import GenerationConfig
from proxytune.errors import (
    ConfigError,
    ModelLoadError,
    NumericalError,
    PromptTooLongError,
    VocabularyMismatchError,
)
from proxytune.testing import CORPUS, build_model, build_tokenizer


def test_unknown_local_path_is_named(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match=r"does not exist.*local directory"):
        ProxyTuner.from_pretrained(missing, device="cpu")


def test_unreachable_hub_id_says_what_to_do():
    with pytest.raises(ModelLoadError, match=r"could not load the tokenizer of 'no-org/no-model'"):
        ProxyTuner.from_pretrained("no-org/no-model", device="cpu")


def test_pickle_weights_refused_by_default(tmp_path):
    tok = build_tokenizer()
    model = build_model(tok)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    tok.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="safetensors"):
        ProxyTuner.from_pretrained(str(tmp_path), device="cpu")


def test_mismatched_tokenizers_name_the_first_differing_id(tmp_path, tiny_dirs):
    other = build_tokenizer(corpus=[s[::-1] for s in CORPUS])  # same size, other merges
    model = build_model(other, seed=5)
    model.save_pretrained(tmp_path)
    other.save_pretrained(tmp_path)
    with pytest.raises(VocabularyMismatchError, match=r"differ at token id \d+: '.*' vs '.*'"):
        ProxyTuner.from_pretrained(
            str(tiny_dirs["base"]),
            expert=str(tmp_path),
            anti_expert=str(tiny_dirs["anti"]),
            device="cpu",
        )


def test_prompt_longer_than_context(tuner):
    long_prompt = "The quick brown fox " * 100  # well past the tiny models' 256 positions
    with pytest.raises(PromptTooLongError, match=r"context holds 256; shorten the prompt"):
        tuner.generate(long_prompt, max_new_tokens=2)


def test_generation_stops_at_the_context_limit(tuner):
    prompt = "The quick brown fox " * 10
    n = len(tuner.tokenizer(prompt)["input_ids"])
    # the expert's chat template makes its prompt the longest: that sets the room left
    room = 256 - len(tuner.pairs[0].expert.prompt.render(prompt, tuner.tokenizer))
    assert 0 < room < 256 - n
    out = tuner.generate(prompt, max_new_tokens=500)[0]
    assert out.finish_reason in ("length", "stop")
    assert out.completion_tokens <= room


def test_nan_logits_are_reported(tiny_dirs):
    t = ProxyTuner.from_pretrained(
        str(tiny_dirs["base"]),
        expert=str(tiny_dirs["padded"]),
        anti_expert=str(tiny_dirs["anti"]),
        device="cpu",
    )
    head = t.pairs[0].expert.model.model.get_output_embeddings()
    with torch.no_grad():
        head.weight[5, 0] = float("nan")
    with pytest.raises(NumericalError, match=r"expert\[0\].*NaN logits"):
        t.generate("Rain", max_new_tokens=2)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"min_p": 1.0}, r"min_p must be in \[0, 1\)"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ({"n": 0}, "n must be an integer >= 1"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"stop": [""]}, "stop strings must be non-empty"),
        ({"seed": "x"}, "seed must be an integer"),
        ({"temprature": 1.0}, r"unknown generation setting\(s\) \['temprature'\]"),
    ],
)
def test_bad_settings(tuner, settings, message):
    with pytest.raises(ConfigError, match=message):
        tuner.generate("Rain", **settings)


def test_bad_alpha(tuner):
    with pytest.raises(ConfigError, match="alpha of pair 0 must be a finite number"):
        tuner.generate("Rain", alpha=float("nan"))
    with pytest.raises(ConfigError, match="must be a number, got 'strong'"):
        tuner.generate("Rain", alpha="strong")
    with pytest.raises(ConfigError, match="3 alphas given for 1 pairs"):
        tuner.generate("Rain", alpha=[1.0, 2.0, 3.0])
    with pytest.raises(ConfigError, match="at step 0"):
        tuner.generate("Rain", alpha=lambda step: float("inf"))


def test_empty_prompt_list_and_empty_prompt(tuner):
    with pytest.raises(ConfigError, match="no prompts given"):
        tuner.generate([])
    with pytest.raises(ConfigError, match="prompt 1 is empty after tokenization"):
        tuner.generate(["Rain", ""])


def test_chat_format_without_template(tmp_path, tiny_dirs):
    tok = build_tokenizer()
    tok.chat_template = None
    build_model(tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    t = ProxyTuner.from_pretrained(
        str(tiny_dirs["base"]),
        expert=str(tmp_path),
        anti_expert=str(tiny_dirs["anti"]),
        expert_prompt="chat",  # asked for explicitly ("auto" would pick raw here)
        device="cpu",
    )
    with pytest.raises(ConfigError, match="has no chat template; use 'raw'"):
        t.generate("Rain", max_new_tokens=2)


def test_bad_device_and_dtype(tiny_dirs):
    with pytest.raises(ConfigError, match="dtype must be one of"):
        ProxyTuner.from_pretrained(str(tiny_dirs["base"]), dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            ProxyTuner.from_pretrained(str(tiny_dirs["base"]), device="cuda")


def test_generation_config_is_immutable_and_validates_once():
    cfg = GenerationConfig(stop="###")
    assert cfg.stop == ("###",)
    with pytest.raises(Exception):  # noqa: B017 - frozen dataclass
        cfg.temperature = 2.0  # type: ignore[misc]


# -- optional extras: one line naming the install command, not a traceback -----------------------


def test_plots_without_matplotlib_name_the_extra(monkeypatch, tmp_path):
    from proxytune.analysis import write_report
    from proxytune.analysis.plots import write_plots
    from proxytune.extras import MissingExtraError

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the import fails
    with pytest.raises(MissingExtraError, match=r"pip install 'proxytune\[plots\]'"):
        write_plots([], tmp_path)
    with pytest.warns(UserWarning, match=r"no PNG plots: .*pip install 'proxytune\[plots\]'"):
        paths = write_report([], tmp_path)  # the report goes on without pictures
    assert paths["html"].is_file()


def test_the_extras_table_matches_pyproject_and_the_lock():
    import re
    import tomllib
    from pathlib import Path

    from proxytune.extras import EXTRAS

    root = Path(__file__).resolve().parents[1]
    declared = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    locked = {
        line.split("==")[0].strip().lower()
        for line in (root / "requirements.lock").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    for extra, packages in EXTRAS.items():
        names = {re.split(r"[<>=!~\[ ]", req)[0].lower() for req in declared[extra]}
        assert names == set(packages), extra
        assert names <= locked, extra


@pytest.mark.parametrize("module", ["fastapi", "uvicorn"])
def test_serve_without_the_server_extra_names_the_install_command(module, monkeypatch, capsys):
    from proxytune.cli import main

    monkeypatch.setitem(sys.modules, module, None)  # the import fails
    assert main(["serve", "--base", "no-such-model"]) == 2  # before any model loads
    assert capsys.readouterr().err.splitlines() == [
        f"error: proxytune serve needs {module}, which is not installed: "
        "pip install 'proxytune[server]'"
    ]


def test_cli_options_that_need_an_extra_name_its_install_command(monkeypatch, capsys):
    from proxytune.cli import main

    monkeypatch.setitem(sys.modules, "httpx", None)
    api = ["generate", "--base-url", "http://127.0.0.1:9/v1", "--base-model", "m", "Hi"]
    assert main(api) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: a base behind an API (--base-url) needs httpx")
    assert line.endswith("pip install 'proxytune[server]'")
    monkeypatch.setitem(sys.modules, "optuna", None)
    assert main(["eval", "arith", "--search", "optuna"]) == 2  # before any model loads
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith("pip install optuna; or use --search grid")


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["generate", "hi", "--temperature", "1e-320"], "temperature must be 0 (greedy) or at"),
        (["generate", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["serve", "--max-batch-size", "0"], "max-batch-size must be an integer >= 1, got 0"),
        (["serve", "--max-queue", "-1"], "max-queue must be an integer >= 1, got -1"),
        (["serve", "--max-body-bytes", "0"], "max-body-bytes must be an integer >= 1"),
        (["serve", "--port", "70000"], "port must be between 0 and 65535, got 70000"),
    ],
)
def test_bad_cli_settings_are_one_line_errors_before_any_model_loads(argv, says, capsys):
    """Issue 16, item 8: these gave tracebacks, some only after the models loaded (the base
    here does not exist: the setting is refused first)."""
    assert main([*argv, "--base", "no-such-model"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and says in line, line


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"base: 5\n", "base: a model must be a path or hub id (a string)"),
        (b"base: [1, 2]\n", "base: a model must be a path"),
        (b"base: \xff\xfe\n", "is not UTF-8 text"),
        (
            b"base: b\npairs: [{expert: e, alpha: {schedule: linear, start: 0, end: 1, "
            b"steps: 2.7}}]\n",
            "pairs[0].alpha.steps must be an integer >= 1, got 2.7",
        ),
        (
            b"base: b\npairs: [{expert: e, alpha: {schedule: linear, start: '1', end: 1, "
            b"steps: 2}}]\n",
            "pairs[0].alpha.start must be a number, got '1'",
        ),
    ],
)
def test_bad_recipes_are_one_line_errors(content, says, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_bytes(content)
    assert main(["generate", "hi", "--recipe", str(recipe)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and says in line, line


@pytest.mark.parametrize(
    ("extra", "data", "says"),
    [
        (["--lr", "nan"], None, "learning_rate (--lr) must be a finite number > 0, got nan"),
        (["--lr", "inf"], None, "learning_rate (--lr) must be a finite number > 0, got inf"),
        ([], "[" * 100_000 + "]" * 100_000, "line 1: not valid JSON (it is nested too deeply)"),
        ([], '{"prompt": "x\\ud800", "completion": "y"}', "line 1: prompt holds a lone surrogate"),
        ([], "folder", "is a directory; give a file"),
    ],
)
def test_bad_train_inputs_are_one_line_errors_naming_the_file_and_line(
    extra, data, says, tmp_path, capsys
):
    """Issue 16, items 8 and 9: tracebacks (deep JSON, a lone surrogate), or "does not exist"
    for a folder, or "must be > 0" for NaN; the model does not exist: refused before loading."""
    path = tmp_path / "train.jsonl"
    if data == "folder":
        path.mkdir()
    else:
        path.write_text((data or '{"prompt": "a", "completion": "b"}') + "\n", encoding="utf-8")
    argv = ["train", "--model", "no-such-model", "--data", str(path), "--out", str(tmp_path / "o")]
    assert main([*argv, *extra]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and says in line, line
    if data not in (None, "folder"):
        assert str(path) in line


def test_a_path_that_is_a_directory_is_called_one(tmp_path, capsys):
    from proxytune.jobs import run_jobs
    from proxytune.paths import need_dir, need_file

    assert main(["generate", "hi", "--recipe", str(tmp_path)]) == 2
    assert f"recipe file {str(tmp_path)!r} is a directory; give a file" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"input file .* is a directory; give a file"):
        run_jobs(None, tmp_path, tmp_path / "out.jsonl", executor=lambda *a: None)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ModelLoadError, match=r"adapter directory .* is a file; give a directory"):
        need_dir(tmp_path / "f", "adapter directory", ModelLoadError)
    with pytest.raises(ConfigError, match="does not exist"):
        need_file(tmp_path / "nope", "data file")


def test_a_block_list_of_every_token_is_a_400_not_a_500(tuner):
    pytest.importorskip("fastapi")
    import httpx
    from serving import serve_in_thread

    from proxytune.server import ServerSettings, create_app

    every = list(range(tuner.vocab_size))
    body = {"prompt": "hi", "max_tokens": 2, "rule": {"name": "tokens", "block": every}}
    with serve_in_thread(create_app(tuner, ServerSettings(model_name="m"))) as url:
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert answer.status_code == 400, answer.text
    assert "block-list leaves no token to choose" in answer.json()["error"]["message"]


@pytest.mark.parametrize(
    ("make", "param"),
    [
        (lambda: GenerationConfig(temperature=-1), "temperature"),
        (lambda: GenerationConfig(top_p=2), "top_p"),
        (lambda: GenerationConfig(max_new_tokens=0), "max_new_tokens"),
        (lambda: _request_alphas([1.0, "x"]), "alpha[1]"),
        (lambda: _request_alphas(1.0, active_pairs=[3]), "active_pairs"),
        (lambda: _make_rule({"name": "plausible", "tau": 2}), "rule.tau"),
        (lambda: _make_rule({"name": "tokens", "bias_strings": {"": 1.0}}), "rule.bias_strings"),
        (lambda: _make_rule({"name": "nope"}), "rule.name"),
    ],
)
def test_a_config_error_names_the_setting_it_is_about(make, param):
    """``ConfigError.param``: what the server's 400 points at (``error.param``), set where the
    error is raised rather than read back from the message."""
    with pytest.raises(ConfigError) as caught:
        make()
    assert caught.value.param == param


def _request_alphas(alpha, active_pairs=None):
    from proxytune.engine.controls import request_alphas
    from proxytune.engine.members import Member, Pair
    from proxytune.prompts import PromptFormat
    from proxytune.schedules import Constant

    pairs = [
        Pair(Member(f"expert[{i}]", object(), PromptFormat("raw")), None, Constant(1.0))
        for i in range(2)
    ]
    return request_alphas(pairs, alpha, active_pairs)


def _make_rule(spec):
    from proxytune.rules import make_rule

    return make_rule(spec, "rule")
