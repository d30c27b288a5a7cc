"""bitsandbytes 8/4-bit models (``quantize: bnb8 | bnb4``), on the CPU backend of bitsandbytes."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from proxytune import ModelSpec, ProxyTuner
from proxytune.errors import ConfigError

bnb = pytest.importorskip("bitsandbytes")

PROMPTS = ["The quick brown fox", "Rain", "def add(a, b):\n    return", "Once upon a"]


def ids(results):
    return [r.token_ids for r in results]


def quantized(bnb_dirs, method, alpha=0.5):
    def spec(name):
        return ModelSpec(str(bnb_dirs[name]), device="cpu", quantize=method)

    return ProxyTuner.from_specs(spec("base"), [(spec("expert"), spec("anti"), alpha)])


@pytest.fixture(scope="module")
def nf4(bnb_dirs):
    return quantized(bnb_dirs, "bnb4")


@pytest.mark.parametrize("method", ["bnb4", "bnb8"])
def test_layers_are_quantized_and_alpha_zero_is_the_quantized_base(bnb_dirs, method, caplog):
    t = quantized(bnb_dirs, method)
    model = t.base.model.model
    kind = {"bnb4": bnb.nn.Linear4bit, "bnb8": bnb.nn.Linear8bitLt}[method]
    assert isinstance(model.model.layers[0].mlp.up_proj, kind)
    assert type(model.get_output_embeddings()) is torch.nn.Linear  # the head stays in float
    enc = t.tokenizer(PROMPTS[0], return_tensors="pt")
    want = model.generate(**enc, max_new_tokens=8, do_sample=False)[0, enc.input_ids.shape[1] :]
    assert t.generate(PROMPTS[0], alpha=0.0, max_new_tokens=8)[0].token_ids == want.tolist()
    plain = AutoModelForCausalLM.from_pretrained(bnb_dirs["base"]).eval()
    with torch.no_grad():
        a, b = model(**enc).logits, plain(**enc).logits
    assert float((a - b).abs().max()) > 0  # really another model
    casts = [r for r in caplog.records if "inputs will be cast" in r.getMessage()]
    assert len(casts) <= 1  # bitsandbytes' per-forward warning, once per process


def test_nf4_is_weight_only_so_batches_and_speculation_stay_exact(nf4):
    want = nf4.generate(PROMPTS, max_new_tokens=12)
    assert ids(want) == [nf4.generate([p], max_new_tokens=12)[0].token_ids for p in PROMPTS]
    assert ids(nf4.generate(PROMPTS, max_new_tokens=12, speculative=3)) == ids(want)
    assert nf4.generate(PROMPTS, alpha=0.0, max_new_tokens=6) != want  # the pair steers


def test_missing_bitsandbytes_and_gguf_get_clear_errors(bnb_dirs, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        ProxyTuner.from_specs(ModelSpec(str(bnb_dirs["base"]), device="cpu", quantize="bnb4"), [])
    monkeypatch.undo()
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="GGUF"):
        ProxyTuner.from_specs(ModelSpec(str(gguf), device="cpu", quantize="bnb8"), [])
    with pytest.raises(ConfigError, match="quantize must be one of"):
        ModelSpec("x", quantize="bnb2")


def test_a_lora_expert_over_4bit_weights_one_pass_or_not(bnb_dirs, tmp_path):
    """QLoRA-style: the adapter stays unmerged over the 4-bit layers, whether the pair shares
    one model (one pass) or the expert is loaded on its own; both give the same tokens."""
    from proxytune.testing import save_tiny_lora

    save_tiny_lora(bnb_dirs["anti"], tmp_path / "adapter", seed=3)

    def spec(name, **kw):
        return ModelSpec(str(bnb_dirs[name]), device="cpu", quantize="bnb4", **kw)

    got = {}
    for one_pass in ("1", "0"):
        expert = spec("anti", adapter=str(tmp_path / "adapter"))
        options = {"one_pass": one_pass == "1"}
        t = ProxyTuner.from_specs(spec("base"), [(expert, spec("anti"), 1.0)], options=options)
        if one_pass == "0":  # the expert alone: PEFT layers around 4-bit ones
            modules = list(t.pairs[0].expert.model.model.modules())
            assert any(isinstance(m, bnb.nn.Linear4bit) for m in modules)
            assert any(type(m).__name__ == "Linear4bit" and hasattr(m, "lora_A") for m in modules)
        got[one_pass] = ids(t.generate(PROMPTS, max_new_tokens=10))
        assert ids(t.generate(PROMPTS, max_new_tokens=10, speculative=2)) == got[one_pass]
    assert got["1"] == got["0"]
    assert got["1"] != ids(t.alone("base").generate(PROMPTS, max_new_tokens=10))


def repack_failures(model) -> list[str]:
    """The 4-bit layers bitsandbytes' AVX-512 CPU repacking fails on (run directly: the
    kernel that uses it needs such a CPU, but the repacking itself is plain torch)."""
    import copy

    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    failed = []
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            try:
                state = copy.deepcopy(m.weight.quant_state)
                _convert_weight_packed_for_cpu(m.weight.data.clone(), state)
            except (AssertionError, RuntimeError):
                failed.append(name)
    return failed


def test_shapes_bitsandbytes_cannot_repack_on_avx512_cpus_are_refused_before_loading(
    bnb_dirs, tiny_dirs, monkeypatch
):
    """Issue 16, item 12: on a CPU with AVX-512 BF16, bitsandbytes repacks 4-bit weights at the
    first forward and failed there on the tiny models ("shape '[32, 0]' is invalid"). The test
    models now fill its blocks; a model that does not is refused when it loads. The CPU is
    simulated: bitsandbytes' feature check answers yes."""
    from proxytune.backends.quantize import repacks_4bit_on_cpu

    assert repack_failures(quantized(bnb_dirs, "bnb4").base.model.model) == []
    small = ModelSpec(str(tiny_dirs["base"]), device="cpu", quantize="bnb4")
    if not repacks_4bit_on_cpu():  # here it loads (and runs); on AVX-512 it would fail
        assert repack_failures(ProxyTuner.from_specs(small, []).base.model.model)
    monkeypatch.setattr(bnb.functional, "has_avx512bf16", lambda: True)
    with pytest.raises(ConfigError, match=r"bnb4' on this CPU .* e\.g\. model\.layers\.0\."):
        ProxyTuner.from_specs(small, [])
    ProxyTuner.from_specs(ModelSpec(str(bnb_dirs["base"]), device="cpu", quantize="bnb4"), [])
