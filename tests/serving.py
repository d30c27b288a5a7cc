"""Test harness: serve an ASGI app on a loopback port in a thread.

The tests directory is not a package: pytest's default ``prepend`` import mode puts it on
``sys.path``, so test modules import this as ``from serving import serve_in_thread``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def serve_in_thread(app: Any, start_timeout: float = 20.0, **config: Any) -> Iterator[str]:
    """Serve an ASGI ``app`` with uvicorn on a free 127.0.0.1 port in a thread (``config``:
    more ``uvicorn.Config`` settings, e.g. ``http``).

    Yields the base URL (``http://127.0.0.1:PORT``); start and stop are bounded in time.
    """
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, **config)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
