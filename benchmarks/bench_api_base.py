"""What a token costs through an API base, and what a top-k base changes, on loopback.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_api_base.py --prompts 20 --tokens 32

The base runs in this project's own server (``create_app`` on 127.0.0.1, a thread of this
process); the pair is local. Tiny random models over the byte-level BPE test tokenizer (300
tokens); the expert is the anti-expert with ``0.1 * N(0, 1)`` added to its head (a "near"
pair, as in docs/black-box.md). Greedy, EOS ignored, every prompt in one ``generate``.

Table 1 (cost, k = V): calls, request+response body bytes and wall ms per generated token for
the id path and the text path, token by token (chunk 1) and with chunked agreement (auto), and
whether the output equals local proxy-tuning. Table 2 (top-k): greedy agreement with the
full-vocabulary base (k = V) at k = 20 and k = 5: tokens equal up to the first divergence, and
the first divergence position.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serving import serve_in_thread

from proxytune import ProxyTuner
from proxytune.backends.api import APIModel, APISpec
from proxytune.backends.hf import HFModel
from proxytune.engine import Member, Pair
from proxytune.engine.blackbox import BlackBoxStats
from proxytune.server import ServerSettings, create_app
from proxytune.testing import CORPUS, build_model, build_tokenizer


class Counting(httpx.HTTPTransport):
    """An httpx transport that counts request and response body bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.bytes += len(request.read())
        response = super().handle_request(request)
        self.bytes += len(response.read())
        return response


def models() -> tuple[Any, dict[str, HFModel]]:
    tok = build_tokenizer(300)
    anti = build_model(tok, seed=2)
    expert = build_model(tok, seed=2)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        head = expert.get_output_embeddings().weight
        head.add_(0.1 * torch.randn(head.shape, generator=g))
    built = {"base": build_model(tok, seed=0), "expert": expert, "anti": anti}
    return tok, {n: HFModel(m, tok, name=n) for n, m in built.items()}


def prompts(n: int) -> list[str]:
    """``n`` distinct prompts: the first words of corpus lines, shifted."""
    lines = list(dict.fromkeys(CORPUS))
    return [" ".join(lines[i % len(lines)].split()[: 2 + i // len(lines)]) for i in range(n)]


def run(url: str, tok: Any, m: dict[str, HFModel], texts: list[str], tokens: int, **spec: Any):
    transport = Counting()
    api = APIModel(APISpec(url=url, model="base", **spec), tok, transport=transport)
    pair = Pair(Member("expert[0]", m["expert"]), Member("anti_expert[0]", m["anti"]))
    tuner = ProxyTuner(Member("base", api), [pair])
    stats = BlackBoxStats()
    started = time.perf_counter()
    out = tuner.generate(texts, max_new_tokens=tokens, ignore_eos=True, stats=stats)
    seconds = time.perf_counter() - started
    made = sum(len(r.token_ids) for r in out)
    cost = {
        "calls/token": stats.api.calls / made,
        "bytes/token": transport.bytes / made,
        "ms/token": 1000 * seconds / made,
        "path": api.prompt_path,
    }
    return [r.token_ids for r in out], cost


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "unused")
    torch.set_num_threads(1)
    tok, m = models()
    texts = prompts(args.prompts)
    vocab = len(tok)
    pair = Pair(Member("expert[0]", m["expert"]), Member("anti_expert[0]", m["anti"]))
    local = ProxyTuner(Member("base", m["base"]), [pair])
    want = [
        r.token_ids for r in local.generate(texts, max_new_tokens=args.tokens, ignore_eos=True)
    ]
    served = ProxyTuner(Member("base", m["base"]))
    settings = ServerSettings(model_name="base", max_top_logprobs=vocab, max_batch_size=64)
    with serve_in_thread(create_app(served, settings)) as root:
        url = f"{root}/v1"
        print(f"{args.prompts} prompts x {args.tokens} tokens, vocabulary {vocab}, k = V\n")
        print("| prompts per call | prompt path | chunk | calls/token | bytes/token | ms/token "
              "| = local |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for per_call in (None, 1):
            for path in ("tokens", "text"):
                for chunk in (1, "auto"):
                    got, c = run(
                        url, tok, m, texts, args.tokens, top_logprobs=vocab, prompt_as=path,
                        chunk=chunk, prompt="raw", max_prompts=per_call,
                    )  # fmt: skip
                    same = sum(g == w for g, w in zip(got, want, strict=True))
                    print(
                        f"| {per_call or 'all'} | {c['path']} | {chunk} | {c['calls/token']:.3f}"
                        f" | {c['bytes/token']:.0f} | {c['ms/token']:.1f} | {same}/{len(want)} |"
                    )
        full, _ = run(url, tok, m, texts, args.tokens, top_logprobs=vocab, prompt="raw")
        print("\n| k | tokens equal to k = V (before the first divergence) | prompts equal "
              "| first divergence (median, min) | bytes/token |")  # fmt: skip
        print("|---|---|---|---|---|")
        for k in (20, 5):
            got, c = run(url, tok, m, texts, args.tokens, top_logprobs=k, prompt="raw")
            firsts = [first_divergence(g, f) for g, f in zip(got, full, strict=True)]
            kept = sum(args.tokens if d is None else d for d in firsts)
            diverged = sorted(d for d in firsts if d is not None)
            where = f"{diverged[len(diverged) // 2]}, {diverged[0]}" if diverged else "-"
            print(
                f"| {k} | {100 * kept / (args.tokens * len(texts)):.1f}% "
                f"| {firsts.count(None)}/{len(texts)} | {where} | {c['bytes/token']:.0f} |"
            )


if __name__ == "__main__":
    main()
