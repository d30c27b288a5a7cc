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
request slowed by others' content, a slow connection left open past its deadline, an admin
action that leaves the server failing requests, a cut stream or a non-zero exit after a clean
drain. The admin API is tried on a second server (an API key, a model root). Exit status: 1 if
any defect.
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
READ_TIMEOUT = 2.0  # the server's --header-timeout and --body-timeout here (seconds)
MAX_CONNECTIONS = 32  # its --max-client-connections
KEY = "abuse-key"  # the admin server's --api-key


@dataclass
class Outcome:
    tried: int = 0
    handled: int = 0
    defects: list[str] = field(default_factory=list)
    cases: list[str] = field(default_factory=list)


class Battery:
    """A running server, the answers it gave and the outcomes per category."""

    def __init__(
        self,
        url: str,
        proc: subprocess.Popen[bytes],
        log: Path,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.url, self.proc, self.log = url, proc, log
        self.client = httpx.Client(base_url=url, timeout=60, headers=headers)  # one keep-alive
        self.statuses: list[int] = []
        self.outcomes: dict[str, Outcome] = {}
        self.innocent: dict[str, float] = {}
        self.other_logs: list[str] = []
        """The logs of the other servers a category started (their tracebacks count)."""

    # answers ------------------------------------------------------------------------------

    def send(self, method: str, path: str, **kw: Any) -> httpx.Response | str:
        """The response, or a string saying how the connection failed."""
        try:
            r = self.client.request(method, path, **kw)
        except httpx.HTTPError as err:
            return f"{type(err).__name__}: {err}"
        self.statuses.append(r.status_code)
        return r

    def expect(
        self,
        r: httpx.Response | str,
        want: set[int],
        words: str = "",
        param: str | None = None,
    ) -> str | None:
        """``None`` when ``r`` has a status in ``want`` (a 4xx with an OpenAI error body holding
        ``words``, naming ``param`` where given) and the keep-alive connection still answers;
        else the defect."""
        if isinstance(r, str):
            return f"no answer ({r})"
        if r.status_code not in want:
            return f"status {r.status_code} (want {sorted(want)}): {r.text[:160]}"
        if 400 <= r.status_code < 500:
            try:
                error = r.json()["error"]
                message = error["message"]
            except (ValueError, KeyError, TypeError):
                return f"status {r.status_code} without an OpenAI error body: {r.text[:120]}"
            if words not in message:
                return f"message {message[:160]!r} does not say {words!r}"
            if param is not None and error.get("param") != param:
                return f"param {error.get('param')!r}, not {param!r}: {message[:120]!r}"
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


MIXTURE = "in [0, 1]"
RULE_BOUNDS: list[tuple[str, dict[str, Any], str, str]] = [  # issue 28: (name, body, param, words)
    ("mixture alpha 1.5", {"rule": "mixture", "alpha": 1.5}, "alpha", MIXTURE),
    ("mixture alpha -0.1", {"rule": "mixture", "alpha": -0.1}, "alpha", MIXTURE),
    ("mixture alpha 100", {"rule": "mixture", "alpha": 100}, "alpha", MIXTURE),
    ("mixture alpha -100", {"rule": "mixture", "alpha": -100}, "alpha", MIXTURE),
    (
        "mixture alpha scheduled 0 -> 5",
        {"rule": "mixture", "alpha": {"schedule": "linear", "start": 0, "end": 5, "steps": 3}},
        "alpha",
        MIXTURE,
    ),
    (
        "product expert temperature 1e-300",
        {"rule": {"name": "product", "temperatures": {"expert": 1e-300}}},
        "rule.temperatures['expert']",
        "[0.0001,",
    ),
    (
        "proxy base temperature 1e-320",
        {"rule": {"name": "proxy", "temperatures": {"base": 1e-320}}},
        "rule.temperatures['base']",
        "[0.0001,",
    ),
    (
        "a temperature of 1e300",
        {"rule": {"name": "proxy", "temperatures": {"anti_expert": 1e300}}},
        "rule.temperatures['anti_expert']",
        "10000.0]",
    ),
    (
        "context rules[].alpha 1e300",
        {"rule": {"name": "context", "rules": [{"keyword": "x", "alpha": 1e300}]}},
        "rule.rules[0].alpha",
        "[-100.0, 100.0]",
    ),
]


def rule_bounds(b: Battery, quick: bool) -> Iterator[tuple[str, str | None]]:
    """Settings past a rule's own bounds: a 400 naming the field, before the request is
    queued (so a stream gets the 400 too, not a 200 whose events end in an error)."""
    for name, extra, param, words in RULE_BOUNDS[:: 3 if quick else 1]:
        body = {"prompt": "hi", "max_tokens": 3, **extra}
        yield name, b.expect(b.send("POST", C, json=body), {400}, words, param)
    body = {"prompt": "hi", "max_tokens": 3, "rule": "mixture", "alpha": 1.5, "stream": True}
    yield (
        "a stream with mixture alpha 1.5",
        b.expect(b.send("POST", C, json=body), {400}, "", "alpha"),
    )
    infinity = b'{"prompt": "hi", "max_tokens": 3, "repetition_penalty": Infinity}'
    r = b.send("POST", C, **raw(infinity))
    yield "repetition_penalty Infinity", b.expect(r, {400}, "finite", "repetition_penalty")


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


HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
SLOW = {  # what a slow client sends, then nothing more
    "a partial head": HEAD,
    "a partial body": HEAD + b'Content-Length: 100\r\n\r\n{"prompt": ',
    "a chunk size of 16 MiB and 3 bytes": HEAD + b"Transfer-Encoding: chunked\r\n\r\nFFFFFF\r\nabc",
    "chunked with no final chunk": HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
}


def slow_answers(b: Battery, payloads: list[bytes]) -> list[tuple[bytes, float]]:
    """Open one connection per payload at once, send it, then read until the server closes:
    each answer's first line and when the connection closed (seconds after the last one
    opened). A connection still open past the deadline and a margin is answered b"open"."""
    host, port = b.url.removeprefix("http://").split(":")
    margin = READ_TIMEOUT + 8
    socks = []
    for payload in payloads:
        s = socket.create_connection((host, int(port)), timeout=margin)
        s.sendall(payload)
        socks.append(s)
    opened = time.monotonic()
    out = []
    for s in socks:
        got = b""
        with s:
            try:
                while chunk := s.recv(65536):
                    got += chunk
            except TimeoutError:
                got = b"open"
            except ConnectionResetError:
                pass  # closed while its payload was still unread: closed all the same
        head = got.split(b"\r\n", 1)[0]
        b.statuses.append(int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else 0)
        out.append((head, time.monotonic() - opened))
    return out


def slow_clients(b: Battery, quick: bool) -> Iterator[tuple[str, str | None]]:
    """Connections whose head or body never completes get a 408 and are closed within the
    server's deadline; past the per-client cap, one more gets a 429 at once."""
    bound = READ_TIMEOUT + 3  # the deadline, and a margin for a busy machine
    answers = slow_answers(b, list(SLOW.values()))
    for name, (head, took) in zip(SLOW, answers, strict=True):
        ok = head.startswith(b"HTTP/1.1 408 ") and took < bound
        yield name, None if ok else f"answered {head!r} after {took:.1f} s"
    many = MAX_CONNECTIONS + 8
    answers = slow_answers(b, [SLOW["a partial body"]] * many)
    codes = [head.split(b" ")[1] if head.startswith(b"HTTP/1.1 ") else head for head, _ in answers]
    late = max(took for _, took in answers)
    fine = set(codes) <= {b"408", b"429"} and codes.count(b"429") >= many - MAX_CONNECTIONS
    defect = (
        None if fine and late < bound else f"answers {sorted(set(codes))}, last after {late:.1f} s"
    )
    yield f"{many} slow bodies at once, past the cap of {MAX_CONNECTIONS}", defect
    yield "served again once they closed", b.expect(b.send("GET", "/health"), {200})


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


def admin_api(b: Battery, quick: bool) -> Iterator[tuple[str, str | None]]:
    """The admin API on a second server (an API key, the models' folder as its root): hostile
    names, paths and headers get a clean 4xx; a load that would fail every request (a chat
    format on a model without a chat template) is refused and the server keeps answering."""
    root = b.log.parent
    url, proc, log = start_server(root, ["--api-key", KEY, "--model-root", str(root)], "admin")
    a = Battery(url, proc, log, headers={"Authorization": f"Bearer {KEY}"})
    try:
        before = a.send("GET", "/admin/pairs")
        pairs = before.json() if isinstance(before, httpx.Response) else None
        expert, anti = str(root / "exp"), str(root / "anti")
        model = {"expert": expert, "expert_prompt": "raw"}
        for name in ("%2e%2e", ".hidden", "a%00b"):
            r = a.send("PUT", f"/admin/pairs/{name}", json=model)
            yield f"PUT /admin/pairs/{name}", a.expect(r, {400}, "not starting with '.'")
        nul = {"expert": expert[:4] + "\x00" + expert[4:], "expert_prompt": "raw"}
        r = a.send("PUT", "/admin/pairs/p", json=nul)
        yield "a NUL in a model path", a.expect(r, {400}, "NUL character")
        for order in ("wrong, then right", "right, then wrong"):
            right, wrong = ("authorization", f"Bearer {KEY}"), ("authorization", "Bearer nope")
            headers = [wrong, right] if order.startswith("wrong") else [right, wrong]
            r = httpx.get(f"{url}/admin/pairs", headers=headers)
            a.statuses.append(r.status_code)
            yield f"two Authorization headers, {order}", a.expect(r, {401}, "one 'Authorization")
        chat = {"expert": str(root / "nochat"), "expert_prompt": "chat", "anti_expert": anti}
        r = a.send("PUT", "/admin/pairs/0", json={**chat, "anti_expert_prompt": "raw"})
        yield "load a chat format without a chat template", a.expect(r, {400}, "chat template")
        after = a.send("GET", "/admin/pairs")
        same = isinstance(after, httpx.Response) and after.json() == pairs
        yield "the pairs are unchanged", None if same else f"now {after}"
        body = {"prompt": "hi", "max_tokens": 3}
        yield "completions after the refused load", a.expect(a.send("POST", C, json=body), {200})
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        yield "chat after the refused load", a.expect(a.send("POST", CH, json=body), {200})
        if not quick:
            r = a.send("PUT", "/admin/pairs/extra", json={**model, "anti_expert": anti})
            yield "load a good pair", a.expect(r, {200})
            body = {"prompt": "hi", "max_tokens": 3, "rule": "mixture", "alpha": [0.5, 0.6]}
            yield (
                "mixture weights over 1 in sum",
                a.expect(a.send("POST", C, json=body), {400}, MIXTURE, "alpha"),
            )
            yield "unload it", a.expect(a.send("DELETE", "/admin/pairs/extra"), {200})
    finally:
        a.client.close()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        b.statuses += a.statuses
        b.other_logs.append(log.read_text(errors="replace"))
    yield "the admin server's exit status", None if code == 0 else f"exit status {code}"


CATEGORIES: list[tuple[str, Callable[[Battery, bool], Iterator[tuple[str, str | None]]]]] = [
    ("oversized bodies", oversized),
    ("deep or broken JSON", deep_json),
    ("nested and hostile rules", nested_rules),
    ("rule bounds", rule_bounds),
    ("ReDoS regexes", redos),
    ("content types and hosts", content_types),
    ("slow clients", slow_clients),
    ("phantom cancels", phantom_cancels),
    ("load and an innocent request", load),
    ("admin API", admin_api),
    ("SIGTERM drain", shutdown),
]


# the server ---------------------------------------------------------------------------------


def start_server(
    root: Path, extra: list[str] | None = None, name: str = "server"
) -> tuple[str, subprocess.Popen[bytes], Path]:
    """``proxytune serve`` on the tiny models in ``root`` (made on the first call: base, exp,
    anti, and ``nochat``, the expert without its chat template), with ``extra`` options."""
    import shutil

    from proxytune.testing import save_tiny_model

    paths = [root / r for r in ("base", "exp", "anti")]
    if not paths[0].exists():
        for i, path in enumerate(paths):
            save_tiny_model(path, seed=i)
        shutil.copytree(paths[1], root / "nochat")
        (root / "nochat" / "chat_template.jinja").unlink()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "proxytune.cli", "serve", "--base", str(paths[0])]
    cmd += ["--expert", str(paths[1]), "--anti-expert", str(paths[2]), "--device", "cpu"]
    cmd += ["--dtype", "float32", "--port", str(port), "--max-body-bytes", str(MAX_BODY)]
    cmd += ["--max-queue", str(MAX_QUEUE), "--max-batch-size", str(MAX_BATCH)]
    cmd += ["--header-timeout", str(READ_TIMEOUT), "--body-timeout", str(READ_TIMEOUT)]
    cmd += ["--max-client-connections", str(MAX_CONNECTIONS), *(extra or ())]
    log = root / f"{name}.log"
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
        text = "\n".join([log.read_text(errors="replace"), *b.other_logs])
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
