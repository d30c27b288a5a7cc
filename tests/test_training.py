"""Training the expert (SFT, DPO, full and LoRA) and the one-pass LoRA pair, on tiny models."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from proxytune import ModelSpec, ProxyTuner
from proxytune.arithmetic import combine_proxy, log_probs
from proxytune.backends.lora_pair import LockstepError, LoraView, resolve_adapter_dir
from proxytune.cli import main
from proxytune.engine.prepare import render_prompts
from proxytune.errors import ConfigError
from proxytune.testing import save_tiny_model
from proxytune.training import DataError, TrainConfig, load_sft, train
from proxytune.training.encode import IGNORE, Encoder, TruncationWarning, fit_sft

CPU = {"device": "cpu", "dtype": "float32"}
TRAIN_WORDS = ["fox", "dog", "rain", "robot", "river", "book", "town", "sea", "loop", "list"]
HELD_OUT = ["tree", "cat", "bird", "house"]
ANSWER = " yes."


def question(word: str) -> str:
    return f"Question: what is a {word}? Answer:"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    """A small task: every question is answered " yes." (the expert's whole 'skill')."""
    rows = [{"prompt": question(w), "completion": ANSWER} for w in TRAIN_WORDS * 2]
    return write_jsonl(tmp_path_factory.mktemp("task") / "train.jsonl", rows)


def config(model: Path, data: Path, out: Path, **kw) -> TrainConfig:
    settings = dict(
        max_steps=24,
        batch_size=8,
        learning_rate=1e-2,
        template="raw",
        device="cpu",
        progress=False,
        lora_r=8,
        lora_dropout=0.0,
    )
    settings.update(kw)
    return TrainConfig(model=str(model), data=str(data), out=str(out), **settings)


@pytest.fixture(scope="module")
def lora_run(tiny_dirs, task, tmp_path_factory):
    """A LoRA adapter trained on the anti-expert's model (the usual proxy-tuning set-up)."""
    out = tmp_path_factory.mktemp("runs") / "lora"
    return train(config(tiny_dirs["anti"], task, out, lora=True))


def answer_logprob(tuner: ProxyTuner, prompts: list[str], answer: str) -> torch.Tensor:
    """Teacher-forced log p(answer | prompt) under the tuner's combination, one per prompt."""
    tok = tuner.tokenizer
    ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    forced = torch.tensor([ids[:-1]] * len(prompts))
    rendered = render_prompts(tuner.members, prompts)
    lps = {}
    for m in tuner.members:
        state, first = m.model.start(rendered[m.role])
        rest = state.advance(forced)  # logits after each forced token
        lps[m.role] = torch.cat([first[:, None], rest], dim=1)  # (P, k, W)
    total = torch.zeros(len(prompts))
    for j, token in enumerate(ids):
        v = tuner.vocab_size
        pairs = [
            (log_probs(lps[p.expert.role][:, j], v), log_probs(lps[p.anti_expert.role][:, j], v))
            for p in tuner.pairs
        ]
        base = log_probs(lps["base"][:, j], v)
        scores = combine_proxy(base, pairs, [p.alpha(j) for p in tuner.pairs])
        total += torch.log_softmax(scores, dim=-1)[:, token]
    return total


# data --------------------------------------------------------------------------------------


def test_data_errors_name_every_bad_line(tmp_path):
    lines = [
        json.dumps({"prompt": "a", "completion": " b"}),
        '{"prompt": "a", "completion": }',
        json.dumps({"prompt": "a"}),
        json.dumps({"prompt": "a", "completion": "   "}),
        json.dumps(["not", "an", "object"]),
        "",
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        json.dumps({"prompt": "a", "completion": 3}),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_sft(path)
    text = str(err.value)
    assert "line 2: not valid JSON" in text
    assert "6 bad line(s)" not in text  # JSON errors are reported before shape errors
    path.write_text("\n".join(lines[:1] + lines[2:]) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_sft(path)
    text = str(err.value)
    assert "5 bad line(s)" in text
    assert "line 2: missing field 'completion'" in text
    assert "line 3: empty completion" in text
    assert "line 4: expected a JSON object, got list" in text
    assert "line 6: 'messages' has no assistant message" in text
    assert "line 7: 'completion' must be a string, got int" in text


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_sft(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no examples"):
        load_sft(tmp_path / "empty.jsonl")


def test_loss_only_on_completion_and_prompt_ids_match_generation(tiny_dirs):
    from transformers import AutoTokenizer

    from proxytune.prompts import PromptFormat
    from proxytune.training.data import SFTExample

    tok = AutoTokenizer.from_pretrained(tiny_dirs["anti"])
    raw = Encoder(tok, "raw").sft(SFTExample(1, "Rain falls", completion=" on the town"))
    prompt = PromptFormat("raw").render("Rain falls", tok)
    assert raw.input_ids[: len(prompt)] == prompt  # the very ids generation starts from
    assert raw.labels[: len(prompt)] == [IGNORE] * len(prompt)
    assert raw.labels[len(prompt) :] == raw.input_ids[len(prompt) :]
    assert raw.input_ids[-1] == tok.eos_token_id

    chat = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "see you"},
    ]
    enc = Encoder(tok, "chat").sft(SFTExample(1, messages=tuple(chat)))
    learned = tok.decode(
        [i for i, label in zip(enc.input_ids, enc.labels, strict=True) if label != IGNORE]
    )
    assert learned == "hello<|im_end|>\nsee you<|im_end|>\n"  # both assistant turns, only them
    first = PromptFormat("chat").render(chat[:1], tok)
    assert enc.input_ids[: len(first)] == first


def test_overlong_refuse_names_lines_and_truncate_warns(tiny_dirs):
    from transformers import AutoTokenizer

    from proxytune.training.data import SFTExample

    tok = AutoTokenizer.from_pretrained(tiny_dirs["anti"])
    enc = Encoder(tok, "raw")
    items = [
        enc.sft(SFTExample(1, "short", completion=" one")),
        enc.sft(SFTExample(2, "a much longer prompt " * 4, completion=" two")),
        enc.sft(SFTExample(3, "x", completion=" a long completion " * 4)),
    ]
    limit = len(items[0].input_ids) + 1
    with pytest.raises(DataError, match=r"(?s)2 example\(s\) longer.*line 2: \d+ tokens.*line 3"):
        fit_sft(items, limit, "refuse", "d.jsonl")
    with pytest.warns(TruncationWarning, match=r"2 example\(s\) truncated.*1 dropped.*lines 2"):
        kept = fit_sft(items, limit, "truncate", "d.jsonl")
    assert [e.line for e in kept] == [1, 3]
    assert all(len(e.input_ids) <= limit for e in kept)


# training ----------------------------------------------------------------------------------


def test_lora_sft_loss_goes_down_and_output_loads_as_an_expert(lora_run, tiny_dirs):
    out = lora_run.out
    assert (out / "adapter_config.json").is_file() and not (out / "config.json").exists()
    losses, evals = lora_run.train_losses, lora_run.eval_losses
    assert losses[-1] < 0.2 * losses[0]
    assert len(evals) >= 2 and evals[-1] < 0.2 * evals[0]  # the held-out split too
    assert lora_run.metrics["eval_loss"] == pytest.approx(evals[-1])
    steps = [h["step"] for h in lora_run.log_history if "eval_loss" in h]
    assert len(steps) == len(set(steps))  # the last step's validation loss is computed once
    meta = json.loads((out / "proxytune_train.json").read_text())
    assert meta["status"] == "complete" and meta["kind"] == "lora-adapter"
    assert meta["base_model"] == str(Path(tiny_dirs["anti"]).resolve())
    # the adapter directory alone names its base
    assert resolve_adapter_dir(ModelSpec(str(out))) == ModelSpec(
        str(Path(tiny_dirs["anti"]).resolve()), adapter=str(out)
    )


def test_trained_expert_moves_the_base_toward_the_task(lora_run, tiny_dirs, tmp_path):
    """The measured effect: the held-out answers become far more likely, and greedy decoding
    of the proxy-tuned base produces them while the base alone does not."""
    base = ModelSpec(str(tiny_dirs["base"]), prompt="raw", **CPU)
    anti = ModelSpec(str(tiny_dirs["anti"]), prompt="raw", **CPU)
    expert = ModelSpec(str(lora_run.out), prompt="raw", **CPU)  # the adapter dir alone
    tuner = ProxyTuner.from_specs(base, [(expert, anti, 1.0)])
    prompts = [question(w) for w in HELD_OUT]
    steered = answer_logprob(tuner, prompts, ANSWER)
    alone = answer_logprob(tuner.alone("base"), prompts, ANSWER)
    assert bool((steered > alone + 10).all()), (steered, alone)

    # a task metric, greedy exact match, on a base with less peaked preferences of its own
    flat = save_tiny_model(tmp_path / "flat", seed=0, init_std=0.1)
    flat_tuner = ProxyTuner.from_specs(ModelSpec(str(flat), **CPU), [(expert, anti, 2.0)])

    def exact(t: ProxyTuner) -> int:
        return sum(r.text == ANSWER for r in t.generate(prompts, max_new_tokens=6))

    assert exact(flat_tuner.alone("base")) == 0
    assert exact(flat_tuner) >= len(prompts) - 1


def test_full_fine_tuning_loss_goes_down_and_moves_the_base(tiny_dirs, task, tmp_path):
    result = train(config(tiny_dirs["anti"], task, tmp_path / "full", learning_rate=3e-3))
    assert (result.out / "config.json").is_file()
    assert (result.out / "model.safetensors").is_file()
    assert result.train_losses[-1] < 0.5 * result.train_losses[0]
    assert result.eval_losses[-1] < 0.5 * result.eval_losses[0]
    base = ModelSpec(str(tiny_dirs["base"]), prompt="raw", **CPU)
    anti = ModelSpec(str(tiny_dirs["anti"]), prompt="raw", **CPU)
    tuner = ProxyTuner.from_specs(base, [(result.expert_spec(**CPU), anti, 1.0)])
    assert not isinstance(tuner.pairs[0].expert.model, LoraView)  # a full model: two models
    prompts = [question(w) for w in HELD_OUT]
    gain = answer_logprob(tuner, prompts, ANSWER) - answer_logprob(tuner.alone(), prompts, ANSWER)
    assert bool((gain > 5).all()), gain


class StopAt:
    """A ``TrainerCallback`` that interrupts training after ``step`` (like a crash would)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.seen: list[int] = []

    def __getattr__(self, name):  # every other callback event: do nothing
        return lambda *args, **kwargs: None

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(state.global_step)
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(tiny_dirs, task, tmp_path, lora):
    from safetensors.torch import load_file

    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    kw = dict(lora=lora, max_steps=6, save_steps=3, eval_fraction=0.0, learning_rate=3e-3)
    whole = train(config(tiny_dirs["anti"], task, tmp_path / "whole", **kw))
    cut = config(tiny_dirs["anti"], task, tmp_path / "cut", **kw)
    train(cut, callbacks=[StopAt(3)])
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == ["checkpoint-3"]
    with pytest.raises(ConfigError, match=r"not empty.*--overwrite.*--resume"):
        train(cut)
    cut.resume = True
    steps = StopAt(10**9)
    resumed = train(cut, callbacks=[steps])
    assert steps.seen == [4, 5, 6]  # continued from checkpoint-3, not from the start
    a, b = load_file(whole.out / weights), load_file(resumed.out / weights)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


class KillAfterSave(StopAt):
    """Raises once the checkpoint of ``step`` is saved: the process dies mid-run."""

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise KeyboardInterrupt


def test_an_unfinished_run_is_refused_with_how_to_resume(tiny_dirs, task, tmp_path, capsys):
    from proxytune.errors import ModelLoadError
    from proxytune.training.output import read_meta

    out = tmp_path / "killed"
    cut = config(tiny_dirs["anti"], task, out, lora=True, max_steps=4, save_steps=2)
    with pytest.raises(KeyboardInterrupt):
        train(cut, callbacks=[KillAfterSave(2)])
    assert read_meta(out)["status"] == "running" and (out / "checkpoint-2").is_dir()
    gen = ["generate", "--base", str(tiny_dirs["base"]), "--expert", str(out)]
    gen += ["--anti-expert", str(tiny_dirs["anti"]), "--device", "cpu", "--max-new-tokens", "2"]
    capsys.readouterr()
    assert main([*gen, "hi"]) == 2  # refused before any model loads, in one line
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "tokenizer" not in err
    assert "unfinished `proxytune train` run (status 'running'" in err
    assert f"--data {task} --lora --out {out} --resume" in err
    cut.resume = True  # the command it names finishes the run; then it loads
    train(cut)
    assert read_meta(out)["status"] == "complete"
    assert main([*gen, "hi"]) == 0
    # a complete adapter whose metadata still says running (killed between the two) is refused
    meta = json.loads((out / "proxytune_train.json").read_text())
    (out / "proxytune_train.json").write_text(json.dumps({**meta, "status": "running"}))
    with pytest.raises(ModelLoadError, match="unfinished `proxytune train` run"):
        ProxyTuner.from_pretrained(str(tiny_dirs["base"]), expert=str(out), **CPU)


def test_the_run_status_is_written_whole_or_not_at_all(tiny_dirs, task, tmp_path, monkeypatch):
    from proxytune.training import output

    run = train(config(tiny_dirs["anti"], task, tmp_path / "run", lora=True, max_steps=1))
    before = (run.out / "proxytune_train.json").read_text()

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(output.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        output.write_meta(run.out, config(tiny_dirs["anti"], task, run.out), "raw", status="x")
    assert (run.out / "proxytune_train.json").read_text() == before


def test_overwrite_protection(tiny_dirs, task, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    cfg = config(tiny_dirs["anti"], task, foreign, max_steps=1, lora=True)
    with pytest.raises(ConfigError, match="not empty; pass --overwrite"):
        train(cfg)
    cfg.overwrite = True
    with pytest.raises(ConfigError, match="not written by `proxytune train`; nothing there"):
        train(cfg)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(config(tiny_dirs["anti"], task, tmp_path / "new", resume=True))
    first = train(config(tiny_dirs["anti"], task, tmp_path / "run", max_steps=2, lora=True))
    assert (first.out / "adapter_config.json").is_file()
    with pytest.raises(ConfigError, match="is a LoRA adapter; train from its base"):
        train(config(first.out, task, tmp_path / "on-adapter"))
    again = train(config(tiny_dirs["anti"], task, tmp_path / "run", max_steps=1, overwrite=True))
    assert not (again.out / "adapter_config.json").exists()  # the old run is gone, not mixed in
    assert (again.out / "model.safetensors").is_file()


def test_dpo_prefers_chosen_over_rejected(tiny_dirs, tmp_path):
    rows = [
        {"prompt": question(w), "chosen": " yes.", "rejected": " no, never."}
        for w in TRAIN_WORDS * 2
    ]
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    result = train(
        config(tiny_dirs["anti"], data, tmp_path / "dpo", method="dpo", lora=True, beta=0.5)
    )
    evals = [h for h in result.log_history if "eval_loss" in h]
    assert evals[0]["eval_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference
    assert evals[-1]["eval_loss"] < 0.1
    assert evals[-1]["eval_rewards/accuracies"] == 1.0
    assert evals[-1]["eval_rewards/margins"] > 5
    meta = json.loads((result.out / "proxytune_train.json").read_text())
    assert meta["method"] == "dpo"


def test_chat_template_run_records_the_expert_prompt(tiny_dirs, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": question(w)},
                {"role": "assistant", "content": "yes"},
            ]
        }
        for w in TRAIN_WORDS
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    result = train(config(tiny_dirs["anti"], data, tmp_path / "out", template="auto", max_steps=2))
    assert result.expert_prompt == "chat"  # the tiny tokenizer has a chat template
    assert result.expert_spec().prompt.kind == "chat"


# the CLI -----------------------------------------------------------------------------------


def test_cli_train_then_generate_with_the_adapter_alone(tiny_dirs, task, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--model", str(tiny_dirs["anti"]), "--data", str(task), "--out", str(out)]
    args += ["--lora", "--max-steps", "2", "--template", "raw", "--device", "cpu", "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"saved a LoRA adapter to {out}" in printed and "--expert-prompt raw" in printed
    assert main(args) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    gen = ["generate", "--base", str(tiny_dirs["base"]), "--expert", str(out)]
    gen += ["--anti-expert", str(tiny_dirs["anti"]), "--expert-prompt", "raw", "--device", "cpu"]
    assert main([*gen, "--max-new-tokens", "4", "Question: what is a cat? Answer:"]) == 0
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}])
    both = ["--epochs", "1", "--max-steps", "2"]
    assert main(["train", "--model", "m", "--data", str(bad), "--out", "o", *both]) == 2
    assert main(["train", "--model", "m", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert re.search(r"line 1: missing field 'completion'", capsys.readouterr().err)


# the one-pass pair -------------------------------------------------------------------------

PROMPTS = ["The quick brown fox", "Rain", "def add(a, b):\n    return"]


@pytest.fixture(scope="module")
def random_adapter(tiny_dirs, tmp_path_factory) -> Path:
    """A LoRA adapter with random (non-zero) A and B on the anti-expert: a strong, arbitrary
    change, so that any mix-up of the rows would show."""
    from proxytune.testing import save_tiny_lora

    return save_tiny_lora(tiny_dirs["anti"], tmp_path_factory.mktemp("adapter") / "random", 7)


def pair_specs(tiny_dirs, adapter):
    base = ModelSpec(str(tiny_dirs["base"]), **CPU)
    expert = ModelSpec(str(tiny_dirs["anti"]), adapter=str(adapter), prompt="chat", **CPU)
    return base, expert, ModelSpec(str(tiny_dirs["anti"]), **CPU)


@pytest.fixture(scope="module")
def both_paths(tiny_dirs, random_adapter):
    base, expert, anti = pair_specs(tiny_dirs, random_adapter)
    one = ProxyTuner.from_specs(base, [(expert, anti, 1.5)])
    two = ProxyTuner.from_specs(base, [(expert, anti, 1.5)], options={"one_pass": False})
    return one, two


def count_forwards(model) -> list[int]:
    rows: list[int] = []
    model.register_forward_pre_hook(
        lambda m, args, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    return rows


def test_one_pass_is_chosen_and_equals_the_two_model_path(both_paths):
    one, two = both_paths
    expert, anti = one.pairs[0].expert.model, one.pairs[0].anti_expert.model
    assert isinstance(expert, LoraView) and expert.host is anti.host
    assert not isinstance(two.pairs[0].expert.model, LoraView)
    kw = dict(max_new_tokens=16, logprobs=True, top_logprobs=3)
    got, want = one.generate(PROMPTS, **kw), two.generate(PROMPTS, **kw)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g.logprobs, w.logprobs, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=5e-5)
            assert [t[0] for t in a.top] == [t[0] for t in b.top]
    sample = dict(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=11, n=2)
    assert [r.token_ids for r in one.generate(PROMPTS, **sample)] == [
        r.token_ids for r in two.generate(PROMPTS, **sample)
    ]
    nocache = dict(max_new_tokens=6, use_cache=False)  # full recomputation merges too
    assert [r.token_ids for r in one.generate(PROMPTS, **nocache)] == [
        r.token_ids for r in two.generate(PROMPTS, **nocache)
    ]
    # each role on its own (compare mode) still runs, on the shared weights
    for role in ("expert[0]", "anti_expert[0]"):
        a = one.alone(role).generate(PROMPTS, max_new_tokens=8)
        b = two.alone(role).generate(PROMPTS, max_new_tokens=8)
        assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_peft_mixed_batch_mechanism_gives_the_same_output(both_paths):
    """The row-mask hooks (default) and peft's ``adapter_names`` are interchangeable."""
    one, two = both_paths
    lm = one.pairs[0].expert.model.host.lm
    assert lm.masked  # vanilla LoRA on linear layers
    want = [r.token_ids for r in two.generate(PROMPTS, max_new_tokens=12)]
    lm.masked = False
    try:
        assert [r.token_ids for r in one.generate(PROMPTS, max_new_tokens=12)] == want
    finally:
        lm.masked = True


def test_one_pass_runs_one_forward_per_step_for_both_roles(both_paths):
    one, _ = both_paths
    host = one.pairs[0].expert.model.host
    rows = count_forwards(host.lm.model)
    one.generate(["Rain", "The quick brown fox"], max_new_tokens=5, ignore_eos=True)
    # two prefills of 2 rows, then one forward of 2 + 2 rows per decoded token
    assert rows == [2, 2, 4, 4, 4, 4]


def test_one_pass_memory_is_one_small_model_plus_the_adapter(both_paths):
    def bytes_of(tuner: ProxyTuner) -> int:
        seen: dict[int, int] = {}
        for m in tuner.pairs[0].members:
            lm = m.model.host.lm if isinstance(m.model, LoraView) else m.model
            for p in lm.model.parameters():
                seen[p.data_ptr()] = p.numel() * p.element_size()
        return sum(seen.values())

    one, two = both_paths
    small = sum(
        p.numel() * p.element_size() for p in two.pairs[0].anti_expert.model.model.parameters()
    )
    assert bytes_of(two) == 2 * small
    assert small < bytes_of(one) < 1.2 * small  # the adapter is the small extra


def test_lockstep_states_follow_continuous_batching(tiny_dirs, random_adapter):
    """keep/extend/compact (the server's continuous batching) and rollback (speculative
    decoding) give the two-model logits."""
    base, expert, anti = pair_specs(tiny_dirs, random_adapter)
    one = ProxyTuner.from_specs(base, [(expert, anti, 1.0)])
    two = ProxyTuner.from_specs(base, [(expert, anti, 1.0)], options={"one_pass": False})

    def run(tuner):
        e, a = tuner.pairs[0].expert.model, tuner.pairs[0].anti_expert.model
        ids = lambda *xs: [e.tokenizer(x)["input_ids"] for x in xs]  # noqa: E731
        se, _ = e.start(ids("Rain", "The quick"))
        sa, _ = a.start(ids("def add", "Once upon a time"))
        step = torch.tensor([[5], [9]])
        outs = [se.advance(step), sa.advance(step)]
        ne, _ = e.start(ids("Numbers: 0 1"))
        na, _ = a.start(ids("Lists"))
        se.extend(ne)
        sa.extend(na)
        for s in (se, sa):
            s.keep(torch.tensor([2, 0]))
            s.compact()
        step = torch.tensor([[7, 3], [8, 4]])
        outs += [se.advance(step), sa.advance(step)]
        for s in (se, sa):  # speculative decoding's rejected drafts
            s.rollback(torch.tensor([1, 2]))
        step = torch.tensor([[6], [2]])
        outs += [se.advance(step), sa.advance(step)]
        return outs

    for got, want in zip(run(one), run(two), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_lockstep_violation_is_refused(both_paths):
    one, _ = both_paths
    e, a = one.pairs[0].expert.model, one.pairs[0].anti_expert.model
    se, _ = e.start([[5, 6, 7]])
    sa, _ = a.start([[8, 9]])
    se.advance(torch.tensor([[3]]))
    with pytest.raises(LockstepError, match="different advance"):
        sa.advance(torch.tensor([[4]]))


def test_one_pass_opt_out_by_engine_option(tiny_dirs, random_adapter):
    base, expert, anti = pair_specs(tiny_dirs, random_adapter)
    tuner = ProxyTuner.from_specs(base, [(expert, anti, 1.0)], options={"one_pass": False})
    assert not isinstance(tuner.pairs[0].expert.model, LoraView)


def test_two_adapters_on_one_anti_expert_share_one_model(tiny_dirs, random_adapter, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from proxytune.backends.lora_specs import peft_quietly

    torch.manual_seed(8)
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["anti"])
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    with peft_quietly():
        get_peft_model(model, lora).save_pretrained(tmp_path / "second")
    base, first, anti = pair_specs(tiny_dirs, random_adapter)
    second = ModelSpec(str(tiny_dirs["anti"]), adapter=str(tmp_path / "second"), **CPU)
    pairs = [(first, anti, 1.0), (second, anti, 0.5)]
    one = ProxyTuner.from_specs(base, pairs)
    two = ProxyTuner.from_specs(base, pairs, options={"one_pass": False})
    hosts = {id(m.model.host) for p in one.pairs for m in p.members}
    assert len(hosts) == 1  # one small model, two adapters
    got = one.generate(PROMPTS, max_new_tokens=12)
    assert [r.token_ids for r in got] == [
        r.token_ids for r in two.generate(PROMPTS, max_new_tokens=12)
    ]


def test_no_gradient_checkpointing_deprecation_warning(tiny_dirs, task, tmp_path):
    """Issue 16, item 12: peft read transformers' deprecated ``is_gradient_checkpointing``
    whenever it built a model (13 warnings in these tests)."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run = train(config(tiny_dirs["anti"], task, tmp_path / "w", lora=True, max_steps=1))
        base, anti = (ModelSpec(str(tiny_dirs[n]), **CPU) for n in ("base", "anti"))
        for one_pass in (True, False):
            pairs = [(ModelSpec(str(run.out), **CPU), anti, 1.0)]
            ProxyTuner.from_specs(base, pairs, options={"one_pass": one_pass})
    assert not [w for w in seen if "is_gradient_checkpointing" in str(w.message)]
