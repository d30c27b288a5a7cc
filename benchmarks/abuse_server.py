"""Abuse battery for ``proxytune serve``: what hostile or careless clients send, and whether the
server answers each with the right 4xx, keeps its keep-alive connections, never stalls an
innocent request and drains cleanly on SIGTERM.

    .venv/bin/python benchmarks/abuse_server.py            # the full battery (a few minutes)
    .venv/bin/python benchmarks/abuse_server.py --quick    # a few cases per category (tests)

It starts ``proxytune serve`` on three tiny random models in a subprocess on a free loopback
port (its log goes to a temporary file), runs every category, stops the server with SIGTERM
and prints a table: category | tried | handled | defects, then the 5xx answers (the drain's
own 503s aside), tracebacks in the server log, an innocent request's latency alone and while
abusive requests run, and the server's peak RSS. A defect is a 5xx for a client error, a wrong
status, a dropped keep-alive connection, a request left running in ``/health``, an innocent
request slowed by others' content, a cut stream or a non-zero exit after a clean drain. Exit
status: 1 if any defect.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

C, CH = "/v1/completions", "/v1/chat/completions"
MAX_BODY = 256 * 1024  # the server's --max-body-bytes here
MAX_QUEUE, MAX_BATCH = 4, 8


@dataclass
class Outcome:
    tried: int = 0
    handled: int = 0
    defects: list[str] = field(default_factory=list)
    cases: list[str] = field(default_factory=list)


class Battery:
    """A running server, the answers it gave and the outcomes per category."""

    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log
        self.client = httpx.Client(base_url=url, timeout=60)  # one keep-alive connection
        self.statuses: list[int] = []
        self.outcomes: dict[str, Outcome] = {}
        self.innocent: dict[str, float] = {}

    # answers ------------------------------------------------------------------------------

    def send(self, method: str, path: str, **kw: Any) -> httpx.Response | str:
        """The response, or a string saying how the connection failed."""
        try:
            r = self.client.request(method, path, **kw)
        except httpx.HTTPError as err:
            return f"{type(err).__name__}: {err}"
        self.statuses.append(r.status_code)
        return r

    def expect(self, r: httpx.Response | str, want: set[int], words: str = "") -> str | None:
        """``None`` when ``r`` has a status in ``want`` (a 4xx with an OpenAI error body holding
        ``words``) and the keep-alive connection still answers; else the defect."""
        if isinstance(r, str):
            return f"no answer ({r})"
        if r.status_code not in want:
            return f"status {r.status_code} (want {sorted(want)}): {r.text[:160]}"
        if 400 <= r.status_code < 500:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                return f"status {r.status_code} without an OpenAI error body: {r.text[:120]}"
            if words not in message:
                return f"message {message[:160]!r} does not say {words!r}"
        after = self.send("GET", "/health")
        if isinstance(after, str) or after.status_code != 200:
            return f"the keep-alive connection failed after it ({after})"
        return None

    def record(self, category: str, defect: str | None, name: str) -> None:
        out = self.outcomes.setdefault(category, Outcome())
        out.tried += 1
        out.cases.append(name)
        if defect is None:
            out.handled += 1
        else:
            out.defects.append(f"{name}: {defect}")

    def idle(self, within: float = 10.0) -> str | None:
        """``None`` once ``/health`` shows nothing running or queued (phantoms are defects)."""
        deadline = time.monotonic() + within
        while True:
            body = httpx.get(f"{self.url}/health", timeout=10).json()
            if body["running"] == 0 and body["queued"] == 0:
                return None
            if time.monotonic() > deadline:
                return f"/health still shows {body} after {within:.0f} s"
            time.sleep(0.05)

    def innocent_among(self, bodies: list[dict[str, Any]], clients: int = 4) -> float:
        """The slowest of 3 innocent requests while ``clients`` threads send ``bodies`` back
        to back (the answers' statuses are counted)."""
        payloads = [json.dumps(body).encode() for body in bodies]  # once: the client is light
        stop = threading.Event()

        def hammer(k: int) -> None:
            with httpx.Client(base_url=self.url, timeout=60) as client:
                for i in itertools.count(k):
                    if stop.is_set():
                        return
                    r = client.post(C, **raw(payloads[i % len(payloads)]))
                    self.statuses.append(r.status_code)

        threads = [threading.Thread(target=hammer, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        try:
            return max(self.innocent_seconds() for _ in range(3))
        finally:
            stop.set()
            for t in threads:
                t.join(60)

    def innocent_seconds(self) -> float:
        """One ordinary request's latency (greedy, 8 tokens), through its own connection."""
        t0 = time.perf_counter()
        r = httpx.post(f"{self.url}{C}", json={"prompt": "Rain", "max_tokens": 8}, timeout=120)
        r.raise_for_status()
        return time.perf_counter() - t0


# the cases, per category --------------------------------------------------------------------


def rule(depth: int) -> bytes:
    """A ``plausible`` rule nested ``depth`` levels, as JSON (built as text: too deep for
    ``json.dumps``)."""
    return b'{"name": "plausible", "inner": ' * depth + b'{"name": "plausible"}' + b"}" * depth


def with_rule(depth: int, prompt: str = "x") -> bytes:
    return b'{"prompt": "' + prompt.encode() + b'", "max_tokens": 2, "rule": ' + rule(depth) + b"}"


def context(pattern: str) -> dict[str, Any]:
    return {"name": "context", "rules": [{"regex": pattern, "alpha": 1}]}


def raw(body: bytes, kind: str = "application/json") -> dict[str, Any]:
    return {"content": body, "headers": {"content-type": kind}}


def oversized(b: Battery, quick: bool) -> Iterator[tuple[str, str | None]]:
    big = json.dumps({"prompt": "a" * (MAX_BODY + 1)}).encode()
    yield "body over the limit", b.expect(b.send("POST", C, **raw(big)), {413}, "at most")

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(4 * MAX_BODY // 65536):
            yield b"a" * 65536
        yield b'"}'

    r = b.send("POST", C, content=chunks(), headers={"content-type": "application/json"})
    yield "chunked body over the limit", b.expect(r, {413}, "at most")
    yield "declared Content-Length of 1 TB", declared_length(b)
    near = {"prompt": "the " * (MAX_BODY // 4 - 100), "max_tokens": 4}
    yield "a prompt near the limit", b.expect(b.send("POST", C, json=near), {400}, "context")
    if not quick:
        for field_, value in (("n", 10**6), ("max_tokens", 10**9), ("logprobs", 10**6)):
            body = {"prompt": "x", field_: value}
            yield f"{field_}={value}", b.expect(b.send("POST", C, json=body), {400}, field_)


def declared_length(b: Battery) -> str | None:
    """A header promising 10**12 bytes, and none sent: 413 at once, nothing buffered."""
    host, port = b.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
            b"\r\nContent-Length: 1000000000000\r\n\r\n"
        )
        head = s.recv(4096).split(b"\r\n", 1)[0]
    b.statuses.append(int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else 0)
    return None if head.startswith(b"HTTP/1.1 413") else f"answered {head!r}"


def deep_json(b: Battery, quick: bool) -> Iterator[tuple[str, str | None]]:
    depths = (10_000,) if quick else (1_000, 10_000, 100_000)
    for depth in depths:
        body = b'{"prompt": "x", "rule": ' + b"[" * depth + b"]" * depth + b"}"
        yield f"JSON nested {depth} deep", b.expect(b.send("POST", C, **raw(body)), {400})
    cases: list[tuple[str, bytes, str]] = [
        ("an integer of 5000 digits", b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", ""),
        ("a lone surrogate in the prompt", b'{"prompt": "x\\ud800"}', "surrogate"),
        (
            "a lone surrogate in a message",
            b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
            "surrogate",
        ),
        ("bytes that are not UTF-8", b'{"prompt": "\xff\xfe"}', ""),
        ("truncated JSON", b'{"prompt": "x"', ""),
        ("a JSON array", b'["prompt"]', "object"),
        ("NaN temperature", b'{"prompt": "x", "temperature": NaN}', "temperature"),
    ]
    for name, body, words in cases[: 3 if quick else None]:
        path = CH if b"messages" in body else C
        yield name, b.expect(b.send("POST", path, **raw(body)), {400}, words)


def nested_rules(b: Battery, quick: bool) -> Iterator[tuple[str, str | None]]:
    for depth in (17, 300) if quick else (17, 50, 300, 3000):
        words = "rule" if depth < 500 else "nested too deeply"  # 3000: the JSON parser says so
        r = b.send("POST", C, **raw(with_rule(depth)))
        yield f"rule nested {depth} deep", b.expect(r, {400}, words)
    cases: list[tuple[str, Any, str]] = [
        ("a rule with 3000 entries", {"name": "tokens", "block": [1] * 3000}, "rule"),
        ("a rule name that is a list", {"name": ["plausible"]}, "rule"),
        ("an unknown rule", "no-such-rule", "rule"),
        ("a block-list of every token", {"name": "tokens", "block": list(range(300))}, "token"),
        ("a bias of 1.7e308", {"name": "tokens", "bias": {"5": 1.7e308}}, "bias"),
    ]
    for name, value, words in cases[: 2 if quick else None]:
        body = {"prompt": "x", "max_tokens": 2, "rule": value}
        yield name, b.expect(b.send("POST", C, json=body), {400}, words)
    if not quick:
        body = {"prompt": "x", "max_tokens": 2, "temperature": 1e-39}
        yield "temperature 1e-39", b.expect(b.send("POST", C, json=body), {400}, "temperature")


REDOS = [  # the first runs past the 0.1 s budget (400); the engine matches the others in time
    ("(a|aa)+$", "a" * 40 + "!"),
    ("(a+)+$", "a" * 26 + "!"),
    ("(x+x+)+y", "x" * 40),
    ("^(([a-z])+.)+[A-Z]([a-z])+$", "a" * 30 + "!"),
]


def redos(b: Battery, quick: bool) -> Iterator[tuple[str, str | None]]:
    for pattern, prompt in REDOS[: 2 if quick else None]:
        body = {"prompt": prompt, "max_tokens": 2, "rule": context(pattern)}
        t0 = time.perf_counter()  # matched in time (200) or refused naming the rule (400)
        r = b.send("POST", C, json=body)
        words = "regex" if not isinstance(r, str) and r.status_code == 400 else ""
        defect = b.expect(r, {200, 400}, words)
        took = time.perf_counter() - t0
        if defect is None and took > 2.0:
            defect = f"answered after {took:.1f} s"
        answer = r if isinstance(r, str) else r.status_code
        yield f"regex {pattern} on {len(prompt)} chars ({answer})", defect
    body = {"prompt": "x", "max_tokens": 2, "rule": context("(")}
    yield "a regex that does not compile", b.expect(b.send("POST", C, json=body), {400}, "regex")


def content_types(b: Battery, quick: bool) -> Iterator[tuple[str, str | None]]:
    body = b'{"prompt": "x", "max_tokens": 2}'
    kinds = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x"]
    for kind in kinds[: 1 if quick else None]:
        yield kind, b.expect(b.send("POST", C, **raw(body, kind)), {415}, "JSON")
    r = b.send("POST", C, content=body, headers={"host": "evil.example"})
    yield "a foreign Host", b.expect(r, {403}, "Host")
    if not quick:
        yield "no content type", b.expect(b.send("POST", C, content=body), {200, 415})
        r = b.send("POST", C, **raw(body, "application/xml"))
        yield "application/xml", b.expect(r, {200, 415})
        yield "GET on a POST route", b.expect(b.send("GET", C), {405})
        yield "an unknown route", b.expect(b.send("POST", "/v1/nothing", json={}), {404})


def phantom_cancels(b: Battery, quick: bool) -> Iterator[tuple[str, str | None]]:
    long = {"prompt": "x", "max_tokens": 230, "n": 4, "ignore_eos": True}  # seconds of work
    for give_up in (0.1, 0.4) if quick else (0.05, 0.1, 0.15, 0.25, 0.4, 0.6, 0.8, 1.0):
        try:
            httpx.post(f"{b.url}{C}", json=long, timeout=give_up)
            defect: str | None = "the request finished before the client gave up"
        except httpx.TimeoutException:
            defect = b.idle()
        yield f"a client that gives up after {give_up} s", defect
    for _ in range(1 if quick else 4):
        with httpx.stream("POST", f"{b.url}{C}", json={**long, "stream": True}) as r:
            next(r.iter_lines())  # the first chunk, then the client leaves
        yield "a stream left after its first chunk", b.idle()


def load(b: Battery, quick: bool) -> Iterator[tuple[str, str | None]]:
    """A flood past the queue (429 with Retry-After, every accepted stream whole), then an
    innocent request timed alone and while abusive requests keep arriving."""
    flood = MAX_BATCH + MAX_QUEUE + (2 if quick else 8)
    answers: list[str | None] = [None] * flood

    def streamer(i: int) -> None:
        body = {"prompt": "x", "max_tokens": 24, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", f"{b.url}{C}", json=body, timeout=120) as r:
                b.statuses.append(r.status_code)
                if r.status_code == 429:
                    answers[i] = None if r.headers.get("retry-after") else "429 without Retry-After"
                    return
                lines = [line for line in r.iter_lines() if line]
                whole = r.status_code == 200 and lines and lines[-1] == "data: [DONE]"
                answers[i] = None if whole else f"status {r.status_code}, ends {lines[-1:]}"
        except httpx.HTTPError as err:
            answers[i] = f"no answer ({type(err).__name__})"

    threads = [threading.Thread(target=streamer, args=(i,)) for i in range(flood)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for i, answer in enumerate(answers):
        yield f"flood request {i}", answer
    yield "the flood leaves nothing running", b.idle(30)
    alone = min(b.innocent_seconds() for _ in range(3))
    valid = [{"prompt": "hello there", "max_tokens": 1}]  # the reference: cheap, valid
    abusive = [
        {"prompt": REDOS[0][1], "rule": context(REDOS[0][0]), "max_tokens": 2},
        {"prompt": "x", "rule": json.loads(rule(300)), "max_tokens": 2},
        {"prompt": "the " * (MAX_BODY // 4 - 100), "max_tokens": 2},
        {"prompt": "x", "rule": {"name": "tokens", "block": list(range(300))}, "max_tokens": 2},
    ]
    among_valid = b.innocent_among(valid)
    among_abusive = b.innocent_among(abusive)
    b.innocent = {
        "alone_ms": alone * 1000,
        "among_valid_ms": among_valid * 1000,
        "among_abusive_ms": among_abusive * 1000,
    }
    slowed = among_abusive > 3 * among_valid + 0.5
    took = f"took {among_abusive:.2f} s, {among_valid:.2f} s among as many valid requests"
    yield "an innocent request among abusive ones", took if slowed else None


def shutdown(b: Battery, quick: bool) -> Iterator[tuple[str, str | None]]:
    """SIGTERM mid-stream: 503 while draining, the stream runs to [DONE], exit status 0."""
    body = {"prompt": "x", "max_tokens": 120, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{b.url}{C}", json=body, timeout=120) as r:
        lines = r.iter_lines()
        next(lines)
        b.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while (health := httpx.get(f"{b.url}/health")).status_code == 200:
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        ok = health.status_code == 503 and "retry-after" in health.headers
        yield "/health while draining", None if ok else f"{health.status_code} {health.text}"
        late = httpx.post(f"{b.url}{C}", json={"prompt": "y", "max_tokens": 2})  # 503: meant
        yield "a new request while draining", None if late.status_code == 503 else late.text
        rest = [line for line in lines if line]
    yield "the open stream ends whole", None if rest[-1:] == ["data: [DONE]"] else str(rest[-2:])
    code = b.proc.wait(60)
    yield "exit status after a clean drain", None if code == 0 else f"exit status {code}"


CATEGORIES: list[tuple[str, Callable[[Battery, bool], Iterator[tuple[str, str | None]]]]] = [
    ("oversized bodies", oversized),
    ("deep or broken JSON", deep_json),
    ("nested and hostile rules", nested_rules),
    ("ReDoS regexes", redos),
    ("content types and hosts", content_types),
    ("phantom cancels", phantom_cancels),
    ("load and an innocent request", load),
    ("SIGTERM drain", shutdown),
]


# the server ---------------------------------------------------------------------------------


def start_server(root: Path) -> tuple[str, subprocess.Popen[bytes], Path]:
    from proxytune.testing import save_tiny_model

    paths = [save_tiny_model(root / r, seed=i) for i, r in enumerate(("base", "exp", "anti"))]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "proxytune.cli", "serve", "--base", str(paths[0])]
    cmd += ["--expert", str(paths[1]), "--anti-expert", str(paths[2]), "--device", "cpu"]
    cmd += ["--dtype", "float32", "--port", str(port), "--max-body-bytes", str(MAX_BODY)]
    cmd += ["--max-queue", str(MAX_QUEUE), "--max-batch-size", str(MAX_BATCH)]
    log = root / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server did not start:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return url, proc, log
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not answer within 120 s")
        time.sleep(0.1)


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (Linux ``VmHWM``), 0 where unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run(quick: bool) -> dict[str, Any]:
    """Start a server, run every category, stop it; the report as one dict."""
    with tempfile.TemporaryDirectory(prefix="proxytune-abuse-") as tmp:
        url, proc, log = start_server(Path(tmp))
        b = Battery(url, proc, log)
        rss = 0.0
        try:
            for category, cases in CATEGORIES:
                if category == "SIGTERM drain":
                    rss = peak_rss_mb(proc.pid)
                for name, defect in cases(b, quick):
                    b.record(category, defect, name)
        finally:
            b.client.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        text = log.read_text(errors="replace")
    return {
        "categories": {k: vars(v) for k, v in b.outcomes.items()},
        "status_5xx": sum(s >= 500 for s in b.statuses),
        "tracebacks": text.count("Traceback"),
        "innocent": b.innocent,
        "peak_rss_mb": round(rss),
        "log_tail": text[-2000:] if "Traceback" in text else "",
    }


def table(report: dict[str, Any]) -> str:
    lines = ["| category | tried | handled | defects |", "|---|---:|---:|---:|"]
    for name, out in report["categories"].items():
        lines.append(f"| {name} | {out['tried']} | {out['handled']} | {len(out['defects'])} |")
    innocent = report["innocent"]
    lines += [
        "",
        f"5xx answers: {report['status_5xx']}; tracebacks in the server log: "
        f"{report['tracebacks']}; an innocent request (8 tokens): "
        f"{innocent.get('alone_ms', 0):.0f} ms alone, {innocent.get('among_valid_ms', 0):.0f} ms "
        f"among 4 clients of valid 1-token requests, {innocent.get('among_abusive_ms', 0):.0f} "
        f"ms among 4 clients of abusive ones; server peak RSS: {report['peak_rss_mb']} MB",
    ]
    for name, out in report["categories"].items():
        lines += [f"defect ({name}): {d}" for d in out["defects"]]
    return "\n".join(lines)


def defects(report: dict[str, Any]) -> int:
    found = sum(len(out["defects"]) for out in report["categories"].values())
    return found + report["status_5xx"] + report["tracebacks"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="A few cases per category.")
    p.add_argument("--json", help="Also write the report to this file.")
    args = p.parse_args(argv)
    report = run(args.quick)
    print(table(report))
    if report["log_tail"]:
        print("\nserver log (end):\n" + report["log_tail"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 1 if defects(report) else 0


if __name__ == "__main__":
    sys.exit(main())
