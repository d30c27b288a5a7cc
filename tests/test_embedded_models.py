"""The real embedded default (Qwen2.5-Coder 1.5B base, 0.5B pair). Marked slow.

They need `proxytune setup`; without it they skip, unless PROXYTUNE_REQUIRE_SLOW=1 (CI),
where a missing model is a failure.
"""

from __future__ import annotations

import os

import pytest

from proxytune.embedded import EMBEDDED_MODELS, embedded_model_dir, is_ready

pytestmark = pytest.mark.slow
REQUIRE_SLOW = os.environ.get("PROXYTUNE_REQUIRE_SLOW") == "1"

BIG, SMALL = "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"
PROMPTS = ["def is_prime(n):", "# Reverse a string in Python\n"]


def require_models() -> None:
    missing = [n for n in EMBEDDED_MODELS if not is_ready(n)]
    if missing:
        if REQUIRE_SLOW:
            pytest.fail(f"embedded models {missing} are not set up; run `proxytune setup`")
        pytest.skip(f"embedded models {missing} not set up (run `proxytune setup`)")


@pytest.fixture(scope="module")
def default_tuner():
    """The default recipe on transformers (the float32 conversion), whatever else is here."""
    require_models()
    from proxytune import ProxyTuner
    from proxytune.recipe import default_recipe_path, load_recipe

    return ProxyTuner.from_recipe(load_recipe(default_recipe_path(), backend="transformers"))


def test_the_default_runs_on_llamacpp_where_it_is_installed():
    """``backend: auto``: the kept GGUFs on llama.cpp, the roles of one GGUF on one model."""
    require_models()
    from proxytune import ProxyTuner
    from proxytune.backends.llamacpp import available
    from proxytune.embedded import embedded_gguf
    from proxytune.recipe import default_recipe_path

    if not available() or not all(embedded_gguf(n).is_file() for n in (BIG, SMALL)):
        if REQUIRE_SLOW:
            pytest.fail("llama-cpp-python or the kept GGUFs are missing: scripts/install.sh, setup")
        pytest.skip("llama-cpp-python or the kept GGUFs (proxytune setup) are missing")
    tuner = ProxyTuner.from_recipe(default_recipe_path())
    assert type(tuner.base.model).__name__ == "LlamaCppModel"
    pair = tuner.pairs[0]
    assert pair.expert.model is pair.anti_expert.model
    prompt = "Write a haiku about the sea."
    base = tuner.generate(prompt, alpha=0.0, max_new_tokens=10)[0]
    assert base.token_ids == tuner.alone("base").generate(prompt, max_new_tokens=10)[0].token_ids
    steered = tuner.generate(prompt, max_new_tokens=10)[0]
    assert steered.text.strip() and steered.token_ids != base.token_ids
    sequential = tuner.generate(prompt, max_new_tokens=10, overlap=False)[0]
    assert sequential.token_ids == steered.token_ids


def test_default_roles_share_the_small_model(default_tuner):
    pair = default_tuner.pairs[0]
    assert pair.expert.model is pair.anti_expert.model  # 0.5B loaded once
    assert pair.expert.prompt.kind == "chat"
    assert pair.anti_expert.prompt == default_tuner.base.prompt
    assert default_tuner.vocab_size == len(default_tuner.tokenizer)
    assert 151645 in default_tuner.eos_token_ids  # <|im_end|>


def test_alpha_zero_equals_the_base_models_own_generate(default_tuner):
    from transformers import AutoModelForCausalLM

    model = default_tuner.base.model.model
    assert isinstance(model, AutoModelForCausalLM._model_mapping[type(model.config)])
    tok = default_tuner.tokenizer
    tok.padding_side = "left"
    texts = [default_tuner.base.prompt.template.format(prompt=p) for p in PROMPTS]
    enc = tok(texts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    want = out[:, enc.input_ids.shape[1] :].tolist()
    got = default_tuner.generate(PROMPTS, alpha=0.0, max_new_tokens=6)
    eos = set(default_tuner.eos_token_ids)
    for g, w in zip(got, want, strict=True):
        cut = next((i + 1 for i, t in enumerate(w) if t in eos), len(w))
        assert g.token_ids == w[:cut]


def test_proxy_tuned_generation_runs_and_differs_from_base(default_tuner):
    prompt = "Write a haiku about the sea."
    base = default_tuner.generate(prompt, alpha=0.0, max_new_tokens=12)[0]
    steered = default_tuner.generate(prompt, max_new_tokens=12, logprobs=True)[0]
    assert steered.completion_tokens > 0 and steered.text.strip()
    assert all(lp.logprob <= 0 for lp in steered.logprobs)
    assert steered.token_ids != base.token_ids


def test_the_default_overlaps_its_forwards_and_changes_nothing(default_tuner):
    assert default_tuner.overlap is True  # the recipe says so
    prompts = ["def is_prime(n):", "Write a haiku about the sea."]
    overlapped = default_tuner.generate(prompts, max_new_tokens=8, logprobs=True)
    sequential = default_tuner.generate(prompts, max_new_tokens=8, logprobs=True, overlap=False)
    assert [r.token_ids for r in overlapped] == [r.token_ids for r in sequential]
    for a, b in zip(overlapped, sequential, strict=True):
        assert [lp.logprob for lp in a.logprobs] == [lp.logprob for lp in b.logprobs]


def test_converted_checkpoints_are_safetensors():
    require_models()
    for name in (BIG, SMALL):
        path = embedded_model_dir(name)
        assert list(path.glob("*.safetensors")) and not list(path.glob("*.bin"))
