"""How often the plain formula chooses outside the base's top k, and whether candidate scoring
changes ``rerank``'s tokens.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_candidates.py --prompts 32 \\
        --max-new-tokens 24 --k 10

The prompts: the speed benchmarks' eight, then HumanEval's, as many as ``--prompts`` asks for.
Every step of greedy proxy-tuning (the recipe's pairs and alphas, ``proxy`` rule) records
whether the token it chose is among the base's ``k`` most likely, and the proxy-tuned
distribution's mass outside them (temperature 1). Then ``rerank`` (top ``k``) runs with and
without candidate scoring; the rows whose tokens agree are counted. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path
from typing import Any

import torch
from bench_generate import PROMPTS

from proxytune.rules import top_k_mask

HUMANEVAL = Path(__file__).resolve().parent.parent / "src/proxytune/evaluation/data"


def prompts(n: int) -> list[str]:
    """The first ``n`` of the speed benchmarks' prompts, then HumanEval's."""
    with gzip.open(HUMANEVAL / "humaneval.jsonl.gz", "rt") as f:
        extra = [json.loads(line)["prompt"] for line in f]
    return (PROMPTS + extra)[:n]


def outside_top_k(
    scores: torch.Tensor, base: torch.Tensor, k: int
) -> tuple[list[bool], list[float]]:
    """Per row: whether ``argmax scores`` is outside the base's top ``k``, and the mass
    ``softmax(scores)`` puts outside them."""
    inside = top_k_mask(base, k)  # the rerank rule's own candidates
    picked = scores.argmax(dim=-1, keepdim=True)
    out = ~inside.gather(-1, picked).squeeze(-1)
    mass = torch.softmax(scores.float(), dim=-1).masked_fill(inside, 0.0).sum(dim=-1)
    return out.tolist(), mass.tolist()


def main() -> None:
    from proxytune import ProxyTuner
    from proxytune.arithmetic import combine_proxy
    from proxytune.recipe import default_recipe_path, load_recipe

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=None, help="default: the embedded default")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--k", type=int, default=10, help="the rerank rule's k (its default)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    recipe = load_recipe(args.recipe or default_recipe_path(), backend="llamacpp")
    tuner = ProxyTuner.from_recipe(recipe, overlap=False)
    chosen_outside: list[bool] = []
    masses: list[float] = []

    def recording_proxy(ctx: Any) -> torch.Tensor:
        scores = combine_proxy(ctx.base, *ctx.ran())
        out, mass = outside_top_k(scores, ctx.base, args.k)
        chosen_outside.extend(out)
        masses.extend(mass)
        return scores

    texts = prompts(args.prompts)
    settings = {"max_new_tokens": args.max_new_tokens}
    batches = [texts[i : i + args.batch_size] for i in range(0, len(texts), args.batch_size)]
    for batch in batches:
        tuner.generate(batch, rule=recording_proxy, **settings)
    rerank = {"name": "rerank", "k": args.k}
    ids, seconds = {}, {}
    for on in (False, True):
        t = tuner.with_options(candidates=on)
        t0 = time.perf_counter()
        ids[on] = [r.token_ids for b in batches for r in t.generate(b, rule=rerank, **settings)]
        seconds[on] = time.perf_counter() - t0
    steps = len(chosen_outside)
    print(
        json.dumps(
            {
                "prompts": len(texts),
                "steps": steps,
                "k": args.k,
                "proxy_greedy_outside_top_k": sum(chosen_outside) / steps,
                "proxy_greedy_outside_top_k_steps": sum(chosen_outside),
                "proxy_mass_outside_top_k_mean": sum(masses) / steps,
                "rerank_rows_equal_with_candidates": sum(
                    a == b for a, b in zip(ids[False], ids[True], strict=True)
                ),
                "rerank_rows": len(ids[True]),
                "rerank_seconds_full_vs_candidates": [seconds[False], seconds[True]],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
