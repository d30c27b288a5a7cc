"""GPU speed table: random-weight models of real shapes, one run, a markdown table and JSON.

    bash scripts/gpu_table.sh $OUT                                  # on a bare CUDA machine
    python benchmarks/gpu_table.py --out runs/gpu-table --batch-sizes 1 8 32 --max-new-tokens 32
    python benchmarks/gpu_table.py --cpu-smoke --out /tmp/t       # tiny shapes on the CPU (tests)

Speed does not need trained weights: a model of the real shape with random weights reads the
same bytes and runs the same kernels. Each model set (default: Qwen2.5-1.5B base with a
Qwen2.5-0.5B pair; Llama-2-13B base with a Llama-2-7B pair, the paper's setting) is built from
its config alone (no download) in bf16 on the GPU, with a word-level tokenizer of the real
vocabulary size made on the spot, and wrapped in proxytune's own ``HFModel``/``Member``/
``Pair``/``ProxyTuner``: every system decodes through ``ProxyTuner.steps``, the loop users get.

Systems, per batch size (greedy, EOS ignored, raw prompts of ``--prompt-tokens`` ids):

- base: the base model alone (``tuner.alone("base")``): the speed to match;
- naive: base, expert and anti-expert (two models) one after the other;
- overlap: the same with ``with_options(overlap=True)`` (the pair beside the base);
- naive-shared / stacked: expert and anti-expert are ONE model reading two prompts, one after
  the other / stacked into one forward (``with_options(stacked=True)``);
- speculative: ``speculative=K`` on the naive models, measured; random weights accept (almost)
  nothing, so this is the worst case;
- speculative@a: **computed, not measured**: the verifiers' forward cost per width 1..K+1 and
  the drafter's forward cost are measured on the same states (``HFDecodeState.advance`` and
  ``rollback``), and the tokens/s that acceptance rate ``a`` would give is computed with
  ``RoundCosts.round_cost``, ``best_draft_length`` and ``expected_tokens``
  (``proxytune.engine.speculative``); the rule's per-position scoring is not in these costs;
- naive-bnb8 / naive-bnb4: the pair's models quantized by bitsandbytes (saved to a temporary
  directory and loaded through ``ModelSpec(quantize=...)``), where bitsandbytes is installed.

Exactness checks (token ids equal): overlap = naive, speculative = naive, stacked =
naive-shared; recorded per batch size as pass/fail. Memory: ``peak GiB`` is the weights of the
models that system uses plus the extra GPU memory its run allocated at its peak
(``torch.cuda.max_memory_allocated`` minus what was allocated before it), i.e. its peak if only
its models were loaded. Whatever cannot run is skipped with the reason. Exit 2 without CUDA
(unless ``--cpu-smoke``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACCEPTANCES = (0.0, 0.5, 0.7, 0.9)
"""0.0 calibrates: one plain step by the formula, to set beside the measured naive row."""

SETS: dict[str, dict[str, Any]] = {
    "qwen2.5-1.5b+0.5b": {
        "arch": "qwen2",
        "base": {
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "tie_word_embeddings": True,
        },
        "pair": {
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "tie_word_embeddings": True,
        },
        "common": {"vocab_size": 151936, "max_position_embeddings": 32768, "rope_theta": 1e6},
    },
    "llama-2-13b+7b": {
        "arch": "llama",
        "base": {
            "hidden_size": 5120,
            "intermediate_size": 13824,
            "num_hidden_layers": 40,
            "num_attention_heads": 40,
            "num_key_value_heads": 40,
        },
        "pair": {
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
        },
        "common": {"vocab_size": 32000, "max_position_embeddings": 4096},
    },
}
TINY: dict[str, dict[str, Any]] = {
    "tiny-llama": {
        "arch": "llama",
        "base": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        "pair": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        "common": {"vocab_size": 512, "max_position_embeddings": 512},
    }
}
SPECIALS = ["<pad>", "<s>", "</s>"]


def log(*parts: Any) -> None:
    print(*parts, flush=True)


def versions() -> dict[str, str | None]:
    """The versions of what the run uses (``None``: not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "tokenizers", "bitsandbytes", "accelerate"):
        try:
            module = __import__(name)
            found[name] = str(getattr(module, "__version__", "?"))
        except Exception:
            found[name] = None
    return found


def make_tokenizer(vocab_size: int) -> Any:
    """A word-level fast tokenizer of exactly ``vocab_size`` ids (``<pad> <s> </s> t3 t4 ...``),
    built in well under a second: the engine needs ids, decode and EOS, not real words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({f"t{i}": i for i in range(len(SPECIALS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def param_count(cfg: dict[str, Any]) -> int:
    """Parameters of a Llama/Qwen2-shaped decoder (biases left out)."""
    h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = h // heads
    attn = h * h * 2 + 2 * h * kv * head_dim
    embed = cfg["vocab_size"] * h * (1 if cfg.get("tie_word_embeddings") else 2)
    return embed + n * (attn + 3 * h * i + 2 * h) + h


def build_model(
    arch: str,
    cfg: dict[str, Any],
    tokenizer: Any,
    seed: int,
    device: Any,
    dtype: Any,
    init_std: float,
) -> Any:
    """A random-weight causal LM of config ``cfg`` on ``device`` (built there, no download).

    A large ``init_std`` makes the random next-token distributions peaked, so greedy decoding
    is far from ties and the exactness checks compare real decisions, not rounding noise."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    config = config_cls(
        **cfg,
        initializer_range=init_std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 on the device: never a float32 copy
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(default)
    model = model.to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@dataclass
class Loaded:
    """One model set, loaded once: every system is a view of these models."""

    name: str
    tokenizer: Any
    base: Any  # HFModel
    expert: Any
    anti: Any
    weights: dict[str, float] = field(default_factory=dict)  # role -> GiB
    tmp: Any = None  # TemporaryDirectory of saved pair models (bnb)
    cfgs: dict[str, dict[str, Any]] = field(default_factory=dict)


def prompt_formats() -> tuple[Any, Any]:
    """The expert's and anti-expert's prompt formats: different, so a shared model reads two
    prompts (stacked roles need that)."""
    from proxytune.prompts import PromptFormat

    return PromptFormat("template", template="t7 t8 t9 t10 {prompt} t11"), PromptFormat("raw")


def tuner_of(base: Any, expert: Any, anti: Any, **options: Any) -> Any:
    from proxytune import ProxyTuner
    from proxytune.engine.members import Member, Pair
    from proxytune.prompts import PromptFormat

    e_fmt, a_fmt = prompt_formats()
    pair = Pair(Member("expert[0]", expert, e_fmt), Member("anti_expert[0]", anti, a_fmt))
    return ProxyTuner(Member("base", base, PromptFormat("raw")), [pair], options=options or None)


def make_prompts(batch: int, length: int, vocab: int) -> list[str]:
    import random

    rng = random.Random(batch)
    return [
        " ".join(f"t{rng.randrange(len(SPECIALS), vocab)}" for _ in range(length))
        for _ in range(batch)
    ]


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gib(n: float) -> float:
    return n / 2**30


def timed_run(
    tuner: Any, prompts: list[str], args: Any, device: Any, speculative: int | None = None
) -> dict[str, Any]:
    """One greedy batch through ``tuner.steps`` (after a short warm-up): tokens/s, time to first
    token, extra GPU memory at the peak, the ids and (speculative) the acceptance."""
    import torch

    from proxytune.engine.speculative import SpeculativeStats

    tuner.generate(prompts[:1], max_new_tokens=3, ignore_eos=True, speculative=speculative)
    cuda = device.type == "cuda"
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    stats = SpeculativeStats()
    ids: dict[int, list[int]] = {}
    first = None
    t0 = time.perf_counter()
    steps = tuner.steps(
        prompts,
        max_new_tokens=args.max_new_tokens,
        ignore_eos=True,
        speculative=speculative,
        stats=stats if speculative else None,
    )
    for updates in steps:
        if first is None:
            first = time.perf_counter() - t0
        for u in updates:
            ids.setdefault(u.row, []).append(u.token_id)
    sync(device)
    seconds = time.perf_counter() - t0
    tokens = sum(len(v) for v in ids.values())
    extra = gib(torch.cuda.max_memory_allocated(device) - before) if cuda else None
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tok_s": tokens / seconds,
        "ttft_s": first,
        "extra_gib": extra,
        "acceptance": stats.acceptance_rate if speculative else None,
        "tokens_per_round": stats.tokens_per_round if speculative else None,
        "ids": [ids[r] for r in sorted(ids)],
    }


def measure_costs(
    tuner: Any,
    prompts: list[str],
    k: int,
    reps: int,
    device: Any,
) -> dict[str, Any]:
    """Seconds of the verifiers' forwards (base and anti-expert, together) over ``w`` new
    positions for ``w`` in ``1..k+1``, and of one drafter (expert) forward over one position:
    prefilled states advanced and rolled back, as a speculative round does."""
    import torch

    from proxytune.engine.capabilities import rollback
    from proxytune.engine.plain import advance_all, start_all

    prepared = tuner.prepare(prompts, max_new_tokens=k + 2, ignore_eos=True)
    rows = prepared.rows()
    members = prepared.members
    drafter = next(m for m in members if m.role == "expert[0]")
    verifiers = [m for m in members if m is not drafter]
    states, _ = start_all(members, prepared.rendered, rows, True, False, drafter)
    batch = len(rows)
    gen = torch.Generator().manual_seed(0)
    vocab = tuner.vocab_size

    def feed(width: int) -> torch.Tensor:
        return torch.randint(len(SPECIALS), vocab, (batch, width), generator=gen).to(device)

    def once(run: Any, width: int, who: list[Any]) -> float:
        tokens = feed(width)
        sync(device)
        t0 = time.perf_counter()
        run(tokens)
        sync(device)
        seconds = time.perf_counter() - t0
        for m in who:
            rollback(states[m.role], torch.full((batch,), width, dtype=torch.long))
        return seconds

    def verify(tokens: torch.Tensor) -> None:
        advance_all(verifiers, states, tokens, False)

    def draft(tokens: torch.Tensor) -> None:
        states[drafter.role].advance(tokens)

    once(verify, 1, verifiers)  # warm-up
    once(draft, 1, [drafter])
    widths = {
        w: statistics.median(once(verify, w, verifiers) for _ in range(reps))
        for w in range(1, k + 2)
    }
    drafter_s = statistics.median(once(draft, 1, [drafter]) for _ in range(reps))
    return {"verify": widths, "draft": drafter_s}


def computed_rows(costs: dict[str, Any], batch: int, k: int) -> list[dict[str, Any]]:
    """Tokens/s that acceptance rates would give, from the measured costs (RoundCosts)."""
    from proxytune.engine.speculative import RoundCosts, best_draft_length, expected_tokens

    rc = RoundCosts(draft_ratio=1.0, draft=costs["draft"], verify=dict(costs["verify"]))
    out = []
    for a in ACCEPTANCES:
        best = best_draft_length([a], rc.round_cost, longest=k)
        per_round = expected_tokens(a, best)
        seconds = rc.round_cost(best, a)
        out.append(
            {
                "system": f"speculative@{a:g} (computed)",
                "computed": True,
                "acceptance": a,
                "k": best,
                "tokens_per_round": per_round,
                "round_s": seconds,
                "tok_s": batch * per_round / seconds,
            }
        )
    return out


def bnb_pair(loaded: Loaded, method: str, device: Any, dtype_name: str) -> Any:
    """The pair's two models saved to a temporary directory and loaded back quantized with
    bitsandbytes through ``ModelSpec`` (the way users load them)."""
    from proxytune.backends.load import load_model
    from proxytune.specs import ModelSpec

    if loaded.tmp is None:
        loaded.tmp = tempfile.TemporaryDirectory(prefix="gpu-table-")
        for role, lm in (("expert", loaded.expert), ("anti", loaded.anti)):
            path = Path(loaded.tmp.name) / role
            lm.model.save_pretrained(path)
            loaded.tokenizer.save_pretrained(path)
    return [
        load_model(
            ModelSpec(
                str(Path(loaded.tmp.name) / role),
                device=str(device),
                dtype=dtype_name,
                quantize=method,
                backend="transformers",
            )
        )
        for role in ("expert", "anti")
    ]


def weight_gib(*models: Any) -> float:
    from proxytune.backends.quantize import weight_bytes

    unique = {id(m.model): m.model for m in models}
    return gib(sum(weight_bytes(m) for m in unique.values()))


class Budget:
    def __init__(self, seconds: float) -> None:
        self.start = time.perf_counter()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def spent(self) -> float:
        return time.perf_counter() - self.start


def run_set(
    name: str,
    spec: dict[str, Any],
    args: Any,
    device: Any,
    dtype: Any,
    dtype_name: str,
    budget: Budget,
    report: dict[str, Any],
) -> None:
    """Build one model set and measure every system at every batch size."""
    import torch

    from proxytune.backends.hf import HFModel

    base_cfg = {**spec["common"], **spec["base"]}
    pair_cfg = {**spec["common"], **spec["pair"]}
    sizes = {"base": param_count(base_cfg), "pair": param_count(pair_cfg)}
    need = (sizes["base"] + 2 * sizes["pair"]) * 2
    entry: dict[str, Any] = {
        "set": name,
        "params": sizes,
        "results": [],
        "checks": [],
        "skipped": [],
    }
    report["sets"].append(entry)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        want = need * 1.25 + 8 * 2**30  # weights, then KV caches and logits at batch 32
        if want > free:
            reason = (
                f"needs about {gib(want):.0f} GiB ({gib(need):.1f} GiB of bf16 weights plus "
                f"caches), {gib(free):.0f} GiB free"
            )
            entry["skipped"].append({"what": "the whole set", "why": reason})
            log(f"[{name}] skipped: {reason}")
            return
    if budget.left() < 30:
        entry["skipped"].append({"what": "the whole set", "why": "time budget spent"})
        log(f"[{name}] skipped: time budget spent")
        return
    t0 = time.perf_counter()
    tokenizer = make_tokenizer(spec["common"]["vocab_size"])
    models = [
        build_model(spec["arch"], cfg, tokenizer, seed, device, dtype, args.init_std)
        for cfg, seed in ((base_cfg, 0), (pair_cfg, 1), (pair_cfg, 2))
    ]
    base, expert, anti = (
        HFModel(m, tokenizer, name=f"{name}:{r}")
        for m, r in zip(models, ("base", "expert", "anti"), strict=True)
    )
    loaded = Loaded(name, tokenizer, base, expert, anti)
    entry["build_s"] = time.perf_counter() - t0
    entry["weights_gib"] = {"base": weight_gib(base), "pair_model": weight_gib(expert)}
    log(
        f"[{name}] built in {entry['build_s']:.1f}s: base {count(sizes['base'])}, pair "
        f"2 x {count(sizes['pair'])} params ({gib(need):.2f} GiB of weights)"
    )
    naive = tuner_of(base, expert, anti)
    shared = tuner_of(base, anti, anti)
    systems: list[tuple[str, Any, int | None, float]] = [
        ("base", naive.alone("base"), None, weight_gib(base)),
        ("naive", naive, None, weight_gib(base, expert, anti)),
        ("overlap", naive.with_options(overlap=True), None, weight_gib(base, expert, anti)),
        ("naive-shared", shared, None, weight_gib(base, anti)),
        ("stacked", shared.with_options(stacked=True), None, weight_gib(base, anti)),
        ("speculative", naive, args.k, weight_gib(base, expert, anti)),
    ]
    quant_tuners: list[tuple[str, Any, float]] = []
    for method in args.bnb:
        what = f"naive-{method}"
        why = None
        if report["versions"].get("bitsandbytes") is None:
            why = "bitsandbytes is not installed"
        elif name not in args.bnb_sets and not args.cpu_smoke:
            why = f"saving and reloading {name} takes too long for the time budget (--bnb-sets)"
        elif budget.left() < 120:
            why = "time budget"
        if why:
            entry["skipped"].append({"what": what, "why": why})
            log(f"[{name}] {what} skipped: {why}")
            continue
        try:
            q_expert, q_anti = bnb_pair(loaded, method, device, dtype_name)
        except Exception as err:
            why = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
            entry["skipped"].append({"what": what, "why": why})
            log(f"[{name}] {what} skipped: {why}")
            continue
        quant_tuners.append(
            (what, tuner_of(base, q_expert, q_anti), weight_gib(base, q_expert, q_anti))
        )
    systems += [(n, t, None, w) for n, t, w in quant_tuners]
    for batch in args.batch_sizes:
        prompts = make_prompts(batch, args.prompt_tokens, spec["common"]["vocab_size"])
        got: dict[str, dict[str, Any]] = {}
        for system, tuner, spec_k, weights in systems:
            if budget.left() < 10:
                entry["skipped"].append(
                    {"what": f"{system} at batch {batch}", "why": "time budget spent"}
                )
                log(f"[{name}] batch {batch} {system}: skipped (time budget)")
                continue
            try:
                r = timed_run(tuner, prompts, args, device, spec_k)
            except Exception as err:
                why = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
                entry["skipped"].append({"what": f"{system} at batch {batch}", "why": why})
                log(f"[{name}] batch {batch} {system}: failed: {why}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            r.update(system=system, batch=batch, weights_gib=weights, computed=False)
            if spec_k is not None:
                r["k"] = spec_k
            r["peak_gib"] = None if r["extra_gib"] is None else weights + r["extra_gib"]
            got[system] = r
            entry["results"].append(r)
            acc = "" if r["acceptance"] is None else f", acceptance {r['acceptance']:.2f}"
            log(
                f"[{name}] batch {batch} {system}: {r['tok_s']:.1f} tok/s, TTFT "
                f"{r['ttft_s']:.3f}s{acc} ({budget.spent():.0f}s elapsed)"
            )
        for system, ref in (
            ("overlap", "naive"),
            ("speculative", "naive"),
            ("stacked", "naive-shared"),
        ):
            if system in got and ref in got:
                same = sum(a == b for a, b in zip(got[system]["ids"], got[ref]["ids"], strict=True))
                check = {
                    "batch": batch,
                    "check": f"{system} = {ref}",
                    "rows_equal": same,
                    "rows": batch,
                    "pass": same == batch,
                }
                entry["checks"].append(check)
                log(
                    f"[{name}] batch {batch} check {check['check']}: "
                    f"{'PASS' if check['pass'] else 'FAIL'} ({same}/{batch} rows equal)"
                )
        if budget.left() < 10:
            entry["skipped"].append(
                {"what": f"speculative costs at batch {batch}", "why": "time budget spent"}
            )
            continue
        try:
            costs = measure_costs(naive, prompts, args.k, args.reps, device)
        except Exception as err:
            why = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
            entry["skipped"].append({"what": f"speculative costs at batch {batch}", "why": why})
            log(f"[{name}] batch {batch} speculative costs failed: {why}")
            continue
        entry.setdefault("costs", []).append({"batch": batch, **costs})
        widths = ", ".join(f"{w}: {s * 1e3:.2f}ms" for w, s in costs["verify"].items())
        log(
            f"[{name}] batch {batch} verification by width {widths}; drafter forward "
            f"{costs['draft'] * 1e3:.2f}ms"
        )
        for row in computed_rows(costs, batch, args.k):
            row.update(batch=batch)
            entry["results"].append(row)
    del systems, naive, shared, quant_tuners, loaded, base, expert, anti, models
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def table(report: dict[str, Any]) -> str:
    """The markdown report: machine, versions, one table per model set and batch size."""
    v = report["versions"]
    lines = [
        "# GPU speed table (random weights, real shapes)"
        if report["device"] == "cuda"
        else "# CPU smoke run of the GPU table (tiny shapes: checks the script, not a GPU table)",
        "",
        f"- machine: {report['machine']}",
        "- versions: " + ", ".join(f"{k} {v[k] or 'not installed'}" for k in v),
        f"- settings: {report['settings']}",
        f"- run time: {report['seconds']:.0f}s",
        "",
        "Greedy, EOS ignored, random prompts. `x base`: ratio to the base alone at the same "
        "batch size. `peak GiB`: the system's weights plus the extra GPU memory its run "
        "allocated at its peak. Rows marked *computed* are **not measured decoding**: their "
        "tokens/s is computed from the measured verification cost per width and drafter cost "
        "(`RoundCosts.round_cost`, `expected_tokens`) for that acceptance rate; the "
        "`speculative` row is measured (random weights accept almost nothing: its worst case). "
        "The rule's scoring per position is not in the computed costs: *speculative@0* (one "
        "plain step by the formula) beside the measured `naive` row shows how much that is.",
    ]
    for entry in report["sets"]:
        lines += ["", f"## {entry['set']}", ""]
        p = entry["params"]
        lines.append(
            f"base {count(p['base'])} params, expert and anti-expert {count(p['pair'])} each"
            + (f"; built in {entry['build_s']:.1f}s" if "build_s" in entry else "")
        )
        for batch in report["batch_sizes"]:
            rows = [r for r in entry["results"] if r["batch"] == batch]
            if not rows:
                continue
            base = next((r for r in rows if r["system"] == "base"), None)
            lines += [
                "",
                f"### batch {batch}",
                "",
                "| system | tok/s | x base | TTFT s | x base | peak GiB | x base | accept | "
                "k | tok/round |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            ]
            for r in rows:

                def ratio(
                    key: str, r: dict[str, Any] = r, base: dict[str, Any] | None = base
                ) -> str:
                    if base is None or r.get(key) is None or not base.get(key):
                        return "-"
                    return f"{r[key] / base[key]:.2f}"

                name = f"*{r['system']}*" if r.get("computed") else r["system"]
                lines.append(
                    f"| {name} | {r['tok_s']:.1f} | {ratio('tok_s')} | "
                    f"{fmt(r.get('ttft_s'), '.3f')} | {ratio('ttft_s')} | "
                    f"{fmt(r.get('peak_gib'))} | {ratio('peak_gib')} | "
                    f"{fmt(r.get('acceptance'))} | {r.get('k', '-')} | "
                    f"{fmt(r.get('tokens_per_round'))} |"
                )
        for c in entry.get("costs", []):
            widths = ", ".join(f"{w}: {s * 1e3:.2f}" for w, s in c["verify"].items())
            lines.append(
                f"\nbatch {c['batch']}: verification (base + anti-expert) ms by width: "
                f"{widths}; drafter forward {c['draft'] * 1e3:.2f} ms"
            )
        if entry["checks"]:
            lines += ["", "Exactness (token ids equal):", ""]
            lines += [
                f"- batch {c['batch']}: {c['check']}: {'PASS' if c['pass'] else 'FAIL'} "
                f"({c['rows_equal']}/{c['rows']} rows)"
                for c in entry["checks"]
            ]
        if entry["skipped"]:
            lines += ["", "Skipped:", ""]
            lines += [f"- {s['what']}: {s['why']}" for s in entry["skipped"]]
    return "\n".join(lines) + "\n"


def machine_name(device: Any) -> str:
    import torch

    cpu = f"{os.cpu_count()} CPU cores, {platform.machine()}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({gib(props.total_memory):.0f} GiB), CUDA {torch.version.cuda}, {cpu}"
    return f"CPU only, {cpu}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu-table")
    parser.add_argument("--sets", nargs="+", default=list(SETS), help=f"of {list(SETS)}")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=4, help="draft length (speculative)")
    parser.add_argument("--reps", type=int, default=5, help="timings per width (median)")
    parser.add_argument("--bnb", nargs="*", default=["bnb8", "bnb4"], choices=["bnb8", "bnb4"])
    parser.add_argument(
        "--bnb-sets",
        nargs="*",
        default=["qwen2.5-1.5b+0.5b"],
        help="sets whose pair is also run quantized (saved and reloaded)",
    )
    parser.add_argument("--init-std", type=float, default=0.5)
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="stop starting new measurements after this many seconds",
    )
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny shapes on the CPU (float32): checks the script itself",
    )
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="default: bfloat16 on CUDA, float32 with --cpu-smoke",
    )
    args = parser.parse_args(argv)

    found = versions()
    if found["torch"] is None or found["transformers"] is None:
        log("gpu_table: torch and transformers are needed; not installed here")
        return 2
    import torch

    if args.cpu_smoke:
        device, dtype, dtype_name, sets = torch.device("cpu"), torch.float32, "float32", TINY
        args.sets = list(TINY)
    elif not torch.cuda.is_available():
        log("gpu_table: no CUDA device (pass --cpu-smoke for the tiny CPU check)")
        return 2
    else:
        device, dtype, dtype_name, sets = torch.device("cuda"), torch.bfloat16, "bfloat16", SETS
    if args.dtype:
        dtype, dtype_name = getattr(torch, args.dtype), args.dtype
    log("versions: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in found.items()))
    unknown = [s for s in args.sets if s not in sets]
    if unknown:
        log(f"gpu_table: unknown set(s) {unknown}; sets: {list(sets)}")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)
    report: dict[str, Any] = {
        "machine": machine_name(device),
        "device": device.type,
        "versions": found,
        "batch_sizes": args.batch_sizes,
        "settings": (
            f"{dtype_name}, {args.max_new_tokens} new tokens, {args.prompt_tokens}-token "
            f"prompts, speculative k={args.k}, batch sizes {args.batch_sizes}"
        ),
        "args": vars(args),
        "sets": [],
    }
    log(f"machine: {report['machine']}; {report['settings']}")
    for name in args.sets:
        try:
            run_set(name, sets[name], args, device, dtype, dtype_name, budget, report)
        except Exception as err:
            why = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
            log(f"[{name}] failed: {why}")
            report["sets"].append(
                {
                    "set": name,
                    "params": {"base": 0, "pair": 0},
                    "results": [],
                    "checks": [],
                    "skipped": [{"what": "the whole set", "why": why}],
                }
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
        report["seconds"] = budget.spent()
        (out / "results.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "table.md").write_text(table(report))
    report["seconds"] = budget.spent()
    text = table(report)
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    log("\n" + text)
    checks = [c for e in report["sets"] for c in e["checks"]]
    failed = [c for c in checks if not c["pass"]]
    log(
        f"exactness checks: {len(checks) - len(failed)}/{len(checks)} pass; wrote "
        f"{out / 'table.md'} and {out / 'results.json'} in {budget.spent():.0f}s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
