"""The llama.cpp backend on tiny GGUF models the test writes itself: it agrees with transformers."""

from __future__ import annotations

import sys

import pytest

from proxytune import ProxyTuner
from proxytune.backends import llamacpp
from proxytune.backends.gguf_write import write_gguf
from proxytune.engine.continuous import ContinuousBatch
from proxytune.engine.speculative import SpeculativeStats
from proxytune.errors import ConfigError, VocabularyMismatchError
from proxytune.extras import MissingExtraError
from proxytune.specs import ModelSpec
from proxytune.testing import build_model, build_tokenizer

PROMPTS = ["The quick brown fox", "Numbers: 0 1 2", "def add(a, b):\n    return", "Rain"]
needs_llama = pytest.mark.skipif(
    not llamacpp.available(), reason=f"llama-cpp-python is not installed ({llamacpp.INSTALL})"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Three tiny models (base, expert, anti-expert) as safetensors directories, each with a
    ``model.gguf`` of the same float32 weights."""
    root = tmp_path_factory.mktemp("gguf")
    tok = build_tokenizer()
    dirs = {}
    for name, seed in (("base", 0), ("expert", 1), ("anti", 2)):
        model = build_model(tok, seed=seed)
        folder = root / name
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        write_gguf(model, tok, folder / "model.gguf")
        dirs[name] = folder
    return dirs


def tuner(dirs, backend: str, **kw) -> ProxyTuner:
    gguf = backend == "llamacpp"

    def spec(name: str, prompt: str = "raw") -> ModelSpec:
        path = dirs[name] / "model.gguf" if gguf else dirs[name]
        threads = 2 if gguf else None
        return ModelSpec(str(path), prompt=prompt, device="cpu", backend=backend, threads=threads)

    return ProxyTuner.from_specs(spec("base"), [(spec("expert", "chat"), spec("anti"), 1.0)], **kw)


@pytest.fixture(scope="module")
def both(tiny):
    if not llamacpp.available():
        pytest.skip(f"llama-cpp-python is not installed ({llamacpp.INSTALL})")
    return tuner(tiny, "transformers"), tuner(tiny, "llamacpp")


def ids(results):
    return [r.token_ids for r in results]


def test_llamacpp_gives_the_transformers_tokens_and_logprobs(both):
    hf, cpp = both
    assert type(cpp.base.model).__name__ == "LlamaCppModel"
    settings = {"max_new_tokens": 16, "logprobs": True, "top_logprobs": 3}
    want, got = hf.generate(PROMPTS, **settings), cpp.generate(PROMPTS, **settings)
    assert ids(got) == ids(want)
    for g, w in zip(got, want, strict=True):
        assert [x.logprob for x in g.logprobs] == pytest.approx(
            [x.logprob for x in w.logprobs], abs=1e-3
        )
    base = {"max_new_tokens": 12}
    assert ids(cpp.alone("base").generate(PROMPTS, **base)) == ids(
        hf.alone("base").generate(PROMPTS, **base)
    )


def test_roles_of_one_gguf_share_one_model_and_context(tiny):
    if not llamacpp.available():
        pytest.skip(f"llama-cpp-python is not installed ({llamacpp.INSTALL})")
    path = str(tiny["anti"] / "model.gguf")
    expert, anti = ModelSpec(path, prompt="chat"), ModelSpec(path)
    shared = ProxyTuner.from_specs(ModelSpec(str(tiny["base"] / "model.gguf")), [(expert, anti, 1)])
    assert shared.pairs[0].expert.model is shared.pairs[0].anti_expert.model
    hf = ProxyTuner.from_specs(
        ModelSpec(str(tiny["base"]), backend="transformers"),
        [(ModelSpec(str(tiny["anti"]), prompt="chat"), ModelSpec(str(tiny["anti"])), 1)],
    )
    assert ids(shared.generate(PROMPTS, max_new_tokens=12)) == ids(
        hf.generate(PROMPTS, max_new_tokens=12)
    )


def test_batched_alone_cached_and_recomputed_agree(both):
    _, cpp = both
    batched = cpp.generate(PROMPTS, max_new_tokens=12)
    assert ids(batched) == [ids(cpp.generate(p, max_new_tokens=12))[0] for p in PROMPTS]
    assert ids(cpp.generate(PROMPTS, max_new_tokens=12, use_cache=False)) == ids(batched)
    sampled = {"max_new_tokens": 10, "temperature": 0.9, "seed": 3, "n": 2}
    assert ids(cpp.generate(PROMPTS[:2], **sampled)) == [
        r for p in PROMPTS[:2] for r in ids(cpp.generate(p, **sampled))
    ]


@needs_llama
def test_a_prompt_prefilled_before_is_restored_and_decodes_the_same(tiny):
    plain = tuner(tiny, "llamacpp")
    cached = tuner(tiny, "llamacpp", options={"prefix_cache": True, "prefix_min_tokens": 6})
    sizes = [len(cached.base.prompt.render(p, cached.tokenizer)) for p in PROMPTS]
    assert min(sizes) < 6 <= sorted(sizes)[1]
    settings = {"max_new_tokens": 12, "logprobs": True}
    want = plain.generate(PROMPTS, **settings)
    first = cached.generate(PROMPTS, **settings)
    cache = cached.base.model.prompts
    assert cache is not None and cache.restored_tokens == 0
    assert len(cache.entries) == len(PROMPTS) - 1  # the shortest is prefilled every time
    again = cached.generate(PROMPTS, **settings)
    assert cache.restored_tokens > 0
    assert ids(first) == ids(again) == ids(want)
    # restored cells sit elsewhere in the KV cache: float rounding, as in another batch
    for a, w in zip(again, want, strict=True):
        got, expected = [x.logprob for x in a.logprobs], [x.logprob for x in w.logprobs]
        assert got == pytest.approx(expected, abs=1e-5)
    mixed = [PROMPTS[1], "A prompt not seen before", PROMPTS[0]]  # restored and new rows
    assert ids(cached.generate(mixed, alpha=2.0, max_new_tokens=10)) == ids(
        plain.generate(mixed, alpha=2.0, max_new_tokens=10)
    )
    context = cached.base.model.context
    assert len(context.free) == llamacpp.MAX_SEQUENCES  # restored rows are given back too
    assert plain.base.model.prompts is None


@needs_llama
def test_a_shared_preamble_is_prefilled_once_and_decodes_the_same(tiny):
    """A few-shot prompt's examples, the same in every row, are prefilled in one row and their
    cells shared with the others (float rounding only, as another batch composition)."""
    plain = tuner(tiny, "llamacpp")
    cached = tuner(tiny, "llamacpp", options={"prefix_cache": True, "prefix_min_tokens": 6})
    preamble = "Q: one plus one\nA: two\nQ: two plus two\nA: four\n"
    prompts = [preamble + p for p in PROMPTS]
    settings = {"max_new_tokens": 10, "logprobs": True}
    want = plain.generate(prompts, **settings)
    got = cached.generate(prompts, **settings)
    cache = cached.base.model.prompts
    assert cache is not None and cache.restored_tokens == 0
    assert cache.shared_tokens >= 6 * (len(prompts) - 1)
    assert ids(got) == ids(want)
    for a, w in zip(got, want, strict=True):
        got_lp, want_lp = [x.logprob for x in a.logprobs], [x.logprob for x in w.logprobs]
        assert got_lp == pytest.approx(want_lp, abs=1e-5)
    again = cached.generate(prompts[::-1], **settings)  # restored: saved with shared cells
    assert cache.restored_tokens > 0 and ids(again) == ids(want[::-1])
    assert len(cached.base.model.context.free) == llamacpp.MAX_SEQUENCES


def test_speculative_equals_plain_and_rollback_equals_recompute(both):
    _, cpp = both
    want = ids(cpp.generate(PROMPTS, max_new_tokens=14))
    for k in (1, 3, "auto"):
        stats = SpeculativeStats()
        assert ids(cpp.generate(PROMPTS, max_new_tokens=14, speculative=k, stats=stats)) == want
        assert stats.proposed > 0 or k == "auto"
    sampled = {"max_new_tokens": 8, "temperature": 0.8, "seed": 5}
    assert ids(cpp.generate(PROMPTS, speculative=3, **sampled)) == [
        ids(cpp.generate(p, speculative=3, **sampled))[0] for p in PROMPTS
    ]


def test_the_server_batch_runs_on_llamacpp(both):
    hf, cpp = both
    batch = ContinuousBatch(cpp)
    config = cpp.config(max_new_tokens=10)
    jobs = [batch.prepare([p], config) for p in PROMPTS[:3]]
    got: dict[int, list[int]] = {}
    pending = [[jobs[0]], [], [jobs[1], jobs[2]]]  # rows join a running batch
    for step in range(40):
        for job, update in batch.step(pending[step] if step < len(pending) else []):
            got.setdefault(id(job), []).append(update.token_id)
        if step >= len(pending) and not batch.live_rows:
            break
    assert [got[id(j)] for j in jobs] == ids(hf.generate(PROMPTS[:3], max_new_tokens=10))


def test_sequences_are_given_back(both):
    _, cpp = both
    context = cpp.base.model.context
    free = len(context.free)
    for _ in range(3):
        cpp.generate(PROMPTS, max_new_tokens=4)
        stream = cpp.steps(PROMPTS, max_new_tokens=50)
        next(stream)
        stream.close()  # an abandoned generation frees its rows too
    import gc

    gc.collect()
    assert len(context.free) == free


@needs_llama
def test_clear_errors(tiny, tmp_path):
    other = build_tokenizer(300, corpus=["zebra quartz jumps vexingly " * 8, "xylophone wiz"] * 4)
    odd_model = build_model(other, seed=4)
    odd_model.save_pretrained(tmp_path)
    other.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"needs a \.gguf file or a directory with model"):
        ProxyTuner.from_specs(ModelSpec(str(tmp_path), device="cpu", backend="llamacpp"))
    write_gguf(odd_model, other, tmp_path / "other.gguf")
    errors = []
    for backend, base, odd in (
        ("transformers", tiny["base"], tmp_path),
        ("llamacpp", tiny["base"] / "model.gguf", tmp_path / "other.gguf"),
    ):
        specs = [ModelSpec(str(p), device="cpu", backend=backend) for p in (base, odd)]
        with pytest.raises(VocabularyMismatchError) as err:
            ProxyTuner.from_specs(specs[0], [(specs[1], None, 1.0)])
        errors.append(str(err.value).replace("/model.gguf", "").replace("/other.gguf", ""))
    assert errors[0] == errors[1]  # the same clear error on both backends (but the file names)
    with pytest.raises(ConfigError, match=r"applies to the llama\.cpp backend"):
        ProxyTuner.from_specs(ModelSpec(str(tmp_path), device="cpu", threads=2))


def test_a_missing_llama_cpp_names_the_install_command(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    assert not llamacpp.available()
    spec = ModelSpec(str(tiny["base"] / "model.gguf"), device="cpu", backend="llamacpp")
    with pytest.raises(MissingExtraError, match=r"pip install 'proxytune\[llamacpp\]'"):
        ProxyTuner.from_specs(spec)
    auto = ProxyTuner.from_specs(ModelSpec(str(tiny["base"] / "model.gguf"), device="cpu"))
    assert type(auto.base.model).__name__ == "HFModel"  # auto falls back to transformers


def test_a_lora_expert_steers_the_same_on_both_backends(both, tiny, tmp_path, capsys):
    """A trained adapter runs on llama.cpp as a llama.cpp LoRA adapter over its base's GGUF
    (sharing the anti-expert's weights), or merged into its base by ``proxytune export``;
    either way it steers the base as the adapter does on transformers."""
    from proxytune.backends.load import backend_of
    from proxytune.cli import main
    from proxytune.testing import save_tiny_lora

    adapter = save_tiny_lora(tiny["anti"], tmp_path / "adapter", seed=3)
    assert main(["export", str(adapter), str(tmp_path / "expert")]) == 0
    assert "model.gguf" in capsys.readouterr().out
    assert main(["export", str(adapter), str(tmp_path / "expert")]) == 2  # never overwrites

    def pair_tuner(backend: str, expert: str, base: str, anti: str, **kw) -> ProxyTuner:
        def spec(path: str, **more) -> ModelSpec:
            return ModelSpec(path, device="cpu", backend=backend, prompt="raw", **more)

        return ProxyTuner.from_specs(
            spec(base), [(spec(expert, **kw), spec(anti), 1.5)], options={"one_pass": False}
        )

    hf = pair_tuner(
        "transformers", str(tiny["anti"]), str(tiny["base"]), str(tiny["anti"]),
        adapter=str(adapter),
    )  # fmt: skip
    merged = pair_tuner(
        "llamacpp",
        str(tmp_path / "expert" / "model.gguf"),
        str(tiny["base"] / "model.gguf"),
        str(tiny["anti"] / "model.gguf"),
    )
    # the adapter directory alone; its base directory holds a model.gguf: auto picks llama.cpp
    as_adapter = pair_tuner("auto", str(adapter), str(tiny["base"]), str(tiny["anti"]))
    expert_model, anti_model = (m.model for m in as_adapter.pairs[0].members)
    assert isinstance(expert_model, llamacpp.LlamaCppModel)
    assert expert_model.context.weights is anti_model.context.weights  # loaded once
    assert backend_of(ModelSpec(str(tiny["anti"]), adapter=str(adapter))) == "llamacpp"
    settings = {"max_new_tokens": 12, "logprobs": True}
    want = hf.generate(PROMPTS, **settings)
    assert ids(want) != ids(hf.alone("base").generate(PROMPTS, max_new_tokens=12))
    for cpp in (merged, as_adapter):
        got = cpp.generate(PROMPTS, **settings)
        assert ids(got) == ids(want)
        for g, w in zip(got, want, strict=True):
            assert [x.logprob for x in g.logprobs] == pytest.approx(
                [x.logprob for x in w.logprobs], abs=1e-3
            )


def test_adapters_llamacpp_cannot_apply_name_the_way_round(tiny, tmp_path):
    """DoRA, biases or adapted embeddings stay on transformers under ``auto`` and get a
    one-line error under ``backend: llamacpp``."""
    import json

    from proxytune.backends.gguf_lora import lora_gguf
    from proxytune.backends.load import backend_of
    from proxytune.testing import save_tiny_lora

    adapter = save_tiny_lora(tiny["anti"], tmp_path / "dora", seed=4)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    assert backend_of(ModelSpec(str(tiny["anti"]), adapter=str(adapter))) == "transformers"
    with pytest.raises(ConfigError, match=r"DoRA.*backend: transformers"):
        lora_gguf(adapter, "qwen2", 4, 2, cache=tmp_path)
    with pytest.raises(ConfigError, match="not a readable LoRA adapter"):
        lora_gguf(tmp_path / "nowhere", "qwen2", 4, 2, cache=tmp_path)


def test_the_speed_benchmark_runs_the_llamacpp_systems(both, tiny, tmp_path):
    import json
    import os
    import subprocess
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_speed.py"
    recipe = tmp_path / "tiny-gguf.yaml"
    recipe.write_text(
        f"""
base: {{model: "{tiny["base"] / "model.gguf"}", prompt: raw}}
pairs:
  - expert: {{model: "{tiny["anti"] / "model.gguf"}", prompt: chat}}
    anti_expert: {{model: "{tiny["anti"] / "model.gguf"}", prompt: raw}}
model_defaults: {{device: cpu}}
"""
    )
    out = tmp_path / "speed.json"
    systems = ["base-cpp", "naive-cpp", "overlap-cpp", "speculative-cpp"]
    systems += ["rerank-cpp", "rerank+candidates-cpp"]
    cmd = [sys.executable, str(bench), "--recipe", str(recipe), "--batch-sizes", "2"]
    cmd += ["--max-new-tokens", "6", "--threads", "1", "--systems", *systems, "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x llama.cpp's base alone" in done.stdout
    results = {r["system"]: r for r in json.loads(out.read_text())["results"]}
    assert all(r["tokens"] == 2 * 6 for r in results.values())
    for exact in ("overlap-cpp", "speculative-cpp"):
        assert results[exact]["ids"] == results["naive-cpp"]["ids"]
    assert results["rerank+candidates-cpp"]["ids"] == results["rerank-cpp"]["ids"]
    # the engine's own time per step: one figure per step after the first, none negative
    overheads = results["naive-cpp"]["overhead_ms"]
    assert len(overheads) == 6 - 1 and min(overheads) >= 0
    assert "overhead ms/step" in done.stdout


def test_the_step_cost_benchmark_times_each_file_and_row_count(both, tiny):
    import subprocess
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_gguf_step.py"
    files = [str(tiny[name] / "model.gguf") for name in ("base", "expert")]
    cmd = [sys.executable, str(bench), *files, "--rows", "1", "2", "--positions", "3"]
    cmd += ["--steps", "2", "--threads", "1", "2", "--together", "1", "2", "--rounds", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    per_file, together = done.stdout.split("\n\n")
    rows = [line.split("|")[1:-1] for line in per_file.splitlines() if line.startswith("| ")]
    assert [(r[0].strip(), r[1].strip()) for r in rows[1:]] == [
        ("base", "1"),
        ("base", "2"),
        ("expert", "1"),
        ("expert", "2"),
    ]
    assert len(rows[0]) == 5 and "verify 3" in rows[0][4]
    assert all(float(cell) > 0 for r in rows[1:] for cell in r[1:])
    rows = [line.split("|")[1:-1] for line in together.splitlines() if line.startswith("| ")]
    assert rows[0][0].strip() == "base (1) + expert (2)"
    assert [(r[0].strip(), r[1].strip()) for r in rows[1:]] == [
        ("one after the other", "1"),
        ("at once", "1"),
        ("one after the other", "2"),
        ("at once", "2"),
    ]
    assert all(float(r[2]) > 0 for r in rows[1:])


def test_evaluation_scores_the_same_on_llamacpp(both):
    """``eval``'s continuation scoring (windows of several positions per forward)."""
    from proxytune.evaluation.scoring import score

    hf, cpp = both
    conts = [" jumps over the lazy dog.", " 3 4 5", " a + b", " falls on the town"]
    want = score(hf, PROMPTS, conts, detail=True)
    got = score(cpp, PROMPTS, conts, detail=True)
    assert [g.logprob for g in got] == pytest.approx([w.logprob for w in want], abs=1e-3)
    assert [g.greedy for g in got] == [w.greedy for w in want]


def test_cli_backend_and_threads(both, tiny, capsys):
    import json

    from proxytune.cli import main

    _, cpp = both
    files = [str(tiny[n] / "model.gguf") for n in ("base", "expert", "anti")]
    args = ["generate", "--base", files[0], "--expert", files[1], "--anti-expert", files[2]]
    args += ["--expert-prompt", "chat", "--base-prompt", "raw", "--anti-expert-prompt", "raw"]
    args += ["--backend", "llamacpp", "--threads", "1", "--max-new-tokens", "6", "--json"]
    assert main([*args, PROMPTS[0]]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["token_ids"] == cpp.generate(PROMPTS[0], max_new_tokens=6)[0].token_ids
    bad = ["generate", "--base", str(tiny["base"]), "--backend", "transformers"]
    assert main([*bad, "--threads", "1", "x"]) == 2  # threads on transformers: names the fix
    assert "applies to the llama.cpp backend" in capsys.readouterr().err
    auto = [a if a != "1" else "auto" for a in args]  # --threads auto: the cores
    assert main([*auto, "--overlap", PROMPTS[0]]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == row["token_ids"]
    assert main([*(a if a != "1" else "x" for a in args), PROMPTS[0]]) == 2
    assert "threads must be an integer >= 1 or 'auto', got 'x'" in capsys.readouterr().err
    assert main([*args, "--gpu-layers", "0", PROMPTS[0]]) == 0  # 0: the CPU, as by default
    assert json.loads(capsys.readouterr().out)["token_ids"] == row["token_ids"]
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():  # a CPU-only build refuses GPU layers
        assert main([*args, "--gpu-layers", "2", PROMPTS[0]]) == 2
        err = capsys.readouterr().err
        assert "gpu_layers=2 needs llama.cpp built for a GPU" in err


def test_kv_cells_bound_rows_and_a_full_cache_names_the_option(both, tiny):
    path = str(tiny["base"] / "model.gguf")
    small = ProxyTuner.from_specs(ModelSpec(path, backend="llamacpp", kv_cells=64))
    assert small.base.model.context_length == 64
    _, cpp = both
    want = ids(cpp.alone("base").generate(PROMPTS[:1], max_new_tokens=6))
    assert ids(small.generate(PROMPTS[:1], max_new_tokens=6)) == want
    with pytest.raises(llamacpp.LlamaCppError, match="raise the model's kv_cells option"):
        small.generate(PROMPTS * 4, max_new_tokens=40, ignore_eos=True)  # 16 rows x ~45 ids
    with pytest.raises(ConfigError, match="kv_cells must be an integer >= 16"):
        ModelSpec(path, kv_cells=3)


def test_a_group_partner_fed_other_tokens_gets_its_own_logits(both, tiny):
    """Lockstep grouping is only a shortcut: a partner asking for other tokens (or keeping
    other rows) after a shared decode gets exactly what it would get alone."""
    import torch

    from proxytune.backends.llamacpp import load_llamacpp

    model = load_llamacpp(ModelSpec(str(tiny["anti"] / "model.gguf")))
    prompts = [[5, 6, 7], [8, 9]]
    a, _ = model.start(prompts)
    b, _ = model.start(prompts)  # started together: one group
    assert a.group is not None and a.group is b.group
    a.advance(torch.tensor([[10], [11]]))  # decodes b's rows with the same tokens too
    got = b.advance(torch.tensor([[12], [13]]))  # other tokens: the shared work is undone
    alone, _ = model.start_alone(prompts)
    want = alone.advance(torch.tensor([[12], [13]]))
    assert torch.allclose(got, want, atol=1e-5)
    a.advance(torch.tensor([[14], [15]]))
    b.keep(torch.tensor([1]))  # keeps one row before taking the shared step: rolled back
    got = b.advance(torch.tensor([[15]]))
    alone.keep(torch.tensor([1]))
    assert torch.allclose(got, alone.advance(torch.tensor([[15]])), atol=1e-5)


def test_gpu_layers_default_to_every_layer_only_where_llamacpp_can_offload():
    from proxytune.backends.llamacpp import ALL_LAYERS, gpu_layers_for

    assert gpu_layers_for(None, offload=False) == 0
    assert gpu_layers_for(None, offload=True) == ALL_LAYERS
    assert gpu_layers_for(0, offload=False) == 0 and gpu_layers_for(7, offload=True) == 7
    with pytest.raises(
        ConfigError,
        match=r"gpu_layers=3 needs llama.cpp built for a GPU.*"
        r"GGML_CUDA=on.*or set gpu_layers: 0",
    ):
        gpu_layers_for(3, offload=False)


def test_gpu_layers_option_is_checked_and_refused_off_llamacpp():
    from proxytune.backends.load import load_model
    from proxytune.specs import ModelSpec

    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="gpu_layers must be an integer >= 0"):
            ModelSpec(path="m", gpu_layers=bad)
    assert ModelSpec(path="m", gpu_layers=2).load_key != ModelSpec(path="m").load_key
    with pytest.raises(ConfigError, match="gpu_layers applies to the llama\\.cpp backend"):
        load_model(ModelSpec(path="m", backend="transformers", gpu_layers=2))


def test_threads_auto_and_explicit_values_are_checked():
    assert ModelSpec("m", threads="auto").threads is None
    assert ModelSpec("m", threads="auto").load_key == ModelSpec("m").load_key
    assert ModelSpec("m", threads="3").threads == 3  # digits from the command line
    for bad in (0, -1, 1.5, True, "x", "0"):
        with pytest.raises(ConfigError, match="threads must be an integer >= 1 or 'auto'"):
            ModelSpec("m", threads=bad)


@needs_llama
def test_overlapped_contexts_split_the_cores_and_explicit_threads_win(tiny, monkeypatch):
    """The embedded default's shape (a base, one GGUF in both pair roles): while the pair
    decodes beside the base their threads add up to the cores; alone, each has them all."""
    import proxytune.engine.overlap

    monkeypatch.setattr(llamacpp, "available_cores", lambda: 5)
    monkeypatch.setattr(proxytune.engine.overlap, "available_cores", lambda: 5)
    seen: list[tuple[int, int]] = []
    decode = llamacpp._Context.decode

    def recording(self, entries, hidden=False):
        seen.append((id(self), int(self.lc.llama_n_threads(self.ctx))))
        return decode(self, entries, hidden)

    monkeypatch.setattr(llamacpp._Context, "decode", recording)

    def load(base_threads=None):
        pair = str(tiny["anti"] / "model.gguf")
        return ProxyTuner.from_specs(
            ModelSpec(str(tiny["base"] / "model.gguf"), threads=base_threads),
            [(ModelSpec(pair, prompt="chat"), ModelSpec(pair), 1.0)],
        )

    t = load()
    base, pair = t.base.model, t.pairs[0].expert.model
    assert base.threads == pair.threads == 5 and base.shares_cores and pair.shares_cores
    want = ids(t.generate(PROMPTS, max_new_tokens=10))
    assert {n for _, n in seen} == {5}
    seen.clear()
    assert ids(t.generate(PROMPTS, max_new_tokens=10, overlap=True)) == want
    # equal weights, the pair two calls a step: 5 cores as 2 + 3 (split_threads)
    assert set(seen) == {(id(base.context), 2), (id(pair.context), 3)}
    assert base.decode_threads == pair.decode_threads == 5  # given back
    fixed = load(base_threads=1)
    base, pair = fixed.base.model, fixed.pairs[0].expert.model
    assert not base.shares_cores and base.threads == 1
    seen.clear()
    assert ids(fixed.generate(PROMPTS, max_new_tokens=10, overlap=True)) == want
    assert set(seen) == {(id(base.context), 1), (id(pair.context), 4)}  # 5 less the base's 1
    assert base.decode_threads == 1 and pair.decode_threads == 5


@needs_llama
def test_candidate_scoring_under_overlap_keeps_the_thread_split(tiny, monkeypatch):
    """The pair's context is made anew with its eval callback inside the overlapped prefill:
    it decodes with its share of the cores from that first decode on, and gets its own count
    back after; the tokens are those of full logits."""
    import proxytune.engine.overlap

    monkeypatch.setattr(llamacpp, "available_cores", lambda: 5)
    monkeypatch.setattr(proxytune.engine.overlap, "available_cores", lambda: 5)
    seen: list[tuple[int, int, bool]] = []
    decode = llamacpp._Context.decode

    def recording(self, entries, hidden=False):
        seen.append((id(self), int(self.lc.llama_n_threads(self.ctx)), hidden))
        return decode(self, entries, hidden)

    monkeypatch.setattr(llamacpp._Context, "decode", recording)
    pair = str(tiny["anti"] / "model.gguf")
    t = ProxyTuner.from_specs(
        ModelSpec(str(tiny["base"] / "model.gguf")),
        [(ModelSpec(pair, prompt="chat"), ModelSpec(pair), 1.0)],
    )
    base, model = t.base.model, t.pairs[0].expert.model
    rule = {"name": "rerank", "k": 3}
    got = ids(t.generate(PROMPTS, max_new_tokens=8, rule=rule, overlap=True))
    assert model.context.tap is not None
    assert {(c, n) for c, n, _ in seen} == {(id(base.context), 2), (id(model.context), 3)}
    assert all(h for c, _, h in seen if c == id(model.context))  # hidden from the prefill on
    assert base.decode_threads == model.decode_threads == 5
    full = t.with_options(candidates=False)
    assert ids(full.generate(PROMPTS, max_new_tokens=8, rule=rule, overlap=True)) == got


@needs_llama
def test_rerank_scores_the_pair_at_its_candidates_only_and_chooses_the_same(tiny, monkeypatch):
    """Candidate scoring: the pair's decodes stop at the final norm and only the candidates'
    rows of the output matrix are applied; rerank and plausible choose the tokens (and report
    the log-probs) of full logits, greedy and sampled; the plain formula never uses it."""
    cpp = tuner(tiny, "llamacpp")
    model = cpp.pairs[0].expert.model
    assert model.scores_candidates and model.output_head.type == "F32"
    assert not cpp.base.model.context.tap  # the base never gets the eval callback
    scored: list[int] = []
    real = llamacpp.LlamaCppModel.candidate_logits

    def counted(self, hidden, ids):
        scored.append(len(ids))
        return real(self, hidden, ids)

    monkeypatch.setattr(llamacpp.LlamaCppModel, "candidate_logits", counted)
    full = cpp.with_options(candidates=False)
    settings = {"max_new_tokens": 12, "logprobs": True, "top_logprobs": 3}
    sampled = {"max_new_tokens": 10, "temperature": 0.9, "seed": 3}
    for rule in ({"name": "rerank", "k": 3}, "rerank", {"name": "plausible", "tau": 0.05}):
        scored.clear()
        got = cpp.generate(PROMPTS, rule=rule, **settings)
        assert scored and max(scored) < model.vocab_width  # per step: the rows' candidates
        calls = len(scored)
        want = full.generate(PROMPTS, rule=rule, **settings)
        assert len(scored) == calls  # candidates=False: full logits
        assert ids(got) == ids(want)
        for g, w in zip(got, want, strict=True):
            assert [x.logprob for x in g.logprobs] == pytest.approx(
                [x.logprob for x in w.logprobs], abs=1e-4
            )
        assert ids(cpp.generate(PROMPTS, rule=rule, **sampled)) == ids(
            full.generate(PROMPTS, rule=rule, **sampled)
        )
    scored.clear()
    cpp.generate(PROMPTS, max_new_tokens=6)
    cpp.generate(PROMPTS, max_new_tokens=6, rule={"name": "rerank", "inner": "union"})
    assert not scored  # proxy, and a rerank whose inner rule reads every token: full logits


def _head_gguf(tmp_path, kind: str):
    """A tiny GGUF whose output matrix is of type ``kind`` (``tied``: none, the embedding's,
    Q8_0); the K-quants on a model 256 wide (their blocks), the rest of it Q8_0."""
    import ctypes

    tok = build_tokenizer()
    model = build_model(tok, seed=1, hidden=256 if kind.endswith("_K") else 32)
    if kind == "tied":
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    dtype = "float16" if kind == "F16" else "float32"
    path = write_gguf(model, tok, tmp_path / "source.gguf", dtype)
    if kind in ("F32", "F16"):
        return path
    lc = llamacpp.llama_cpp_module()
    params = lc.llama_model_quantize_default_params()
    params.ftype = lc.LLAMA_FTYPE_MOSTLY_Q8_0
    if kind != "tied":
        params.output_tensor_type = getattr(lc, f"GGML_TYPE_{kind}")
    out = tmp_path / "head.gguf"
    assert lc.llama_model_quantize(str(path).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


HEAD_TYPES = ["F32", "F16", "Q8_0", "tied", "Q4_0", "Q5_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@needs_llama
@pytest.mark.parametrize("kind", HEAD_TYPES)
def test_candidate_logits_are_the_full_logits_at_those_ids(tmp_path, kind):
    """Every output-matrix type scored here, a tied head (the embedding's rows) among them:
    the logits at the ids asked for are llama.cpp's own (measured: within 4e-6 of ~26)."""
    import torch

    model = llamacpp.load_llamacpp(ModelSpec(str(_head_gguf(tmp_path, kind))))
    assert model.output_head.type == ("Q8_0" if kind == "tied" else kind)
    prompts = [[5, 6, 7], [8, 9], [10]]
    hidden, first_hidden = model.start_hidden(prompts)  # the context is empty: gets its tap
    plain, first = model.start(prompts)
    assert hidden.hidden and not plain.hidden and hidden.group is None
    assert first_hidden.shape == (3, model.output_head.width)
    ids = torch.tensor([0, 3, 17, 40, model.vocab_width - 1])
    torch.testing.assert_close(
        model.candidate_logits(first_hidden, ids), first[:, ids], atol=1e-4, rtol=0
    )
    step = torch.tensor([[11], [12], [13]])
    got = model.candidate_logits(hidden.advance(step)[:, -1], ids)
    torch.testing.assert_close(got, plain.advance(step)[:, -1, ids], atol=1e-4, rtol=0)


@needs_llama
@pytest.mark.parametrize("kind", ["Q4_1", "IQ4_NL"])
def test_an_output_matrix_type_not_reproduced_keeps_full_logits(tmp_path, kind):
    model = llamacpp.load_llamacpp(ModelSpec(str(_head_gguf(tmp_path, kind))))
    assert not model.scores_candidates
    state, out = model.start_hidden([[5, 6]])
    assert not state.hidden and out.shape == (1, model.vocab_width)


@needs_llama
def test_a_context_holding_plain_rows_keeps_full_logits(tiny):
    model = llamacpp.load_llamacpp(ModelSpec(str(tiny["anti"] / "model.gguf")))
    busy, _ = model.start([[5, 6]])
    state, out = model.start_hidden([[7, 8]])  # no eval callback on a context in use
    assert not state.hidden and out.shape == (1, model.vocab_width)
    del busy, state


def _head_file(path, *, bias: bool = False, split: bool = False, tied: bool = False):
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    if split:
        writer.add_uint16("split.count", 2)
    writer.add_tensor("token_embd.weight", np.ones((6, 32), dtype=np.float32))
    if not tied:
        writer.add_tensor("output.weight", np.full((6, 32), 2.0, dtype=np.float32))
    if bias:
        writer.add_tensor("output.bias", np.zeros(6, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@needs_llama
def test_output_head_reads_the_tied_matrix_and_refuses_a_bias_or_a_shard(tmp_path):
    import numpy as np

    from proxytune.backends.llamacpp_head import OutputHead, ggml_library

    lib = ggml_library(llamacpp.llama_cpp_module())
    ids = np.array([1, 4])
    head = OutputHead(lib, _head_file(tmp_path / "h.gguf"), 6, 32)
    assert head.supported and (head.rows(ids) == 2.0).all()  # output.weight
    tied = OutputHead(lib, _head_file(tmp_path / "t.gguf", tied=True), 6, 32)
    assert tied.supported and (tied.rows(ids) == 1.0).all()  # token_embd.weight
    for kind in ("bias", "split"):
        path = _head_file(tmp_path / f"{kind}.gguf", **{kind: True})
        assert not OutputHead(lib, path, 6, 32).supported
