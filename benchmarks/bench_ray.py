"""Batch-job throughput: one process vs Ray with 1 and 2 actors, on the same input, in one run.

    .venv/bin/python benchmarks/bench_ray.py --lines 16 --max-new-tokens 24 --backend llamacpp

Every system runs the same JSONL job (greedy, EOS ignored, so every line costs the same) into its
own output; it prints lines/s, tokens/s, the Ray systems' overhead per batch against the local
run, and whether their outputs equal the local one. Loading the models is timed apart (each
actor loads its own).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Explain what a KV cache is in two sentences.",
    "def fibonacci(n):",
    "Write a haiku about the sea.",
]


def build(backend: str, threads: int | None) -> Any:
    """The embedded default on ``backend`` (every actor calls this)."""
    from proxytune import ProxyTuner
    from proxytune.recipe import default_recipe_path, load_recipe

    extra = {"threads": threads} if backend == "llamacpp" and threads else {}
    return ProxyTuner.from_recipe(load_recipe(default_recipe_path(), backend=backend, **extra))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--backend", default="llamacpp", choices=["llamacpp", "transformers"])
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads per model")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    import ray

    from proxytune.distributed import ray_executor
    from proxytune.jobs import iter_results, run_jobs

    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    source = work / "in.jsonl"
    rows = [
        {"id": f"q{i}", "prompt": PROMPTS[i % len(PROMPTS)], "ignore_eos": True}
        for i in range(args.lines)
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = {"max_new_tokens": args.max_new_tokens}
    builder = partial(build, args.backend, args.threads)
    batches = -(-args.lines // args.batch_size)
    results: list[dict[str, Any]] = []

    t0 = time.perf_counter()
    tuner = builder()
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = run_jobs(tuner, source, work / "local.jsonl", batch_size=args.batch_size,
                       defaults=settings)  # fmt: skip
    local_s = time.perf_counter() - t0
    results.append(
        {"system": "local", "seconds": local_s, "load_s": load_s, "tokens": summary.tokens}
    )
    del tuner
    local = {r["id"]: r for r in iter_results(work / "local.jsonl")}

    ray.init(num_cpus=max(args.actors), include_dashboard=False, log_to_driver=False)
    for n in args.actors:
        t0 = time.perf_counter()
        pool = ray_executor(builder, n)
        # the actors load lazily: a first one-line job makes every actor load before timing
        warm = work / f"warm-{n}.jsonl"
        lines = (json.dumps({"id": f"w{i}", "prompt": "x"}) + "\n" for i in range(n))
        warm.write_text("".join(lines))
        run_jobs(None, warm, work / f"warm-out-{n}.jsonl", batch_size=1, executor=pool,
                 defaults={"max_new_tokens": 1})  # fmt: skip
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = work / f"ray-{n}.jsonl"
        summary = run_jobs(None, source, out, batch_size=args.batch_size, executor=pool,
                           defaults=settings)  # fmt: skip
        seconds = time.perf_counter() - t0
        same = {r["id"]: r for r in iter_results(out)} == local
        results.append(
            {"system": f"ray x{n}", "seconds": seconds, "load_s": load_s,
             "tokens": summary.tokens, "same_as_local": same}
        )  # fmt: skip
    ray.shutdown()

    print(f"{args.lines} lines x {args.max_new_tokens} tokens, batch {args.batch_size}, "
          f"{args.backend} (threads per model {args.threads}); {batches} batches")  # fmt: skip
    print("| system | load s | job s | lines/s | tok/s | overhead s/batch vs local | = local |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        overhead = (r["seconds"] - local_s) / batches if r["system"] != "local" else 0.0
        print(
            f"| {r['system']} | {r['load_s']:.1f} | {r['seconds']:.1f} | "
            f"{args.lines / r['seconds']:.2f} | {r['tokens'] / r['seconds']:.2f} | "
            f"{overhead:+.2f} | {r.get('same_as_local', '-')} |"
        )


if __name__ == "__main__":
    main()
