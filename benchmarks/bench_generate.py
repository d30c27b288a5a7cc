"""Base alone vs proxy-tuned: tokens/s and peak memory on the same prompts, in one run.

    .venv/bin/python benchmarks/bench_generate.py                 # embedded default recipe
    .venv/bin/python benchmarks/bench_generate.py --recipe my.yaml --batch-size 4

Each system runs in its own process (so peak memory is its own: weights, caches,
activations). Prints a table and the ratios proxy / base.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import time
from queue import Empty
from typing import Any

PROMPTS = [
    "def fibonacci(n):",
    "Write a Python function that checks whether a string is a palindrome.",
    "# Sort a list of dictionaries by the 'age' key\n",
    "Explain what a hash map is in one paragraph.",
    "class Stack:",
    "Write a SQL query that counts orders per customer.",
    "def merge_sorted(a, b):",
    "What does the `yield` keyword do in Python?",
]


def measure(system: str, args: dict[str, Any], out: Any) -> None:
    """Load the recipe's models for ``system`` and time greedy generation (child process)."""
    import torch

    from proxytune import ProxyTuner
    from proxytune.recipe import default_recipe_path

    torch.set_num_threads(args["threads"] or torch.get_num_threads())
    t0 = time.perf_counter()
    tuner = ProxyTuner.from_recipe(args["recipe"] or default_recipe_path())
    if system == "base":
        tuner = tuner.alone("base")
    load_s = time.perf_counter() - t0
    prompts = (PROMPTS * 8)[: args["prompts"]]
    settings = {"max_new_tokens": args["max_new_tokens"], "ignore_eos": True}
    tuner.generate(prompts[:1], max_new_tokens=2)  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tokens, t0 = 0, time.perf_counter()
    bs = args["batch_size"]
    first_token = None
    for i in range(0, len(prompts), bs):
        start = time.perf_counter()
        for k, updates in enumerate(tuner.steps(prompts[i : i + bs], **settings)):
            if k == 0 and first_token is None:
                first_token = time.perf_counter() - start
            tokens += len(updates)
    seconds = time.perf_counter() - t0
    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    out.put(
        {
            "system": system,
            "tokens": tokens,
            "seconds": seconds,
            "tok_s": tokens / seconds,
            "ttft_s": first_token,
            "load_s": load_s,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "peak_gpu_gib": gpu,
        }
    )


def run_child(target: Any, args: tuple[Any, ...], label: str) -> dict[str, Any]:
    """``target(*args, queue)`` in a fresh (spawned) process, so that its peak memory is its
    own; returns what it put on the queue. A child that dies ends the benchmark."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    while True:  # a child that dies must not leave us waiting forever
        try:
            result = queue.get(timeout=5)
            break
        except Empty:
            if not proc.is_alive():
                raise SystemExit(f"{label} failed (exit code {proc.exitcode})") from None
    proc.join()
    return result


def run(system: str, args: dict[str, Any]) -> dict[str, Any]:
    return run_child(measure, (system, args), f"the {system} run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=None, help="recipe file (default: embedded default)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = vars(parser.parse_args())
    results = [run(s, args) for s in ("base", "proxy")]
    base, proxy = results
    ratios = {
        "tok_s": proxy["tok_s"] / base["tok_s"],
        "peak_rss": proxy["peak_rss_gib"] / base["peak_rss_gib"],
    }
    machine = f"{platform.machine()} {platform.processor() or ''} {mp.cpu_count()} cores".strip()
    if args["json"]:
        print(
            json.dumps(
                {"machine": machine, "args": args, "results": results, "ratios": ratios}, indent=2
            )
        )
        return
    print(
        f"machine: {machine}; prompts={args['prompts']} batch={args['batch_size']} "
        f"new tokens={args['max_new_tokens']} (EOS ignored, greedy)"
    )
    print(f"{'system':8} {'tok/s':>8} {'TTFT s':>8} {'peak RSS GiB':>13} {'load s':>7}")
    for r in results:
        print(
            f"{r['system']:8} {r['tok_s']:8.2f} {r['ttft_s']:8.2f} "
            f"{r['peak_rss_gib']:13.2f} {r['load_s']:7.1f}"
        )
    print(f"proxy / base: speed x{ratios['tok_s']:.2f}, peak memory x{ratios['peak_rss']:.2f}")


if __name__ == "__main__":
    main()
