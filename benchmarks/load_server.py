"""Load benchmark of the OpenAI-compatible server: throughput and latency at 1, 4, 16 clients.

    .venv/bin/python benchmarks/load_server.py                      # tiny random models
    .venv/bin/python benchmarks/load_server.py --hidden 256 --layers 4
    .venv/bin/python benchmarks/load_server.py --recipe my.yaml      # real models
    .venv/bin/python benchmarks/load_server.py --url http://127.0.0.1:8000 --model default

Without ``--url`` it starts the server in this process on a free 127.0.0.1 port. It only ever
talks to loopback addresses, and every level is bounded: at most ``--requests`` requests and
``--max-seconds`` seconds. Each client streams completions back to back (greedy,
``ignore_eos``, ``--max-tokens`` tokens each) and records latency, time to first token and
tokens. Prints a Markdown table (``--json`` for one JSON object per level).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PROMPTS = [
    "The quick brown fox",
    "def add(a, b):",
    "Rain falls on the quiet town",
    "Once upon a time there was",
    "Question: what is two plus three? Answer:",
    "Lists, loops and functions",
]


@dataclass
class Level:
    clients: int
    wall_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0
    mean_batch_rows: float = 0.0

    def row(self) -> dict[str, Any]:
        done = len(self.latencies)
        ms = 1000.0
        return {
            "clients": self.clients,
            "requests": done,
            "errors": self.errors,
            "wall_s": round(self.wall_s, 2),
            "req_per_s": round(done / self.wall_s, 2) if self.wall_s else 0.0,
            "tok_per_s": round(self.tokens / self.wall_s, 1) if self.wall_s else 0.0,
            "latency_p50_ms": round(pct(self.latencies, 50) * ms),
            "latency_p90_ms": round(pct(self.latencies, 90) * ms),
            "latency_p99_ms": round(pct(self.latencies, 99) * ms),
            "ttft_p50_ms": round(pct(self.ttfts, 50) * ms),
            "ttft_p99_ms": round(pct(self.ttfts, 99) * ms),
            "mean_batch_rows": round(self.mean_batch_rows, 2),
        }


def pct(values: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank), 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def one_request(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], level: Level
) -> None:
    start = time.perf_counter()
    first = None
    tokens = 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                level.errors += 1
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    level.errors += 1
                    return
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif first is None:
                    first = time.perf_counter() - start
    except httpx.HTTPError:
        level.errors += 1
        return
    level.latencies.append(time.perf_counter() - start)
    level.ttfts.append(first if first is not None else level.latencies[-1])
    level.tokens += tokens


async def run_level(
    url: str, model: str | None, clients: int, args: argparse.Namespace, headers: dict[str, str]
) -> Level:
    level = Level(clients)
    budget = iter(range(args.requests))
    deadline = time.perf_counter() + args.max_seconds

    async def client_loop(k: int, client: httpx.AsyncClient) -> None:
        for i in budget:  # shared: the level stops after --requests in total
            if time.perf_counter() > deadline:
                return
            body = {
                "prompt": PROMPTS[(i + k) % len(PROMPTS)],
                "max_tokens": args.max_tokens,
                "ignore_eos": True,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if model:
                body["model"] = model
            await one_request(client, url, body, level)

    rows_before = scrape(url, headers)
    limits = httpx.Limits(max_connections=clients + 2)
    timeout = httpx.Timeout(args.max_seconds + 30)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(k, client) for k in range(clients)))
        level.wall_s = time.perf_counter() - t0
    rows_after = scrape(url, headers)
    steps = rows_after[1] - rows_before[1]
    level.mean_batch_rows = (rows_after[0] - rows_before[0]) / steps if steps else 0.0
    return level


def scrape(url: str, headers: dict[str, str]) -> tuple[float, float]:
    """``(sum, count)`` of the server's rows-per-step histogram."""
    text = httpx.get(f"{url}/metrics", headers=headers).text
    values = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for key in values:
            if line.startswith(f"proxytune_batch_rows_{key} "):
                values[key] = float(line.split()[-1])
    return values["sum"], values["count"]


def start_server(args: argparse.Namespace) -> tuple[str, str, Any]:
    """Serve tiny random models (or ``--recipe``) on a free loopback port in this process."""
    import torch
    import uvicorn

    from proxytune import ProxyTuner
    from proxytune.server import ServerSettings, create_app
    from proxytune.testing import save_tiny_model

    torch.set_num_threads(args.threads)
    if args.recipe:
        tuner = ProxyTuner.from_recipe(args.recipe)
        name = "recipe"
    else:
        root = tempfile.mkdtemp(prefix="proxytune-bench-")
        size = {"hidden": args.hidden, "layers": args.layers}
        paths = [save_tiny_model(f"{root}/{r}", seed=i, **size) for i, r in enumerate("bea")]
        tuner = ProxyTuner.from_pretrained(
            str(paths[0]), expert=str(paths[1]), anti_expert=str(paths[2]), device=args.device
        )
        name = "tiny"
    settings = ServerSettings(model_name=name, max_batch_size=args.max_batch_size)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(tuner, settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit("the server did not start")
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(30)

    return f"http://127.0.0.1:{port}", name, stop


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", help="An already running server (loopback only).")
    p.add_argument("--model", help="Model id to send (with --url).")
    p.add_argument("--api-key", default=os.environ.get("PROXYTUNE_API_KEY"))
    p.add_argument("--recipe", help="Serve this recipe instead of tiny random models.")
    p.add_argument("--hidden", type=int, default=32, help="Tiny models' hidden size.")
    p.add_argument("--layers", type=int, default=2, help="Tiny models' layers.")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the server.")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=48, help="Requests per level (at most).")
    p.add_argument("--max-seconds", type=float, default=60.0, help="Time per level (at most).")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--json", action="store_true", help="One JSON object per level.")
    args = p.parse_args(argv)

    stop = None
    if args.url:
        host = urlsplit(args.url).hostname
        if host not in LOOPBACK:
            p.error(f"--url must be a loopback address ({sorted(LOOPBACK)}), got {host!r}")
        url, model = args.url.rstrip("/"), args.model
    else:
        url, model, stop = start_server(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        httpx.post(  # warm-up
            f"{url}/v1/completions",
            json={"prompt": "x", "max_tokens": 2, **({"model": model} if model else {})},
            headers=headers,
            timeout=120,
        ).raise_for_status()
        levels = [asyncio.run(run_level(url, model, c, args, headers)) for c in args.concurrency]
    finally:
        if stop is not None:
            stop()
    rows = [level.row() for level in levels]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"machine: {machine()}")
    what = args.recipe or f"tiny random Llama x3 (hidden {args.hidden}, {args.layers} layers)"
    print(f"models: {what}; {args.max_tokens} tokens per request, greedy, streamed\n")
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---:" for _ in cols) + "|")
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
