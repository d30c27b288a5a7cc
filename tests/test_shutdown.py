"""Graceful shutdown of ``proxytune serve`` (a real process, tiny models): on SIGTERM the server
keeps listening and answers 503 while in-flight work drains; what outlives the timeout ends
with an error event and ``[DONE]``; the exit status says whether work was cut."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import httpx

from proxytune.server.shutdown import EXIT_CUT

C = "/v1/completions"
KEY = {"Authorization": "Bearer k"}


@contextlib.contextmanager
def serving(tiny_dirs, *flags: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """``proxytune serve`` on the tiny models in a subprocess; yields it and its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "proxytune.cli", "serve", "--base", str(tiny_dirs["base"])]
    cmd += ["--expert", str(tiny_dirs["expert"]), "--anti-expert", str(tiny_dirs["anti"])]
    cmd += ["--device", "cpu", "--dtype", "float32", "--port", str(port), "--log-level", "warning"]
    env = {**os.environ, "PROXYTUNE_API_KEY": "k", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*cmd, *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_draining(url: str) -> httpx.Response:
    """/health once the signal has put the server into draining mode."""
    deadline = time.monotonic() + 10
    while (health := httpx.get(f"{url}/health")).status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return health


def events(lines: Iterator[str]) -> list[str]:
    return [line for line in lines if line]


def test_sigterm_drains_answering_503_and_exits_0_when_all_work_finished(tiny_dirs):
    with serving(tiny_dirs) as (proc, url):
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers=KEY).json()["data"][0]["id"] == "base"
        body = {"prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}{C}", json=body, headers=KEY, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            # still listening: the documented 503, not "connection refused"
            health = wait_draining(url)
            assert health.status_code == 503 and health.json()["status"] == "draining"
            assert health.headers["Retry-After"] == "5"
            late = httpx.post(f"{url}{C}", json={"prompt": "y", "max_tokens": 2}, headers=KEY)
            assert late.status_code == 503 and late.headers["Retry-After"] == "5"
            assert late.json()["error"]["code"] == "shutting_down"
            rest = events(lines)  # the stream runs to its end
        assert rest[-1] == "data: [DONE]"
        last = json.loads(rest[-2].removeprefix("data: "))
        assert last["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) == 0


def test_work_past_the_shutdown_timeout_ends_with_an_error_event_and_exit_status_3(tiny_dirs):
    # a drain far shorter than the rest of the stream, even when the machine is slow to admit
    # the second request (the stream runs on meanwhile)
    with serving(tiny_dirs, "--shutdown-timeout", "0.05") as (proc, url):
        long = {"prompt": "x", "max_tokens": 230, "ignore_eos": True}
        with (
            concurrent.futures.ThreadPoolExecutor(1) as pool,
            httpx.stream("POST", f"{url}{C}", json={**long, "stream": True}, headers=KEY) as r,
        ):
            assert r.status_code == 200
            lines = r.iter_lines()
            next(lines)
            waiting = pool.submit(httpx.post, f"{url}{C}", json=long, headers=KEY, timeout=60)
            while httpx.get(f"{url}/health").json()["running"] < 2:
                assert not waiting.done(), waiting.result().text
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            rest = events(lines)
            answer = waiting.result(60)
        assert rest[-1] == "data: [DONE]"  # a whole stream, not a cut chunked read
        error = json.loads(rest[-2].removeprefix("data: "))["error"]
        assert error["code"] == "shutting_down"
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "shutting_down"
        assert proc.wait(30) == EXIT_CUT


def test_a_second_signal_cuts_the_drain_short_and_a_third_exits_at_once(tuner):
    import threading

    import uvicorn

    from proxytune.server.scheduler import Finished, Scheduler, ShuttingDown
    from proxytune.server.shutdown import DrainingServer

    scheduler = Scheduler(tuner, max_batch_size=4, max_queue=4)
    scheduler.start()
    done = threading.Event()
    seen: list = []
    job = scheduler.batch.prepare(["x"], tuner.config(max_new_tokens=230, ignore_eos=True))
    scheduler.submit(job, lambda e: (seen.append(e), isinstance(e, Finished) and done.set()))
    server = DrainingServer(uvicorn.Config(app=None), scheduler, timeout=600)
    server.handle_exit(signal.SIGTERM, None)
    assert scheduler.draining and not server.should_exit  # draining, still listening
    server.handle_exit(signal.SIGTERM, None)  # the second: stop waiting
    assert done.wait(30) and isinstance(seen[-1].error, ShuttingDown)
    deadline = time.monotonic() + 10
    while not server.should_exit:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert server.cut == 1 and not server.force_exit
    server.handle_exit(signal.SIGINT, None)
    assert server.force_exit


def test_a_scoring_call_still_waiting_at_the_timeout_is_cut_too(tuner):
    """An echo's prompt scoring waits for the worker (``Scheduler.call``); the drain counts it
    and its request gets ShuttingDown (a 503), like a request still in the batch."""
    import threading

    from proxytune.server.scheduler import Scheduler, ShuttingDown

    scheduler = Scheduler(tuner, max_batch_size=4, max_queue=4)
    scheduler.start()
    release = threading.Event()
    busy = scheduler.call(lambda: release.wait(10))
    while not busy.running():
        time.sleep(0.01)
    waiting = scheduler.call(lambda: "scored")
    threading.Timer(0.5, release.set).start()  # the worker frees up after the timeout
    assert scheduler.close(timeout=0.1) == 1
    with pytest.raises(ShuttingDown):
        waiting.result(5)
    assert busy.result(5) is True
