"""Cost of one llama.cpp decode step per GGUF file and row count: what bounds proxy-tuning.

    .venv/bin/python benchmarks/bench_gguf_step.py              # the embedded models' GGUFs
    .venv/bin/python benchmarks/bench_gguf_step.py a.gguf b.gguf --rows 1 2 8 --steps 32

A proxy-tuned step of the embedded default is one decode of the base (1.5B, one row per
prompt) and one of the pair (0.5B, two rows per prompt: expert and anti-expert), so these
figures bound its speed against the base alone: at batch 1, base(1) / (base(1) + small(2)).
Per file: milliseconds per greedy decode step with 1, 2, ... rows (each row a sequence of one
context, after a short prefill and three warm-up steps), and per verification of K positions
of one row in one decode (what speculative decoding asks of the verifying models; rolled back
after each), at each ``--threads`` count. ``--together R1 R2 ...`` also times the files decoding
R1, R2, ... rows each, one after the other and at once (one Python thread per file, as
``overlap`` runs them) at each thread count per file: what decides how ``overlap`` splits the
cores. Every figure is the median of ``--rounds`` rounds that take the settings in turn, so a
changing load on a shared machine falls on all of them alike. All in one process: compare only
within one run.

    .venv/bin/python benchmarks/bench_gguf_step.py --threads 1 2 --rows 1 2 --positions \
        --together 1 2 --steps 16 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from proxytune.backends.llamacpp import LlamaCppModel
from proxytune.embedded import EMBEDDED_MODELS, embedded_gguf
from proxytune.engine.overlap import run_grouped

PROMPT = "def fibonacci(n):\n    "


def step_ms(model: LlamaCppModel, ids: list[int], rows: int, steps: int) -> float:
    """Milliseconds per greedy step of ``rows`` rows."""
    state, logits = model.start([ids] * rows)
    token = logits.argmax(-1, keepdim=True)
    for _ in range(3):  # warm-up
        token = state.advance(token)[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(steps):
        token = state.advance(token)[:, -1].argmax(-1, keepdim=True)
    return (time.perf_counter() - start) / steps * 1000


def verify_ms(model: LlamaCppModel, ids: list[int], positions: int, steps: int) -> float:
    """Milliseconds per decode of ``positions`` positions of one row, each rolled back."""
    state, logits = model.start([ids])
    block = logits.argmax(-1, keepdim=True).repeat(1, positions)
    drop = torch.tensor([positions])
    for _ in range(3):  # warm-up
        state.advance(block)
        state.rollback(drop)
    start = time.perf_counter()
    for _ in range(steps):
        state.advance(block)
        state.rollback(drop)
    return (time.perf_counter() - start) / steps * 1000


def together_ms(
    models: list[LlamaCppModel], ids: list[list[int]], rows: list[int], steps: int, at_once: bool
) -> float:
    """Milliseconds per greedy step of every model (``rows`` rows each), one after the other or
    at once (one thread per model)."""
    started = [m.start([i] * n) for m, i, n in zip(models, ids, rows, strict=True)]
    states = [s for s, _ in started]
    tokens = [logits.argmax(-1, keepdim=True) for _, logits in started]

    def step() -> None:
        calls = [
            (m, lambda s=s, t=t: s.advance(t)[:, -1].argmax(-1, keepdim=True))
            for m, s, t in zip(models, states, tokens, strict=True)
        ]
        tokens[:] = run_grouped(calls, overlap=at_once)

    for _ in range(3):  # warm-up
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1000


def medians(settings: list[tuple[object, Callable[[], float]]], rounds: int) -> dict[object, float]:
    """The median of ``rounds`` timings of each setting, the settings taken in turn."""
    times: dict[object, list[float]] = {key: [] for key, _ in settings}
    for _ in range(rounds):
        for key, run in settings:
            times[key].append(run())
    return {key: statistics.median(t) for key, t in times.items()}


def file_ms(model: LlamaCppModel, ids: list[int], args: argparse.Namespace) -> dict[object, float]:
    """One file's step and verification times per thread count: ``(threads, "rows", n)`` and
    ``(threads, "verify", k)``."""

    def timed(threads: int, kind: str, n: int) -> float:
        model.use_threads(threads)
        if kind == "rows":
            return step_ms(model, ids, n, args.steps)
        return verify_ms(model, ids, n, args.steps)

    settings: list[tuple[object, Callable[[], float]]] = [
        ((t, kind, n), lambda t=t, kind=kind, n=n: timed(t, kind, n))
        for t in args.threads
        for kind, counts in (("rows", args.rows), ("verify", args.positions))
        for n in counts
    ]
    return medians(settings, args.rounds)


def main() -> None:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="GGUF files (default: embedded)")
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 8])
    parser.add_argument("--positions", nargs="*", type=int, default=[1, 2, 5])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", nargs="+", type=int, default=[2])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--together", nargs="*", type=int, default=[], metavar="ROWS")
    args = parser.parse_args()
    files = args.files or [embedded_gguf(name) for name in EMBEDDED_MODELS]
    if args.together and len(args.together) != len(files):
        parser.error(f"--together needs one row count per file ({len(files)})")
    heads = [f"{n} rows (ms)" for n in args.rows]
    heads += [f"verify {k} (ms)" for k in args.positions]
    print("| file | threads | " + " | ".join(heads) + " |")
    print("|---|---|" + "---|" * len(heads))
    models, prompts = [], []
    for path in files:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent))
        model = LlamaCppModel(path, tokenizer, path.parent.name, threads=max(args.threads))
        ids = tokenizer(PROMPT)["input_ids"]

        ms = file_ms(model, ids, args)
        for t in args.threads:
            cells = [f"{ms[t, 'rows', n]:.3g}" for n in args.rows]
            cells += [f"{ms[t, 'verify', k]:.3g}" for k in args.positions]
            print(f"| {path.parent.name} | {t} | " + " | ".join(cells) + " |", flush=True)
        if args.together:
            models.append(model)
            prompts.append(ids)
        else:
            del model
    if args.together:
        print_together(models, prompts, args)


def print_together(
    models: list[LlamaCppModel], ids: list[list[int]], args: argparse.Namespace
) -> None:
    """The table of the files decoding one after the other and at once, per thread count."""

    def run(threads: int, at_once: bool) -> float:
        for m in models:
            m.use_threads(threads)
        return together_ms(models, ids, args.together, args.steps, at_once)

    settings: list[tuple[object, Callable[[], float]]] = [
        ((t, at_once), lambda t=t, a=at_once: run(t, a))
        for t in args.threads
        for at_once in (False, True)
    ]
    ms = medians(settings, args.rounds)
    what = " + ".join(f"{m.name} ({n})" for m, n in zip(models, args.together, strict=True))
    print(f"\n| {what} | threads per file | ms per step |\n|---|---|---|")
    for t in args.threads:
        for at_once in (False, True):
            how = "at once" if at_once else "one after the other"
            print(f"| {how} | {t} | {ms[t, at_once]:.3g} |", flush=True)


if __name__ == "__main__":
    main()
