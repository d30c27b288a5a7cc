"""Slow and greedy clients (issue 28): read deadlines close connections whose request head or
body does not arrive in time, with a 408; one client address holds a bounded number of
connections. Loopback only, every wait bounded."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("uvicorn")
import httpx
from serving import serve_in_thread

from proxytune.server import ServerSettings, create_app
from proxytune.server.app import connection_guard

LIMIT = 1.0  # seconds, the head and the body deadlines here
CAP = 8
SLACK = 4.0  # on top of a deadline: a busy 2-core machine
HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


@pytest.fixture(scope="module")
def url(tuner) -> Iterator[str]:
    settings = ServerSettings(
        model_name="m", header_timeout=LIMIT, body_timeout=LIMIT, max_client_connections=CAP
    )
    with serve_in_thread(create_app(tuner, settings), http=connection_guard(settings)) as u:
        yield u


def connect(url: str, data: bytes = b"") -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=LIMIT + SLACK)
    if data:
        sock.sendall(data)
    return sock


def answer(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took (a socket timeout,
    i.e. a connection left open, fails the test)."""
    start, got = time.monotonic(), b""
    with sock:
        while chunk := sock.recv(65536):
            got += chunk
    return got, time.monotonic() - start


def error_of(raw: bytes) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower(), head
    return json.loads(body)["error"]


SLOW = {  # what a client sends, then nothing more
    "a partial head": HEAD,
    "a partial body": HEAD + b'Content-Length: 100\r\n\r\n{"prompt": ',
    "an oversized chunk": HEAD + b"Transfer-Encoding: chunked\r\n\r\nFFFFFF\r\nabc",
    "no final chunk": HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
}


def test_slow_requests_get_a_408_and_are_closed_within_the_deadline(url):
    socks = {what: connect(url, data) for what, data in SLOW.items()}
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # others are served
    for what, sock in socks.items():
        raw, took = answer(sock)
        assert raw.startswith(b"HTTP/1.1 408 "), (what, raw)
        error = error_of(raw)
        assert error["code"] == "request_timeout" and "--header-timeout" in error["message"]
        assert took < LIMIT + SLACK, what
    raw, took = answer(connect(url))  # connected, sent nothing: closed without a word
    assert raw == b"" and took < LIMIT + SLACK


def test_a_trickle_of_header_bytes_does_not_extend_the_deadline(url):
    sock = connect(url, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    start = time.monotonic()
    with pytest.raises(OSError):  # the server closes while the client still sends
        for _ in range(int((LIMIT + SLACK) / 0.05)):  # bounded: past the deadline and slack
            sock.sendall(b"X-Slow: 1\r\n")
            time.sleep(0.05)
    assert time.monotonic() - start < LIMIT + SLACK
    sock.close()


def test_many_slow_connections_are_all_closed_in_bounded_time(tuner):
    n = 48
    settings = ServerSettings(model_name="m", body_timeout=LIMIT, max_client_connections=n)
    with serve_in_thread(create_app(tuner, settings), http=connection_guard(settings)) as u:
        socks = [connect(u, SLOW["a partial body"]) for _ in range(n)]
        start = time.monotonic()
        assert all(answer(s)[0].startswith(b"HTTP/1.1 408 ") for s in socks)
        assert time.monotonic() - start < LIMIT + SLACK
        body = {"prompt": "x", "max_tokens": 2}
        assert httpx.post(f"{u}/v1/completions", json=body, timeout=30).status_code == 200


def test_one_client_holds_at_most_its_cap_of_connections(url):
    held = [connect(url, HEAD) for _ in range(CAP)]
    raw, took = answer(connect(url))
    assert raw.startswith(b"HTTP/1.1 429 ") and took < SLACK
    error = error_of(raw)
    assert (
        error["code"] == "too_many_connections" and "--max-client-connections" in error["message"]
    )
    for sock in held:
        sock.close()
    deadline = time.monotonic() + SLACK  # the server sees them close
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/health", timeout=10)  # counted again once the others are gone
        if r.status_code == 200:
            break
        time.sleep(0.05)
    assert r.status_code == 200


def test_ordinary_keep_alive_requests_are_untouched(url):
    with httpx.Client(timeout=30) as client:
        for _ in range(3):
            assert client.get(f"{url}/health").status_code == 200
            time.sleep(LIMIT / 2)  # idle, but under the head deadline between requests


def test_deadlines_and_the_cap_are_checked_settings():
    from proxytune.errors import ConfigError

    bad_values = [{"header_timeout": 0}, {"body_timeout": -1.0}, {"body_timeout": float("inf")}]
    for bad in [*bad_values, {"max_client_connections": -1}]:
        with pytest.raises(ConfigError, match=next(iter(bad)).replace("_", "-")):
            ServerSettings(**bad)
