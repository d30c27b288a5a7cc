"""Speed of proxy-tuning: base alone vs naive, overlapped, stacked and speculative proxy-tuning.

    .venv/bin/python benchmarks/bench_speed.py                        # embedded default, 1 8 32
    .venv/bin/python benchmarks/bench_speed.py --batch-sizes 1 8 --max-new-tokens 16 \\
        --systems base naive speculative --k 4 --markdown

Every (system, batch size) runs in its own process on the same prompts (greedy, EOS ignored so
that every system does the same work), so its peak RSS is its own: weights, caches and
activations. Prints, per batch size, tokens/s, time to first token and peak memory with their
ratios to the base alone, the speculative acceptance rate, for llama.cpp systems the engine's
own time per step (``overhead ms/step``: a step's wall time minus the time a ``llama_decode``
ran in it, median and range over the steps), and how many rows match naive
proxy-tuning token for token (overlap, stacked and speculative must match all; quantized
models show their effect). On a shared machine, wall-clock speed follows the load; tokens per
CPU-second (with ``--threads 1``) is the steadier figure, except for overlapped systems, which
use more than one core by design.

Systems: base (the base model alone: the speed to match), naive (the three models one after
the other), overlap (the pair's forwards beside the base's, in another thread), stacked
(expert and anti-expert, one shared model, in one forward), speculative (the expert drafts,
base and anti-expert verify), speculative+overlap; each also as KIND-Q (the pair's models
quantized with Q: int8, ours, CPU only; bnb8 or bnb4, bitsandbytes) and KIND-Qall (every
model). KIND-cpp runs every model on llama.cpp (the recipe's GGUFs: the embedded default's
kept Q4_K_M files); the other systems run on transformers. rerank-cpp is naive-cpp under the
``rerank`` rule (the base's top 10 re-ranked by the pair) with full logits, rerank+candidates-cpp
the same with candidate scoring (the pair's logits at the 10 candidates only; it must match
rerank-cpp). Ratios are to the transformers base alone; the table's last lines give the
llama.cpp systems' ratios to llama.cpp's base alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, replace
from typing import Any

from bench_generate import PROMPTS, run_child  # the same prompts as the base-vs-proxy benchmark

KINDS = ("base", "naive", "overlap", "stacked", "speculative", "speculative+overlap")
QUANTIZE = ("int8", "bnb8", "bnb4")
CPP_KINDS = (
    "base",
    "naive",
    "overlap",
    "speculative",
    "speculative+overlap",
    "rerank",
    "rerank+candidates",
)
SYSTEMS = (
    *KINDS,
    *(f"{k}-{q}{a}" for q in QUANTIZE for a in ("", "all") for k in KINDS),
    *(f"{k}-cpp" for k in CPP_KINDS),
)
"""``KIND[-Q|-Qall][:K]``: -Q quantizes the pair's models with Q (int8: ours, CPU; bnb8, bnb4:
bitsandbytes), -Qall every model; ``:K`` gives a speculative system its own draft length (else
``--k``)."""


def system_name(text: str) -> str:
    """``text`` if it names a system (argparse type)."""
    name, _, k = text.partition(":")
    if name not in SYSTEMS or (
        k and not (name.startswith("speculative") and (k.isdigit() or k == "auto"))
    ):
        raise argparse.ArgumentTypeError(f"unknown system {text!r}; systems: {', '.join(SYSTEMS)}")
    return text


def build(system: str, args: dict[str, Any]) -> Any:
    """The tuner of ``system``, loaded from the recipe."""
    from proxytune import ProxyTuner
    from proxytune.recipe import default_recipe_path, load_recipe

    kind, _, quant = system.partition(":")[0].partition("-")
    overrides = {"backend": "llamacpp" if quant == "cpp" else "transformers"}
    if args["device"]:
        overrides["device"] = args["device"]
    if args["threads"] and quant == "cpp":
        overrides["threads"] = args["threads"]
    recipe = load_recipe(args["recipe"] or default_recipe_path(), **overrides)
    if quant and quant != "cpp":
        method = quant.removesuffix("all")

        def q(spec: Any) -> Any:
            return None if spec is None else replace(spec, quantize=method)

        pairs = [(q(e), q(a), alpha) for e, a, alpha in recipe.pairs]
        base = q(recipe.base) if quant.endswith("all") else recipe.base
        recipe = replace(recipe, base=base, pairs=pairs)
    if kind.startswith("rerank"):
        from proxytune.rules import make_rule

        recipe = replace(recipe, rule=make_rule("rerank"))
    tuner = ProxyTuner.from_recipe(
        recipe,
        overlap=kind.endswith("overlap"),
        stacked=kind == "stacked",
        candidates=kind.endswith("+candidates"),
    )
    return tuner.alone("base") if kind == "base" else tuner


def weight_gib(tuner: Any) -> float:
    """Weights held in memory (each loaded model once; int8 weights at 1 byte)."""
    from proxytune.backends.quantize import weight_bytes

    files = {m.model.path for m in tuner.members if hasattr(m.model, "path")}  # llama.cpp: GGUF
    models = [getattr(m.model, "model", None) for m in tuner.members]
    unique = {id(m): m for m in models if m is not None}
    held = sum(weight_bytes(m) for m in unique.values()) + sum(os.path.getsize(f) for f in files)
    return held / 2**30


def cpu_name() -> str:
    """The processor's model name (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def current_rss_gib() -> float:
    """Resident memory now (after loading and generating), from /proc; 0 where unknown."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError):
        return 0.0
    return kib / 2**20


def covered(spans: list[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of ``[start, end]`` inside at least one of ``spans`` (``(t0, t1)`` pairs; decodes
    that overlap in time count once).

    >>> covered([(0.0, 2.0), (1.0, 3.0), (5.0, 9.0)], 0.5, 6.0)
    3.5
    """
    total, reach = 0.0, start
    for t0, t1 in sorted(spans):
        t0, t1 = max(t0, reach), min(t1, end)
        if t1 > t0:
            total, reach = total + t1 - t0, t1
    return total


def step_overheads(stamps: list[float], spans: list[tuple[float, float]]) -> list[float]:
    """Per decode step: its wall time minus the time a ``llama_decode`` ran in it (the engine's
    own work). ``stamps``: when each step's tokens came out."""
    return [b - a - covered(spans, a, b) for a, b in itertools.pairwise(stamps)]


def time_decodes() -> list[tuple[float, float]]:
    """Record every ``llama_decode`` call of this process as a ``(start, end)`` span."""
    import llama_cpp

    spans: list[tuple[float, float]] = []
    decode = llama_cpp.llama_decode

    def timed(ctx: Any, batch: Any) -> int:
        t0 = time.perf_counter()
        status = decode(ctx, batch)
        spans.append((t0, time.perf_counter()))
        return status

    llama_cpp.llama_decode = timed
    return spans


def measure(system: str, batch: int, args: dict[str, Any], out: Any) -> None:
    """Load ``system`` and time one greedy batch of ``batch`` prompts (child process)."""
    import torch

    from proxytune.engine.speculative import SpeculativeStats

    if args["threads"]:
        torch.set_num_threads(args["threads"])
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    tuner = build(system, args)
    load_s = time.perf_counter() - t0
    name, _, k = system.partition(":")
    spec = None
    if name.startswith("speculative"):  # KIND-...
        spec = (int(k) if k.isdigit() else k) if k else args["k"]
    prompts = (PROMPTS * (batch // len(PROMPTS) + 1))[:batch]
    tuner.generate(prompts[:1], max_new_tokens=3, speculative=spec)  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    stats = SpeculativeStats()
    spans = time_decodes() if system.partition(":")[0].endswith("-cpp") else None
    stamps: list[float] = []
    ids: dict[int, list[int]] = {}
    settings = {"max_new_tokens": args["max_new_tokens"], "ignore_eos": True}
    first = None
    t0, c0 = time.perf_counter(), time.process_time()
    for updates in tuner.steps(prompts, speculative=spec, stats=stats, **settings):
        stamps.append(time.perf_counter())
        if first is None:
            first = stamps[-1] - t0
        for u in updates:
            ids.setdefault(u.row, []).append(u.token_id)
    seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(len(v) for v in ids.values())
    overheads = step_overheads(stamps, spans) if spans is not None else []
    out.put(
        {
            "system": system,
            "batch": batch,
            "tokens": tokens,
            "seconds": seconds,
            "tok_s": tokens / seconds,
            "cpu_s": cpu_s,
            "tok_cpu_s": tokens / cpu_s,
            "ttft_s": first,
            "load_s": load_s,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "rss_gib": current_rss_gib(),
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30
            if torch.cuda.is_available()
            else None,
            "weights_gib": weight_gib(tuner),
            "acceptance": stats.acceptance_rate if spec else None,
            "tokens_per_round": stats.tokens_per_round if spec else None,
            "drafts_per_round": stats.proposed / stats.row_rounds if stats.row_rounds else None,
            "costs": None if stats.costs is None else asdict(stats.costs),
            "ids": [ids[r] for r in sorted(ids)],
            "overhead_ms": [x * 1e3 for x in overheads],
            "load_avg": (load_before, os.getloadavg()[0]),
        }
    )


def run(system: str, batch: int, args: dict[str, Any]) -> dict[str, Any]:
    return run_child(measure, (system, batch, args), f"{system} at batch {batch}")


def reference(system: str, by_name: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """What ``system``'s output must equal: naive proxy-tuning on the same (float or int8)
    models; naive-int8(all) is compared with float naive (the effect of int8)."""
    kind, _, quant = system.partition(":")[0].partition("-")
    if kind == "base" or system == "naive" or kind == "rerank":
        return None
    if kind.startswith("rerank"):  # candidate scoring: the same tokens as full logits
        return by_name.get(f"rerank-{quant}")
    same = f"naive-{quant}" if quant else "naive"
    if system != same and same in by_name:
        return by_name[same]
    return by_name.get("naive")


def agreement(ids: list[list[int]], ref: list[list[int]]) -> str:
    """Rows equal to the reference, and the mean share of tokens before the first difference."""
    same = sum(a == b for a, b in zip(ids, ref, strict=True))
    shares = []
    for a, b in zip(ids, ref, strict=True):
        n = next(
            (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
        )
        shares.append(n / max(len(b), 1))
    return f"{same}/{len(ref)} ({sum(shares) / len(shares):.0%})"


def table(results: list[dict[str, Any]], markdown: bool) -> str:
    """One row per system: figures, ratios to the base alone, agreement with the reference."""
    by_name = {r["system"]: r for r in results}
    base = by_name.get("base")
    head = [
        "system",
        "tok/s",
        "x base",
        "tok/CPU-s",
        "x base",
        "TTFT s",
        "x base",
        "peak RSS GiB",
        "x base",
        "RSS at end",
        "weights GiB",
        "accept",
        "drafts/round",
        "tok/round",
        "overhead ms/step",
        "= ref",
    ]
    lines = []
    for r in results:
        ref = reference(r["system"], by_name)
        same = "-" if ref is None else agreement(r["ids"], ref["ids"]) + f" {ref['system']}"

        def ratio(key: str, r: dict[str, Any] = r) -> str:
            return f"{r[key] / base[key]:.2f}" if base and base[key] else "-"

        lines.append(
            [
                r["system"],
                f"{r['tok_s']:.2f}",
                ratio("tok_s"),
                f"{r['tok_cpu_s']:.2f}",
                ratio("tok_cpu_s"),
                f"{r['ttft_s']:.2f}",
                ratio("ttft_s"),
                f"{r['peak_rss_gib']:.2f}",
                ratio("peak_rss_gib"),
                f"{r.get('rss_gib', 0.0):.2f}",
                f"{r['weights_gib']:.2f}",
                "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}",
                "-" if r.get("drafts_per_round") is None else f"{r['drafts_per_round']:.2f}",
                "-" if r["tokens_per_round"] is None else f"{r['tokens_per_round']:.2f}",
                spread(r.get("overhead_ms") or []),
                same,
            ]
        )
    if markdown:
        rows = [head, ["---"] * len(head), *lines]
        text = "\n".join("| " + " | ".join(row) + " |" for row in rows)
    else:
        widths = [max(len(row[i]) for row in [head, *lines]) for i in range(len(head))]
        text = "\n".join(
            "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))
            for row in [head, *lines]
        )
    notes = [cost_line(r) for r in results if r.get("costs")]
    cpp_base = by_name.get("base-cpp")
    for r in results:
        if r["system"].endswith("-cpp") and r is not cpp_base and cpp_base:
            notes.append(
                f"{r['system']}: {r['tok_s'] / cpp_base['tok_s']:.2f}x llama.cpp's base alone "
                f"({r['tok_s']:.2f} / {cpp_base['tok_s']:.2f} tok/s)"
            )
    return "\n".join([text, *notes])


def spread(values: list[float]) -> str:
    """``median (min-max)``, or ``-`` for none.

    >>> spread([3.0, 1.0, 2.0])
    '2.00 (1.00-3.00)'
    """
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def cost_line(result: dict[str, Any]) -> str:
    """What ``k='auto'`` measured: seconds per drafter forward and per verification width,
    and each width's cost relative to width 1 (about 1 where decoding is memory-bound)."""
    costs = result["costs"]
    verify = {int(n): t for n, t in costs["verify"].items()}
    one = verify.get(1)
    widths = ", ".join(
        f"{n}: {t:.3f}s" + (f" (x{t / one:.2f})" if one else "") for n, t in sorted(verify.items())
    )
    draft = "-" if costs["draft"] is None else f"{costs['draft']:.3f}s"
    return f"\n{result['system']} measured: drafter forward {draft}; verification by width {widths}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=None, help="recipe file (default: embedded default)")
    parser.add_argument(
        "--systems",
        nargs="+",
        default=list(KINDS),
        type=system_name,
        metavar="SYSTEM",
        help=f"{', '.join(SYSTEMS)}; a speculative one may end in :K (its draft length)",
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--k", default="auto", help="draft length for speculative, or 'auto'")
    parser.add_argument("--device", default=None, help="override the recipe's device")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--markdown", action="store_true", help="markdown tables")
    parser.add_argument("--json", default=None, help="also write every result to this file")
    args = vars(parser.parse_args())
    args["k"] = int(args["k"]) if str(args["k"]).isdigit() else args["k"]
    machine = f"{cpu_name()}, {os.cpu_count()} cores, {platform.machine()}"
    print(
        f"machine: {machine}, python {platform.python_version()}; greedy, EOS ignored, "
        f"{args['max_new_tokens']} new tokens per row, speculative k={args['k']}"
    )
    everything = []
    for batch in args["batch_sizes"]:
        results = [run(s, batch, args) for s in args["systems"]]
        everything += results
        loads = [x for r in results for x in r["load_avg"]]
        print(f"\nbatch {batch} (load average during the runs: {min(loads):.1f}-{max(loads):.1f})")
        print(table(results, args["markdown"]), flush=True)
    if args["json"]:
        with open(args["json"], "w", encoding="utf-8") as f:
            json.dump({"machine": machine, "args": args, "results": everything}, f, indent=1)


if __name__ == "__main__":
    main()
