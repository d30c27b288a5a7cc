"""Cost of one llama.cpp decode step per GGUF file and row count: what bounds proxy-tuning.

    .venv/bin/python benchmarks/bench_gguf_step.py              # the embedded models' GGUFs
    .venv/bin/python benchmarks/bench_gguf_step.py a.gguf b.gguf --rows 1 2 8 --steps 32

A proxy-tuned step of the embedded default is one decode of the base (1.5B, one row per
prompt) and one of the pair (0.5B, two rows per prompt: expert and anti-expert), so these
figures bound its speed against the base alone: at batch 1, base(1) / (base(1) + small(2)).
Per file: milliseconds per greedy decode step with 1, 2, ... rows (each row a sequence of one
context, after a short prefill and three warm-up steps), and per verification of K positions
of one row in one decode (what speculative decoding asks of the verifying models; rolled back
after each). All in one process, one after the other: compare only within one run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from proxytune.backends.llamacpp import LlamaCppModel
from proxytune.embedded import EMBEDDED_MODELS, embedded_gguf

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


def main() -> None:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="GGUF files (default: embedded)")
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 8])
    parser.add_argument("--positions", nargs="+", type=int, default=[1, 2, 5])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    files = args.files or [embedded_gguf(name) for name in EMBEDDED_MODELS]
    heads = [f"{n} rows (ms)" for n in args.rows]
    heads += [f"verify {k} (ms)" for k in args.positions]
    print("| file | " + " | ".join(heads) + " |")
    print("|---|" + "---|" * len(heads))
    for path in files:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent))
        model = LlamaCppModel(path, tokenizer, path.parent.name, threads=args.threads)
        ids = tokenizer(PROMPT)["input_ids"]
        cells = [f"{step_ms(model, ids, n, args.steps):.3g}" for n in args.rows]
        cells += [f"{verify_ms(model, ids, k, args.steps):.3g}" for k in args.positions]
        print(f"| {path.parent.name} | " + " | ".join(cells) + " |", flush=True)
        del model


if __name__ == "__main__":
    main()
