"""Overlapped forwards (``overlap=True``): models on different engines run at once, and the
output is exactly the sequential one."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from proxytune import ModelSpec, ProxyTuner
from proxytune.config import GenerationConfig
from proxytune.engine import Member, Pair, decode, prepare
from proxytune.engine.overlap import concurrent_threads, engine, run_grouped, split_threads
from proxytune.engine.speculative import SpeculativeStats

PROMPTS = ["The quick brown fox", "Rain", "def add(a, b):\n    return", "Once upon a"]


def ids(results):
    return [r.token_ids for r in results]


def test_run_grouped_runs_engines_at_once_and_each_engine_in_order():
    barrier = threading.Barrier(2, timeout=10)  # passes only if both engines run at once
    log: list[tuple[str, str]] = []

    def call(name, wait=False):
        def thunk():
            if wait:
                barrier.wait()
            log.append((name, threading.current_thread().name))
            return name

        return thunk

    calls = [("a", call("a1", wait=True)), ("b", call("b1", wait=True)), ("b", call("b2"))]
    assert run_grouped(calls, overlap=True) == ["a1", "b1", "b2"]
    threads = dict(log)
    assert threads["a1"] == threading.current_thread().name  # the first engine: the caller
    assert threads["b1"] == threads["b2"] != threads["a1"]  # one engine, one thread
    assert [n for n, _ in log if n.startswith("b")] == ["b1", "b2"]  # in order
    log.clear()
    assert run_grouped([(k, call(n)) for k, n in (("a", "x"), ("b", "y"))], False) == ["x", "y"]
    assert {t for _, t in log} == {threading.current_thread().name}


def test_a_failing_engine_raises_after_the_others_finish():
    finished = threading.Event()

    def slow():
        time.sleep(0.2)
        finished.set()
        return 1

    def bad():
        raise ValueError("broken model")

    with pytest.raises(ValueError, match="broken model"):
        run_grouped([("a", bad), ("b", slow)], overlap=True)
    assert finished.is_set()


def test_threads_split_the_cores_by_cost_and_at_least_one_each():
    assert split_threads(2, [2.0, 1.0]) == [1, 1]  # the embedded default on 2 cores
    assert split_threads(4, [1.0, 1.0]) == [2, 2]
    assert split_threads(4, [3.0, 1.0]) == [3, 1]
    assert split_threads(6, [1.0, 2.0]) == [2, 4]
    assert split_threads(16, [1.54, 0.98]) == [10, 6]
    assert split_threads(3, [1.0, 1.0, 1.0, 1.0]) == [1, 1, 1, 1]  # fewer cores than contexts
    assert split_threads(5, [1.0, 1.0, 1.0]) == [2, 2, 1]  # ties: the first


class Context:
    """An engine whose threads may be split: records what it is told."""

    def __init__(self, cost, threads=4, shares=True):
        self.thread_cost, self.threads, self.shares_cores = cost, threads, shares
        self.told: list[int | None] = []

    def use_threads(self, n):
        self.told.append(n)


def test_concurrent_threads_split_what_fixed_counts_leave():
    base, pair, fixed = Context(3.0), Context(1.0), Context(9.0, threads=2, shares=False)
    assert concurrent_threads([base, pair], [1, 2], cores=5) == {base: 3, pair: 2}  # 3 : 2x1
    assert concurrent_threads([base, pair, fixed], [1, 2, 1], cores=6) == {base: 2, pair: 2}
    assert concurrent_threads([fixed, "torch"], [1, 1], cores=8) == {}
    assert concurrent_threads([base, fixed], [1, 1], cores=2) == {base: 1}


def test_run_grouped_splits_the_cores_while_engines_run_at_once_and_gives_them_back(
    monkeypatch,
):
    import proxytune.engine.overlap

    monkeypatch.setattr(proxytune.engine.overlap, "available_cores", lambda: 6)
    base, pair = Context(1.0), Context(1.0)
    calls = [(base, lambda: 0), (pair, lambda: 1), (pair, lambda: 2)]
    assert run_grouped(calls, overlap=True) == [0, 1, 2]
    assert base.told == [2, None] and pair.told == [4, None]  # None: its own count again
    run_grouped(calls, overlap=False)
    run_grouped([(base, lambda: 0)], overlap=True)  # one engine: nothing at once
    assert base.told == [2, None] and pair.told == [4, None]

    def bad():
        raise ValueError("broken")

    with pytest.raises(ValueError, match="broken"):
        run_grouped([(base, bad), (pair, lambda: 1)], overlap=True)
    assert base.told[-1] is None and pair.told[-1] is None


def test_engines_follow_views_down_to_the_shared_weights(tiny_dirs):
    t = ProxyTuner.from_pretrained(
        str(tiny_dirs["base"]),
        expert=str(tiny_dirs["anti"]),
        anti_expert=str(tiny_dirs["anti"]),
        expert_prompt="chat",
        device="cpu",
    )
    base, expert, anti = (m.model for m in t.members)
    assert engine(expert) is engine(anti) is not engine(base)
    stacked = t.with_options(stacked=True)
    views = [m.model for m in stacked.members]
    assert engine(views[1]) is engine(views[2]) is engine(anti)


@pytest.fixture(scope="module")
def shared(tiny_dirs):
    """The embedded default's shape: a base, and one small model in both pair roles."""
    return ProxyTuner.from_pretrained(
        str(tiny_dirs["base"]),
        expert=str(tiny_dirs["anti"]),
        anti_expert=str(tiny_dirs["anti"]),
        base_prompt="raw",
        expert_prompt="chat",
        anti_expert_prompt="raw",
        alpha=1.0,
        device="cpu",
        dtype="float32",
    )


@pytest.mark.parametrize("which", ["tuner", "shared"])
def test_overlapped_output_is_the_sequential_output(request, which):
    t = request.getfixturevalue(which)
    for settings in (
        {"max_new_tokens": 16},
        {"max_new_tokens": 12, "temperature": 0.9, "top_p": 0.9, "seed": 4, "n": 2},
        {"max_new_tokens": 8, "logprobs": True, "top_logprobs": 3},
    ):
        want = t.generate(PROMPTS, **settings)
        got = t.generate(PROMPTS, overlap=True, **settings)
        assert ids(got) == ids(want)
        assert [r.text for r in got] == [r.text for r in want]
        if settings.get("logprobs"):
            flat = [(lp.token_id, lp.logprob) for r in got for lp in r.logprobs]
            assert flat == [(lp.token_id, lp.logprob) for r in want for lp in r.logprobs]
    stats = SpeculativeStats()
    spec = t.generate(PROMPTS, max_new_tokens=16, speculative="auto", overlap=True, stats=stats)
    assert ids(spec) == ids(t.generate(PROMPTS, max_new_tokens=16)) and stats.proposed > 0
    on = t.with_options(overlap=True)  # the tuner's default
    assert ids(on.with_options(stacked=True).generate(PROMPTS, max_new_tokens=10)) == ids(
        t.generate(PROMPTS, max_new_tokens=10, overlap=False)
    )


def test_a_one_pass_lora_pair_overlaps_with_the_base(tiny_dirs, tmp_path):
    from proxytune.testing import save_tiny_lora

    save_tiny_lora(tiny_dirs["anti"], tmp_path / "adapter", seed=5)
    cpu = {"device": "cpu", "dtype": "float32"}
    anti = ModelSpec(str(tiny_dirs["anti"]), **cpu)
    expert = ModelSpec(str(tiny_dirs["anti"]), adapter=str(tmp_path / "adapter"), **cpu)
    t = ProxyTuner.from_specs(ModelSpec(str(tiny_dirs["base"]), **cpu), [(expert, anti, 1.0)])
    assert type(t.pairs[0].expert.model).__name__ == "LoraView"
    want = t.generate(PROMPTS, max_new_tokens=12)
    assert ids(t.generate(PROMPTS, max_new_tokens=12, overlap=True)) == ids(want)


class Recording:
    """A mock model (5 ids) whose forwards note the thread they ran in."""

    def __init__(self, seed, log):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(64, 5, generator=g)
        self.name, self.device, self.log = f"m{seed}", torch.device("cpu"), log
        self.vocab_width, self.context_length, self.eos_token_ids = 5, 64, ()
        self.tokenizer = None

    def start(self, prompts, use_cache=True):
        self.log.append((self.name, threading.current_thread().name))
        return RecordingState(self, [len(p) for p in prompts]), self.table[
            [len(p) for p in prompts]
        ]


class RecordingState:
    def __init__(self, model, lengths):
        self.model, self.lengths = model, lengths

    def advance(self, tokens):
        self.model.log.append((self.model.name, threading.current_thread().name))
        self.lengths = [n + tokens.shape[1] for n in self.lengths]
        return self.model.table[self.lengths][:, None]

    def keep(self, rows):
        self.lengths = [self.lengths[i] for i in rows.tolist()]


def test_the_decode_loop_runs_the_pair_beside_the_base():
    from proxytune.prompts import PromptFormat

    log: list[tuple[str, str]] = []
    models = [Recording(i, log) for i in range(3)]
    fmt = PromptFormat.parse("raw")

    class Chars:  # ids of the letters a..e
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) - ord("a") for c in text]}

        def decode(self, ids, **_):
            return "".join(chr(ord("a") + i) for i in ids)

    for m in models:
        m.tokenizer = Chars()
    base = Member("base", models[0], fmt)
    pair = Pair(Member("expert[0]", models[1], fmt), Member("anti_expert[0]", models[2], fmt))
    config = GenerationConfig(max_new_tokens=5, ignore_eos=True)
    for overlap in (False, True):
        log.clear()
        request = prepare(base, [pair], ["ab"], config, 5, ())
        out = [u.token_id for ups in decode(request, overlap) for u in ups]
        assert len(out) == 5
        threads = {name: {t for n, t in log if n == name} for name, _ in log}
        main = threading.current_thread().name
        assert threads["m0"] == {main}
        if overlap:
            assert main not in threads["m1"] | threads["m2"]
        else:
            assert threads["m1"] == threads["m2"] == {main}


def test_cli_overlap_for_generate_and_serve(tiny_dirs, capsys, monkeypatch):
    import json

    import proxytune.server
    from proxytune.cli import main

    models = ["--base", str(tiny_dirs["base"]), "--expert", str(tiny_dirs["expert"])]
    models += ["--anti-expert", str(tiny_dirs["anti"]), "--device", "cpu"]
    args = ["generate", *models, "--max-new-tokens", "8", "--json", "Rain"]
    assert main(args) == 0
    want = json.loads(capsys.readouterr().out)
    assert main([*args, "--overlap"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == want["token_ids"]
    seen = {}
    monkeypatch.setattr(proxytune.server, "serve", lambda t, s, **kw: seen.update(tuner=t))
    assert main(["serve", *models, "--overlap"]) == 0
    assert seen["tuner"].overlap is True


def test_a_recipe_turns_overlap_on_and_the_cli_can_turn_it_off(tiny_dirs, tmp_path, monkeypatch):
    import proxytune.server
    from proxytune.cli import main
    from proxytune.errors import ConfigError
    from proxytune.recipe import parse_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"""
base: {{model: "{tiny_dirs["base"]}"}}
pairs: [{{expert: "{tiny_dirs["expert"]}", anti_expert: "{tiny_dirs["anti"]}"}}]
model_defaults: {{device: cpu}}
engine: {{overlap: true}}
"""
    )
    assert ProxyTuner.from_recipe(recipe).overlap is True
    seen = {}
    monkeypatch.setattr(proxytune.server, "serve", lambda t, s, **kw: seen.update(tuner=t))
    assert main(["serve", "--recipe", str(recipe)]) == 0 and seen["tuner"].overlap is True
    assert main(["serve", "--recipe", str(recipe), "--no-overlap"]) == 0
    assert seen["tuner"].overlap is False
    with pytest.raises(ConfigError, match="'overlap' must be true or false"):
        parse_recipe({"base": "x", "engine": {"overlap": "yes"}})


def test_mps_models_never_run_in_threads():
    from proxytune.engine.overlap import can_overlap

    class On:
        def __init__(self, kind):
            self.device = torch.device(kind)

    assert can_overlap([On("cpu"), On("cpu")]) and can_overlap([object()])
    assert not can_overlap([On("cpu"), On("mps")])
