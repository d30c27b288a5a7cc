"""Exactness of the decode loop on tiny models (the issue's "must hold" list)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from proxytune import ProxyTuner
from proxytune.arithmetic import combine_proxy, log_probs

PROMPTS = ["The quick brown fox", "Rain", "def add(a, b):\n    return"]


def hf_greedy(path, prompts, max_new_tokens):
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    rows = out[:, enc.input_ids.shape[1] :].tolist()
    eos = tok.eos_token_id
    return [r[: r.index(eos) + 1] if eos in r else r for r in rows]


def test_alpha_zero_reproduces_base_generate_batched_with_padding(tuner, tiny_dirs):
    want = hf_greedy(tiny_dirs["base"], PROMPTS, 16)
    got = tuner.generate(PROMPTS, alpha=0.0, max_new_tokens=16)
    assert [r.token_ids for r in got] == want


def test_alpha_zero_with_a_schedule_that_stays_zero_runs_the_pair_and_still_matches(
    tuner, tiny_dirs
):
    want = hf_greedy(tiny_dirs["base"], PROMPTS, 8)
    got = tuner.generate(PROMPTS, alpha=lambda step: 0.0, max_new_tokens=8)
    assert [r.token_ids for r in got] == want


def test_steering_changes_output(tuner):
    base = tuner.generate(PROMPTS, alpha=0.0, max_new_tokens=12)
    steered = tuner.generate(PROMPTS, alpha=1.0, max_new_tokens=12)
    assert [r.token_ids for r in base] != [r.token_ids for r in steered]


def test_expert_equal_to_anti_expert_changes_nothing(tiny_dirs):
    same = ProxyTuner.from_pretrained(
        str(tiny_dirs["base"]),
        expert=str(tiny_dirs["expert"]),
        anti_expert=str(tiny_dirs["expert"]),
        alpha=2.0,
        base_prompt="raw",
        expert_prompt="raw",
        anti_expert_prompt="raw",
        device="cpu",
    )
    # both roles share one set of weights but keep their own caches
    assert same.pairs[0].expert.model is same.pairs[0].anti_expert.model
    got = same.generate(PROMPTS, max_new_tokens=12)
    assert [r.token_ids for r in got] == hf_greedy(tiny_dirs["base"], PROMPTS, 12)


def test_batched_equals_one_by_one(tuner):
    batched = tuner.generate(PROMPTS, max_new_tokens=12)
    single = [tuner.generate([p], max_new_tokens=12)[0] for p in PROMPTS]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert [r.text for r in batched] == [r.text for r in single]


def test_batched_equals_one_by_one_when_sampling_with_a_seed(tuner):
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=123, n=2)
    batched = tuner.generate(PROMPTS, **kw)
    single = [r for p in PROMPTS for r in tuner.generate([p], **kw)]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    # n samples per prompt differ, and the seed reproduces them
    assert batched[0].token_ids != batched[1].token_ids
    assert [r.token_ids for r in tuner.generate(PROMPTS, **kw)] == [r.token_ids for r in batched]


def test_cached_decoding_equals_full_recomputation(tuner):
    cached = tuner.generate(PROMPTS, max_new_tokens=10)
    full = tuner.generate(PROMPTS, max_new_tokens=10, use_cache=False)
    assert [r.token_ids for r in cached] == [r.token_ids for r in full]
    for a, b in zip(
        tuner.generate(PROMPTS[:1], max_new_tokens=5, logprobs=True)[0].logprobs,
        tuner.generate(PROMPTS[:1], max_new_tokens=5, logprobs=True, use_cache=False)[0].logprobs,
        strict=True,
    ):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)


def test_logprobs_equal_hand_computation_from_each_model(tuner, tiny_dirs):
    """Recompute every step's combined log-prob from the three models run independently."""
    res = tuner.generate(["Rain"], max_new_tokens=6, logprobs=True, top_logprobs=3)[0]
    tok = AutoTokenizer.from_pretrained(tiny_dirs["base"])
    models = {
        k: AutoModelForCausalLM.from_pretrained(tiny_dirs[k]).eval()
        for k in ("base", "expert", "anti")
    }
    raw = tok("Rain")["input_ids"]
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Rain"}], tokenize=False, add_generation_prompt=True
    )
    chat_ids = tok(chat, add_special_tokens=False)["input_ids"]
    prompts = {"base": raw, "expert": chat_ids, "anti": raw}
    v = len(tok)
    for step, rec in enumerate(res.logprobs):
        gen = res.token_ids[:step]
        with torch.no_grad():
            lp = {
                k: log_probs(m(torch.tensor([prompts[k] + gen])).logits[:, -1], v)
                for k, m in models.items()
            }
        want = torch.log_softmax(combine_proxy(lp["base"], [(lp["expert"], lp["anti"])], [1.0]), -1)
        assert rec.token_id == res.token_ids[step] == int(want.argmax())
        assert rec.logprob == pytest.approx(float(want[0, rec.token_id]), abs=1e-5)
        assert [t[0] for t in rec.top] == torch.topk(want[0], 3).indices.tolist()


def test_per_model_prompts(tuner):
    ex = tuner.pairs[0].expert
    ids = ex.prompt.render("Rain", ex.model.tokenizer)
    assert ex.model.tokenizer.convert_ids_to_tokens(ids[0]) == "<|im_start|>"
    base_ids = tuner.base.prompt.render("Rain", tuner.tokenizer)
    assert len(ids) > len(base_ids)


def test_head_padding_rows_are_never_sampled(tiny_dirs):
    t = ProxyTuner.from_pretrained(
        str(tiny_dirs["padded"]),
        expert=str(tiny_dirs["expert"]),
        anti_expert=str(tiny_dirs["anti"]),
        device="cpu",
    )
    vocab = len(t.tokenizer)
    assert t.base.model.vocab_width == vocab + 16
    assert t.vocab_size == vocab
    # force the padding rows to dominate: they must still never come out
    head = t.base.model.model.get_output_embeddings()
    with torch.no_grad():
        saved = head.weight[vocab:].clone()
        head.weight[vocab:] = head.weight[:vocab].abs().max() * 100
    try:
        out = t.generate(PROMPTS, max_new_tokens=8, temperature=1.0, seed=0)
        assert all(i < vocab for r in out for i in r.token_ids)
    finally:
        with torch.no_grad():
            head.weight[vocab:] = saved


def test_stop_strings_finish_per_row_and_trim_text(tuner):
    free = tuner.generate(PROMPTS, max_new_tokens=12)
    # pick a stop string from the middle of row 0's text
    text = free[0].text
    assert len(text) > 4
    stop = text[2:4]
    out = tuner.generate(PROMPTS, max_new_tokens=12, stop=[stop])
    assert out[0].finish_reason == "stop" and out[0].stop_reason == stop
    assert out[0].text == text[: text.find(stop)]
    for f, o in zip(free[1:], out[1:], strict=True):  # other rows unaffected unless they hit it
        if stop not in f.text:
            assert o.token_ids == f.token_ids and o.finish_reason == "length"


def test_eos_finishes_each_row_on_its_own(tuner):
    free = tuner.generate(PROMPTS, max_new_tokens=12)
    eos = free[0].token_ids[3]
    out = tuner.generate(PROMPTS, max_new_tokens=12, eos_token_ids=[eos])
    for f, o in zip(free, out, strict=True):
        if eos in f.token_ids:
            cut = f.token_ids.index(eos) + 1
            assert o.token_ids == f.token_ids[:cut]
            assert o.finish_reason == "stop" and o.stop_reason == eos
        else:
            assert o.token_ids == f.token_ids and o.finish_reason == "length"
    single = [tuner.generate([p], max_new_tokens=12, eos_token_ids=[eos])[0] for p in PROMPTS]
    assert [r.token_ids for r in single] == [r.token_ids for r in out]


def test_stream_concatenates_to_generate_text_and_never_leaks_a_stop(tuner):
    full = tuner.generate("Rain", max_new_tokens=15)[0]
    assert "".join(tuner.stream("Rain", max_new_tokens=15)) == full.text
    stop = full.text[5:7]
    deltas = list(tuner.stream("Rain", max_new_tokens=15, stop=[stop]))
    assert "".join(deltas) == full.text[: full.text.find(stop)]


def test_result_fields(tuner):
    r = tuner.generate("Rain", max_new_tokens=5)[0]
    assert r.completion_tokens == len(r.token_ids) == 5
    assert r.finish_reason == "length"
    assert r.prompt_tokens == len(tuner.tokenizer("Rain")["input_ids"])
    assert r.logprobs is None


def test_several_pairs_and_expert_only_pairs(tiny_dirs):
    from proxytune.specs import ModelSpec

    spec = lambda k, prompt="raw": ModelSpec(str(tiny_dirs[k]), prompt=prompt, device="cpu")  # noqa: E731
    t = ProxyTuner.from_specs(
        spec("base"), [(spec("expert"), spec("anti"), 0.5), (spec("anti"), None, 0.3)]
    )
    res = t.generate(["Rain"], max_new_tokens=1, logprobs=True)[0]
    tok = t.tokenizer
    ids = torch.tensor([tok("Rain")["input_ids"]])
    lp = {}
    for k in ("base", "expert", "anti"):
        m = AutoModelForCausalLM.from_pretrained(tiny_dirs[k]).eval()
        with torch.no_grad():
            lp[k] = log_probs(m(ids).logits[:, -1], len(tok))
    want = lp["base"] + 0.5 * (lp["expert"] - lp["anti"]) + 0.3 * lp["anti"]
    want = torch.log_softmax(want, -1)
    assert res.token_ids[0] == int(want.argmax())
    assert res.logprobs[0].logprob == pytest.approx(float(want.max()), abs=1e-5)


def test_alpha_schedule_is_evaluated_per_step(tuner):
    seen = []

    def schedule(step: int) -> float:
        seen.append(step)
        return 0.0 if step < 2 else 1.0

    base = tuner.generate("Rain", alpha=0.0, max_new_tokens=6)[0].token_ids
    out = tuner.generate("Rain", alpha=schedule, max_new_tokens=6)[0].token_ids
    assert out[:2] == base[:2]
    assert seen == list(range(6))


def test_logits_processor_in_plain_generate_matches_the_tuner(tuner):
    tok = tuner.tokenizer
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    proc = tuner.logits_processor(PROMPTS)
    out = tuner.base.model.model.generate(
        **enc, logits_processor=[proc], max_new_tokens=10, do_sample=False
    )
    got = out[:, enc.input_ids.shape[1] :].tolist()
    want = [r.token_ids for r in tuner.generate(PROMPTS, max_new_tokens=10)]
    eos = tok.eos_token_id
    assert [g[: g.index(eos) + 1] if eos in g else g for g in got] == want



def test_the_cache_goes_in_under_the_name_the_forward_declares(tiny_dirs):
    """``past_key_values`` before transformers 5.24, ``cache`` from it on (the old name warns
    there); a peft wrapper's ``**kwargs`` forward defers to its base model's."""
    import transformers
    from packaging.version import Version
    from peft import LoraConfig, get_peft_model

    from proxytune.backends.hf import cache_argument
    from proxytune.backends.lora_specs import peft_quietly

    class Old:
        def forward(self, input_ids=None, past_key_values=None, **kwargs): ...

    class New:
        def forward(self, input_ids=None, cache=None, **kwargs): ...

    class AnyKwargs:
        def forward(self, **kwargs): ...

    assert cache_argument(Old()) == cache_argument(AnyKwargs()) == "past_key_values"
    assert cache_argument(New()) == "cache"
    llama = AutoModelForCausalLM.from_pretrained(tiny_dirs["base"])
    want = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
    assert cache_argument(llama) == want
    with peft_quietly():
        wrapped = get_peft_model(llama, LoraConfig(r=4, target_modules="all-linear"))
    assert cache_argument(wrapped) == want
