"""Recipe files and the command line, on tiny models."""

from __future__ import annotations

import json

import pytest

from proxytune import ProxyTuner
from proxytune.cli import main
from proxytune.errors import ConfigError
from proxytune.recipe import default_recipe_path, load_recipe, parse_recipe
from proxytune.schedules import Linear, as_schedule


def write_recipe(tmp_path, tiny_dirs, suffix=".yaml", alpha="0.5"):
    if suffix == ".yaml":
        text = f"""
base: {{model: "{tiny_dirs["base"]}", prompt: raw}}
pairs:
  - expert: {{model: "{tiny_dirs["expert"]}", prompt: chat}}
    anti_expert: {{model: "{tiny_dirs["anti"]}", prompt: raw}}
    alpha: {alpha}
model_defaults: {{device: cpu, dtype: float32}}
generation: {{max_new_tokens: 7}}
"""
    else:
        text = f"""
[base]
model = "{tiny_dirs["base"]}"
[[pairs]]
expert = {{ model = "{tiny_dirs["expert"]}", prompt = "chat" }}
anti_expert = {{ model = "{tiny_dirs["anti"]}" }}
alpha = {alpha}
[model_defaults]
device = "cpu"
[generation]
max_new_tokens = 7
"""
    path = tmp_path / f"r{suffix}"
    path.write_text(text)
    return path


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_recipe_builds_the_same_tuner_as_the_api(tmp_path, tiny_dirs, suffix):
    t = ProxyTuner.from_recipe(write_recipe(tmp_path, tiny_dirs, suffix))
    assert t.defaults.max_new_tokens == 7
    direct = ProxyTuner.from_pretrained(
        str(tiny_dirs["base"]),
        expert=str(tiny_dirs["expert"]),
        anti_expert=str(tiny_dirs["anti"]),
        alpha=0.5,
        base_prompt="raw",  # the recipe's formats (the defaults are "auto")
        expert_prompt="chat",
        anti_expert_prompt="raw",
        device="cpu",
    )
    assert [r.token_ids for r in t.generate(["Rain"])] == [
        r.token_ids for r in direct.generate(["Rain"], max_new_tokens=7)
    ]


def test_recipe_errors_name_the_key():
    with pytest.raises(ConfigError, match="needs a 'base'"):
        parse_recipe({"pairs": []})
    with pytest.raises(ConfigError, match=r"unknown recipe key\(s\) \['bsae'\]"):
        parse_recipe({"bsae": "x"})
    with pytest.raises(ConfigError, match=r"pairs\[0\].alpha must be a finite number"):
        parse_recipe({"base": "m", "pairs": [{"expert": "e", "alpha": float("inf")}]})
    with pytest.raises(ConfigError, match=r"pairs\[0\] needs an expert"):
        parse_recipe({"base": "m", "pairs": [{"alpha": 1.0}]})
    with pytest.raises(ConfigError, match=r"unknown model option\(s\) \['dtpye'\]"):
        parse_recipe({"base": {"model": "m", "dtpye": "float32"}})


def test_recipe_alpha_schedule():
    r = parse_recipe(
        {
            "base": "m",
            "pairs": [
                {
                    "expert": "e",
                    "anti_expert": "a",
                    "alpha": {"schedule": "linear", "start": 0.0, "end": 1.0, "steps": 4},
                }
            ],
        }
    )
    sched = as_schedule(r.pairs[0][2])
    assert isinstance(sched, Linear)
    assert [sched(s) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_default_recipe_ships_and_parses():
    r = load_recipe(default_recipe_path())
    assert r.base.path == "embedded:qwen2.5-coder-1.5b-instruct"
    assert r.pairs[0][0].prompt.kind == "chat"
    assert r.pairs[0][1].prompt == r.base.prompt and r.base.prompt.template == "{prompt}\n"
    assert r.engine.overlap is True


def test_cli_generate_json(tiny_dirs, capsys):
    code = main(
        [
            "generate",
            "--base",
            str(tiny_dirs["base"]),
            "--expert",
            str(tiny_dirs["expert"]),
            "--anti-expert",
            str(tiny_dirs["anti"]),
            "--alpha",
            "0.5",
            "--max-new-tokens",
            "5",
            "--temperature",
            "0",
            "--seed",
            "1",
            "--device",
            "cpu",
            "--json",
            "Rain",
            "The quick",
        ]
    )
    assert code == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["prompt"] for x in lines] == ["Rain", "The quick"]
    direct = ProxyTuner.from_pretrained(
        str(tiny_dirs["base"]),
        expert=str(tiny_dirs["expert"]),
        anti_expert=str(tiny_dirs["anti"]),
        alpha=0.5,
        device="cpu",
    ).generate(["Rain", "The quick"], max_new_tokens=5)
    assert [x["token_ids"] for x in lines] == [r.token_ids for r in direct]
    assert [x["text"] for x in lines] == [r.text for r in direct]


def test_cli_recipe_and_compare(tmp_path, tiny_dirs, capsys):
    path = write_recipe(tmp_path, tiny_dirs)
    assert main(["generate", "--recipe", str(path), "--compare", "--json", "Rain"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert set(row) == {"prompt", "base", "expert", "proxy"}
    t = ProxyTuner.from_recipe(path)
    assert row["base"]["token_ids"] == t.alone("base").generate("Rain")[0].token_ids
    assert row["expert"]["token_ids"] == t.alone("expert[0]").generate("Rain")[0].token_ids
    assert row["proxy"]["token_ids"] == t.generate("Rain")[0].token_ids


def test_cli_stream_prints_the_same_text(tmp_path, tiny_dirs, capsys):
    path = write_recipe(tmp_path, tiny_dirs)
    assert main(["generate", "--recipe", str(path), "--stream", "Rain"]) == 0
    streamed = capsys.readouterr().out
    assert streamed == ProxyTuner.from_recipe(path).generate("Rain")[0].text + "\n"


def test_cli_errors_are_one_line_not_tracebacks(tmp_path, capsys):
    code = main(["generate", "--base", str(tmp_path / "missing"), "Hi"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: model path") and "Traceback" not in err
    code = main(["generate", "--base", str(tmp_path / "missing"), "--temperature", "-1", "Hi"])
    assert code == 2


def test_cli_pairs_must_match(tiny_dirs, capsys):
    code = main(
        [
            "generate",
            "--base",
            str(tiny_dirs["base"]),
            "--expert",
            "a",
            "--expert",
            "b",
            "--anti-expert",
            "c",
            "Hi",
        ]
    )
    assert code == 2
    assert "give them in pairs" in capsys.readouterr().err
