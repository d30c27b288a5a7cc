"""Recipe files and the command line, on tiny models."""

from __future__ import annotations

import json
import re

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
    out = capsys.readouterr()
    row = json.loads(out.out)  # stdout holds the JSON only; progress goes to stderr
    assert set(row) == {"prompt", "base", "expert", "proxy"}
    for system in ("base", "expert", "proxy"):
        assert re.search(rf"{system}.*\d+ tokens .*tok/s", out.err)
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


# -- prompt formats: auto, and what --json reports ----------------------------------------------


def tiny_models(tiny_dirs, expert=None):
    models = ["--base", str(tiny_dirs["base"]), "--expert", str(expert or tiny_dirs["expert"])]
    return [*models, "--anti-expert", str(tiny_dirs["anti"]), "--device", "cpu"]


def test_cli_json_names_the_prompt_format_of_each_model(tiny_dirs, capsys):
    args = ["generate", *tiny_models(tiny_dirs), "--max-new-tokens", "3", "--json"]
    assert main([*args, "Rain"]) == 0  # auto: every tiny tokenizer has a chat template
    row = json.loads(capsys.readouterr().out)
    assert row["prompt_formats"] == {"base": "chat", "expert[0]": "chat", "anti_expert[0]": "chat"}
    paper = ["--base-prompt", "raw", "--anti-expert-prompt", "{prompt}\n"]
    assert main([*args, *paper, "Rain"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["prompt_formats"] == {
        "base": "raw",
        "expert[0]": "chat",
        "anti_expert[0]": "{prompt}\n",
    }
    assert main([*args, *paper, "--compare", "Rain"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["base"]["prompt_formats"] == {"base": "raw"}
    assert row["expert"]["prompt_formats"] == {"expert[0]": "chat"}
    assert row["proxy"]["prompt_formats"]["anti_expert[0]"] == "{prompt}\n"
    assert main([*args[:-1], *paper, "--compare", "Rain"]) == 0  # the table's caption
    table = capsys.readouterr().out
    assert "prompt formats: base 'raw'" in table and "'{prompt}\\n'" in table


def test_auto_gives_an_expert_without_a_chat_template_the_raw_prompt(tiny_dirs, tmp_path, capsys):
    from proxytune.testing import build_model, build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = None
    build_model(tok).save_pretrained(tmp_path / "plain")
    tok.save_pretrained(tmp_path / "plain")
    args = ["generate", *tiny_models(tiny_dirs, tmp_path / "plain"), "--max-new-tokens", "2"]
    assert main([*args, "--json", "Rain"]) == 0  # no --expert-prompt raw needed any more
    assert json.loads(capsys.readouterr().out)["prompt_formats"]["expert[0]"] == "raw"
    assert main([*args, "--expert-prompt", "chat", "Rain"]) == 2  # asked for: still refused
    assert "has no chat template" in capsys.readouterr().err


def test_auto_takes_the_format_a_trained_expert_was_tuned_on(tiny_dirs, tmp_path):
    import shutil

    from proxytune.backends.lora_specs import TRAIN_META
    from proxytune.prompts import PromptFormat, resolve_prompt
    from proxytune.specs import ModelSpec

    trained = shutil.copytree(tiny_dirs["expert"], tmp_path / "trained")
    record = {"expert_prompt": "raw", "system": "Be brief.", "base_model": "x"}
    (trained / TRAIN_META).write_text(json.dumps(record))
    kw = {"anti_expert": str(tiny_dirs["anti"]), "device": "cpu"}
    t = ProxyTuner.from_pretrained(str(tiny_dirs["base"]), expert=str(trained), **kw)
    assert t.pairs[0].expert.prompt == PromptFormat("raw", system="Be brief.")
    assert t.base.prompt.kind == t.pairs[0].anti_expert.prompt.kind == "chat"  # no record
    t = ProxyTuner.from_pretrained(
        str(tiny_dirs["base"]), expert=str(trained), expert_prompt="chat", **kw
    )
    assert t.pairs[0].expert.prompt == PromptFormat("chat")  # an explicit format wins
    tok = t.tokenizer
    adapter = ModelSpec(str(tiny_dirs["anti"]), adapter=str(trained))  # the adapter's record
    assert resolve_prompt("auto", adapter, tok) == PromptFormat("raw", system="Be brief.")
    assert resolve_prompt({"kind": "auto", "system": "S"}, adapter, tok).system == "S"
    assert resolve_prompt("auto", ModelSpec(str(tiny_dirs["anti"])), tok).kind == "chat"
    assert resolve_prompt("auto", str(trained), tok).kind == "raw"
    assert PromptFormat("auto").render("Rain", tok) == PromptFormat("chat").render("Rain", tok)
    with pytest.raises(ConfigError, match="'auto', 'raw', 'chat' or 'template'"):
        PromptFormat.parse("automatic")


# -- option spellings ------------------------------------------------------------------------


def click_commands():
    import typer

    from proxytune.cli import app

    return typer.main.get_command(app).commands  # type: ignore[attr-defined]


def test_options_have_one_spelling_and_no_double_negatives():
    commands = click_commands()
    assert set(commands) == {
        "generate", "rules", "setup", "serve", "train", "export", "eval", "analyze", "reproduce",
        "pairs", "monitor",
    }  # fmt: skip
    for name, command in commands.items():
        for param in command.params:
            for flag in [*param.opts, *param.secondary_opts]:
                assert not flag.startswith("--no-no-"), (name, flag)
    flags = {
        name: {flag: p for p in c.params for flag in [*p.opts, *p.secondary_opts]}
        for name, c in commands.items()
    }
    for name in ("generate", "serve", "eval", "analyze", "reproduce"):
        assert flags[name]["--alpha"].multiple, name  # repeatable everywhere
    for name in ("generate", "serve", "eval"):
        for flag in ("--overlap", "--speculative", "--stacked", "--prefix-cache", "--two-pass"):
            assert flag in flags[name], (name, flag)
    for name in ("generate", "serve", "eval", "analyze"):
        assert flags[name]["--expert-prompt"].default == "auto"
        assert "--backend" in flags[name] and "--threads" in flags[name]
    for name in ("generate", "eval"):  # the plain loop's option
        assert "--no-candidates" in flags[name] and "--candidates" in flags[name], name
    assert "--no-cache" in flags["generate"] and "--cache" in flags["generate"]
    assert "--no-kl-metric" in flags["serve"] and "--kl-metric" in flags["serve"]
    assert "--alphas" in flags["reproduce"]  # the old spelling still works


GROUP_FLAGS = {
    "ModelOptions": "recipe base expert anti_expert alpha base_prompt expert_prompt "
    "anti_expert_prompt",
    "LoadOptions": "device dtype backend threads gpu_layers trust_remote_code",
    "SamplingOptions": "max_new_tokens temperature top_k top_p min_p repetition_penalty stop "
    "seed n top_logprobs cache",
    "SteeringOptions": "rule rule_arg",
    "EngineFlags": "overlap speculative stacked prefix_cache one_pass",
    "PlainEngineFlags": "overlap speculative stacked prefix_cache one_pass candidates",
    "BlackBoxOptions": "base_url base_model base_top_logprobs base_tokenizer api_key_env "
    "base_chunk base_samples base_endpoint cross_tokenizer min_coverage",
}
GROUPS_OF = {
    "generate": ("ModelOptions", "LoadOptions", "SamplingOptions", "SteeringOptions",
                 "PlainEngineFlags", "BlackBoxOptions"),
    "serve": ("ModelOptions", "LoadOptions", "EngineFlags"),
    "eval": ("ModelOptions", "LoadOptions", "SteeringOptions", "PlainEngineFlags"),
    "analyze": ("ModelOptions", "LoadOptions", "SteeringOptions"),
}  # fmt: skip


def test_option_groups_are_declared_once_and_commands_write_out_few_parameters():
    """The shared option groups carry exactly the flags the commands had, with one help text
    per flag, and no command writes out more than 15 parameters (issue 26)."""
    import inspect
    from dataclasses import fields

    import proxytune.cli.options as options
    from proxytune.cli import app

    for name, flags in GROUP_FLAGS.items():
        assert [f.name for f in fields(getattr(options, name))] == flags.split(), name
    commands = click_commands()
    helps = {name: {p.name: p.help for p in c.params} for name, c in commands.items()}
    for command, groups in GROUPS_OF.items():
        for flag in (f for group in groups for f in GROUP_FLAGS[group].split()):
            same = helps[command][flag] == helps["generate"][flag]
            assert same or (command, flag) == ("eval", "alpha"), (command, flag)  # a sweep
    own = "prompts as_json compare stream input_file output_file batch_size stop_on_error "
    own += "ray_actors ray_address"
    shared = {f for g in GROUPS_OF["generate"] for f in GROUP_FLAGS[g].split()}
    assert {p.name for p in commands["generate"].params} == shared | set(own.split())
    for info in app.registered_commands:
        written = inspect.signature(getattr(info.callback, "__wrapped__", info.callback))
        assert len(written.parameters) <= 15, (info.callback.__name__, len(written.parameters))


def test_alpha_values_repeated_or_comma_separated():
    from proxytune.cli.options import parse_alphas

    assert parse_alphas(["0", "0.5"]) == parse_alphas(["0,0.5"]) == [0.0, 0.5]
    assert parse_alphas(["0:1:0.5", "1"], unique=True) == [0.0, 0.5, 1.0]
    assert parse_alphas(["1", "1"]) == [1.0, 1.0]  # one per pair: kept
    assert parse_alphas(None) == []
    with pytest.raises(ConfigError, match="--alpha 'x': give numbers"):
        parse_alphas(["0.5", "x"])
    with pytest.raises(ConfigError, match="finite"):
        parse_alphas(["inf"])


def test_eval_and_reproduce_take_repeated_or_comma_alphas(tiny_dirs, tmp_path, monkeypatch):
    import proxytune.cli.evaluate
    import proxytune.reproduce.pipeline

    seen = []
    monkeypatch.setattr(
        proxytune.cli.evaluate, "run_eval", lambda t, task, **kw: seen.append(kw) or 0
    )
    args = ["eval", "arith", *tiny_models(tiny_dirs)]
    assert main([*args, "--alpha", "0", "--alpha", "0.5,1"]) == 0
    assert main([*args, "--alpha", "0:1:0.5"]) == 0
    assert seen[0]["alphas"] == seen[1]["alphas"] == [0.0, 0.5, 1.0]
    configs = []
    monkeypatch.setattr(
        proxytune.reproduce.pipeline, "reproduce", lambda c, **kw: configs.append(c)
    )
    out = ["reproduce", "--preset", "tiny", "--out", str(tmp_path / "r")]
    assert main([*out, "--alphas", "0.5,2"]) == 0
    assert main([*out, "--alpha", "0.5", "--alpha", "2"]) == 0
    assert configs[0].alphas == configs[1].alphas == (0.5, 2.0)


def test_engine_options_reach_the_tuner_at_load(tiny_dirs, tmp_path, monkeypatch, capsys):
    import proxytune.server

    seen = {}
    monkeypatch.setattr(proxytune.server, "serve", lambda t, s, **kw: seen.update(tuner=t))
    models = tiny_models(tiny_dirs)
    assert main(["serve", *models, "--stacked", "--two-pass", "--speculative", "2"]) == 0
    options = seen["tuner"].options
    assert (options.stacked, options.one_pass, options.speculative) == (True, False, 2)
    assert not options.prefix_cache and not options.overlap
    assert main(["serve", *models, "--stacked", "--prefix-cache"]) == 2  # before loading
    assert "do not compose" in capsys.readouterr().err
    import proxytune.cli.evaluate

    tuners = []
    monkeypatch.setattr(
        proxytune.cli.evaluate, "run_eval", lambda t, task, **kw: tuners.append(t) or 0
    )
    assert main(["eval", "arith", *models]) == 0
    assert main(["eval", "arith", *models, "--no-candidates"]) == 0
    assert [t.options.candidates for t in tuners] == [True, False]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f'base: "{tiny_dirs["base"]}"\n'
        f'pairs: [{{expert: "{tiny_dirs["expert"]}", anti_expert: "{tiny_dirs["anti"]}"}}]\n'
        "model_defaults: {device: cpu}\nengine: {speculative: 3, prefix_cache: true}\n"
    )
    assert main(["serve", "--recipe", str(recipe), "--speculative", "0"]) == 0
    assert seen["tuner"].options.speculative is None and seen["tuner"].options.prefix_cache
    args = ["generate", *models, "--max-new-tokens", "6", "--json", "Rain"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)["token_ids"]
    assert main([*args, "--prefix-cache", "--speculative", "auto"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["token_ids"] == plain
    assert "speculative:" in out.err and "drafts accepted" in out.err
