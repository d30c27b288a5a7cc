"""Slow and greedy clients: read deadlines and a per-client connection cap, in uvicorn's h11
protocol (the ASGI app only sees a request once its head has arrived).

- A request's head (request line and headers) must arrive within ``header_timeout`` seconds of
  the connection opening or of the previous response; its body within ``body_timeout`` seconds
  of its head (a chunked body too, final chunk included). Past it the client gets a 408 and
  the connection is closed (an idle keep-alive connection is just closed).
- One client address may hold ``max_client_connections`` connections at once; one more gets
  a 429 and is closed. Behind a reverse proxy every client is the proxy: raise the cap or turn
  it off there (docs/operations.md).

>>> config = uvicorn.Config(app, http=guarded_protocol(10.0, 30.0, 128))  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from http import HTTPStatus
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import APIError

log = logging.getLogger("proxytune.server")


def raw_response(err: APIError) -> bytes:
    """``err`` as a complete HTTP/1.1 response that closes the connection, written straight to
    the socket (no request may have been parsed yet, so h11 cannot send it)."""
    body = json.dumps(err.body()).encode()
    head = (
        f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with read deadlines and a per-client connection cap (set by
    :func:`guarded_protocol`, one subclass per server)."""

    header_timeout: ClassVar[float] = 10.0
    body_timeout: ClassVar[float] = 30.0
    max_client_connections: ClassVar[int] = 0
    """0: no cap."""
    open_by_client: ClassVar[Counter[str]] = Counter()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase: str | None = None
        """What the deadline waits for: ``"head"``, ``"body"`` or nothing."""
        self._counted: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        host = self.client[0] if self.client else None
        cap = self.max_client_connections
        if cap and host is not None:
            if self.open_by_client[host] >= cap:
                log.info("%s holds %d connections already: refused one more", host, cap)
                err = APIError(
                    f"this client already holds {cap} open connections, the server's limit "
                    "(--max-client-connections); reuse or close some",
                    429,
                    code="too_many_connections",
                )
                transport.write(raw_response(err))
                transport.close()
                return
            self.open_by_client[host] += 1
            self._counted = host
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_deadline(None)
        if self._counted is not None:
            self.open_by_client[self._counted] -= 1
            if self.open_by_client[self._counted] <= 0:
                del self.open_by_client[self._counted]
            self._counted = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    # deadlines --------------------------------------------------------------------------------

    def _watch(self) -> None:
        """Arm the deadline of what the connection waits for now (kept while that stays the
        same: a byte at a time does not extend it)."""
        if self.transport is None or self.transport.is_closing():
            return
        state = self.conn.their_state
        phase = "head" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
        if phase != self._phase:
            self._set_deadline(phase)

    def _set_deadline(self, phase: str | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = phase
        if phase is not None:
            seconds = self.header_timeout if phase == "head" else self.body_timeout
            self._deadline = self.loop.call_later(seconds, self._expired, phase)

    def _expired(self, phase: str) -> None:
        """Answer 408 where nothing was answered yet (an idle connection gets no answer),
        then close; an app still reading the body sees the client disconnect."""
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle if phase == "body" else None
        answered = cycle is not None and cycle.response_started
        partial_head = phase == "head" and bool(self.conn.trailing_data[0])
        if (phase == "body" and not answered) or partial_head:
            seconds = self.header_timeout if phase == "head" else self.body_timeout
            what = "request's headers" if phase == "head" else "request body"
            log.info("%s: the %s took over %gs; closed", self._peer, what, seconds)
            err = APIError(
                f"the {what} did not arrive within {seconds:g}s; send the whole request at "
                "once (the server's --header-timeout / --body-timeout)",
                408,
                code="request_timeout",
            )
            self.transport.write(raw_response(err))
        if cycle is not None:  # the app must not answer on a closed connection
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

    @property
    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "a client"


def guarded_protocol(
    header_timeout: float, body_timeout: float, max_client_connections: int
) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` with these limits, for ``uvicorn.Config(http=...)``; its
    connection counts are its own (one per server)."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {
            "header_timeout": header_timeout,
            "body_timeout": body_timeout,
            "max_client_connections": max_client_connections,
            "open_by_client": Counter(),
        },
    )
