"""Residual expert training: the formulas by hand, the exact reduction to SFT (base = the
anti-expert, every token kept), and a run on the tiny models (loss falls, M and A unchanged)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from proxytune.cli import main
from proxytune.errors import ConfigError
from proxytune.testing import build_char_tokenizer, build_model
from proxytune.training import TrainConfig, train
from proxytune.training.encode import IGNORE, Encoded
from proxytune.training.residual import (
    ResidualCollator,
    ResidualDataset,
    base_top_k,
    dense_logprobs,
    residual_batch_loss,
    residual_loss,
    top_k_logprobs,
)

ANSWER = " yes."
WORDS = ["fox", "dog", "rain", "robot", "river", "book", "town", "sea"]


def write_task(path: Path) -> Path:
    rows = [{"prompt": f"Question: what is a {w}? Answer:", "completion": ANSWER} for w in WORDS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def settings(**kw) -> dict:
    out = dict(
        max_steps=6, batch_size=8, learning_rate=1e-2, template="raw", device="cpu",
        progress=False, lora=True, lora_r=8, lora_dropout=0.0, eval_fraction=0.0,
        logging_steps=1,
    )  # fmt: skip
    out.update(kw)
    return out


# -- the formulas -----------------------------------------------------------------------------


def test_dense_logprobs_keeps_the_top_k_and_spreads_the_rest():
    lp = torch.log_softmax(torch.tensor([[2.0, 0.0, 1.0, -1.0, 0.5]]), -1)
    ids, lps = top_k_logprobs(lp, 2)
    assert ids.tolist() == [[0, 2]]
    dense = dense_logprobs(ids, lps, 5)
    p = lp.exp()[0].tolist()
    rest = (1 - p[0] - p[2]) / 3
    assert dense.exp()[0].tolist() == pytest.approx([p[0], rest, p[2], rest, rest], abs=1e-6)
    full_ids, full_lps = top_k_logprobs(lp, None)
    assert torch.equal(dense_logprobs(full_ids, full_lps, 5), lp)  # k = V: exact


def test_residual_loss_by_hand():
    base = [math.log(p) for p in (0.5, 0.3, 0.2)]
    expert, anti = [2.0, 0.0, 1.0], [0.0, 0.0, 0.0]
    lse = lambda xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    e = [x - lse(expert) for x in expert]
    a = [x - lse(anti) for x in anti]
    s = [b + x - y for b, x, y in zip(base, e, a, strict=True)]
    want = -(s[2] - lse(s))  # cross-entropy of token 2
    got = residual_loss(
        torch.tensor([base]), torch.tensor([expert]), torch.tensor([anti]), torch.tensor([2])
    )
    assert float(got) == pytest.approx(want, abs=1e-6)


def test_with_the_base_equal_to_the_anti_expert_it_is_the_sft_loss():
    g = torch.Generator().manual_seed(0)
    expert, anti = torch.randn(6, 7, generator=g), torch.randn(6, 7, generator=g)
    targets = torch.randint(0, 7, (6,), generator=g)
    got = residual_loss(torch.log_softmax(anti, -1), expert, anti, targets)
    sft = torch.nn.functional.cross_entropy(expert, targets)
    assert float(got) == pytest.approx(float(sft), abs=1e-5)
    # and it differs for another base (so the equality above is not trivial)
    other = residual_loss(torch.log_softmax(expert, -1), expert, anti, targets)
    assert abs(float(other) - float(sft)) > 1e-2


def test_on_a_lora_model_with_m_equal_a_and_full_top_k_the_batch_loss_is_sft(tiny_dirs):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    small = AutoModelForCausalLM.from_pretrained(tiny_dirs["anti"], dtype=torch.float32)
    model = get_peft_model(small, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a trained-looking adapter: the expert differs from A
            torch.nn.init.normal_(param, std=0.2)
    model.eval()
    items = [
        Encoded(0, [5, 6, 7, 8, 9, 10], [IGNORE, IGNORE, IGNORE, 8, 9, 10]),
        Encoded(1, [11, 12, 13, 14], [IGNORE, IGNORE, 13, 14]),
    ]
    data, collator = ResidualDataset(items), ResidualCollator(0)
    vocab = small.config.vocab_size
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["anti"], dtype=torch.float32)  # M = A
    data.base = base_top_k(base, data, collator, 2, torch.device("cpu"), vocab, None)
    assert [ids.shape[0] for ids, _ in data.base] == [3, 2]  # answer positions only
    batch = collator([data[0], data[1]])
    with torch.no_grad():
        got = residual_batch_loss(model, batch, vocab)
        sft = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    assert float(got) == pytest.approx(float(sft), abs=1e-5)
    # with a base of its own (M != A) it differs
    data.base = base_top_k(
        AutoModelForCausalLM.from_pretrained(tiny_dirs["base"], dtype=torch.float32),
        data, collator, 2, torch.device("cpu"), vocab, 16,
    )  # fmt: skip
    with torch.no_grad():
        other = residual_batch_loss(model, collator([data[0], data[1]]), vocab)
    assert abs(float(other) - float(sft)) > 1e-3


# -- a run on the tiny models -----------------------------------------------------------------


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_a_residual_run_lowers_its_loss_and_leaves_base_and_anti_expert_alone(tiny_dirs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    before = {k: digest(tiny_dirs[k]) for k in ("base", "anti")}
    data = write_task(tmp_path / "train.jsonl")
    result = train(
        TrainConfig(
            model=str(tiny_dirs["anti"]), data=str(data), out=str(tmp_path / "out"),
            objective="residual", base=str(tiny_dirs["base"]), base_top_k=32, **settings(),
        )
    )  # fmt: skip
    losses = result.train_losses
    assert len(losses) >= 3 and losses[-1] < losses[0] * 0.8, losses
    assert {k: digest(tiny_dirs[k]) for k in ("base", "anti")} == before  # M, A files untouched
    # the adapter is all that was trained: with it disabled the model is the small one (A)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_dirs["anti"], dtype=torch.float32)
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_dirs["anti"], dtype=torch.float32),
        str(result.out),
    )
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        with tuned.disable_adapter():
            off = tuned(input_ids=ids).logits
        on = tuned(input_ids=ids).logits
        assert torch.equal(off, fresh(input_ids=ids).logits)
    assert not torch.allclose(on, off)  # the adapter learned something


def test_residual_settings_are_checked(tiny_dirs, tmp_path):
    data = write_task(tmp_path / "train.jsonl")
    common = dict(model=str(tiny_dirs["anti"]), data=str(data), out=str(tmp_path / "o"))
    for kw, message in [
        (dict(objective="residual", lora=True), "objective residual needs the big model: --base"),
        (dict(objective="residual", base="b"), "trains a LoRA .*: add --lora"),
        (dict(objective="residual", base="b", lora=True, method="dpo"), "drop --dpo"),
        (dict(base="b"), "--base is read only by --objective residual"),
        (dict(objective="rl"), r"objective must be one of \('sft', 'residual'\)"),
        (dict(objective="residual", base="b", lora=True, base_top_k=0), "base_top_k must be"),
    ]:
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**common, **kw).validate()


def test_a_base_of_another_tokenizer_is_refused_in_one_line(tiny_dirs, tmp_path):
    tok = build_char_tokenizer()
    other = tmp_path / "chars"
    build_model(tok, seed=0).save_pretrained(other)
    tok.save_pretrained(other)
    data = write_task(tmp_path / "train.jsonl")
    config = TrainConfig(
        model=str(tiny_dirs["anti"]), data=str(data), out=str(tmp_path / "out"),
        objective="residual", base=str(other), **settings(),
    )  # fmt: skip
    with pytest.raises(ConfigError, match="must share the tokenizer of --model") as err:
        train(config)
    assert "\n" not in str(err.value)


def test_cli_trains_a_residual_expert(tiny_dirs, tmp_path, capsys):
    data = write_task(tmp_path / "train.jsonl")
    out = tmp_path / "cli"
    args = ["train", "--model", str(tiny_dirs["anti"]), "--data", str(data), "--out", str(out)]
    args += ["--lora", "--objective", "residual", "--base", str(tiny_dirs["base"])]
    args += ["--max-steps", "2", "--template", "raw", "--device", "cpu", "--quiet"]
    assert main(args) == 0
    assert (out / "adapter_config.json").is_file()
    assert "saved a LoRA adapter" in capsys.readouterr().out
    assert main([*args[:7], "--objective", "residual", "--lora"]) == 2
    assert "needs the big model: --base" in capsys.readouterr().err
