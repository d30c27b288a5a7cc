"""ASGI middleware in front of every route: the browser guards, the API key check and request
counting.

A web page can make a browser POST to ``http://127.0.0.1:8000`` without asking first when the
body's type is ``text/plain``, a form or multipart; such requests are refused (415), as JSON
is all the API takes. A page whose DNS name was rebound to this machine sends its own name in
``Host``; names the server was not told about are refused (403).

Pure ASGI (not ``BaseHTTPMiddleware``), so streaming responses and disconnects pass through.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from .metrics import Metrics
from .protocol import APIError

log = logging.getLogger("proxytune.server")

ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
BROWSER_TYPES = (b"text/plain", b"application/x-www-form-urlencoded", b"multipart/form-data")
"""Body types a browser sends cross-site without a preflight: never JSON API calls."""


class Gate:
    """Checks the API key (every path but /health) and counts requests by route and status."""

    def __init__(
        self,
        app: Any,
        api_key: str | None,
        metrics: Metrics,
        allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES,
    ) -> None:
        self.app, self.metrics = app, metrics
        self.key = api_key.encode() if api_key else None
        # with a key, a rebound page cannot use the server anyway (it cannot send the key)
        self.any_host = "*" in allowed_hosts or self.key is not None
        self.hosts = {h.strip("[]").lower() for h in allowed_hosts}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path.startswith("/v1/models/"):
            endpoint = "/v1/models/{id}"
        elif path.startswith("/admin/pairs"):
            endpoint = "/admin/pairs"
        else:
            endpoint = path if path in ENDPOINTS else "other"  # bounded label values
        status = {"code": 500, "started": False}

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        try:
            refusal = self._browser_guard(scope)
            if refusal is not None:
                await refusal(scope, receive, counting_send)
                return
            if self.key is not None and path != "/health" and not self._authorized(scope):
                err = APIError(
                    "invalid or missing API key: send one 'Authorization: Bearer <key>' header",
                    401,
                    code="invalid_api_key",
                )
                response = JSONResponse(
                    err.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"}
                )
                await response(scope, receive, counting_send)
                return
            await self.app(scope, receive, counting_send)
        except ClientDisconnect:  # the client left while its body arrived: nobody to answer
            status["code"] = 499
        except Exception as err:
            if status["started"]:
                raise
            # a bug: answer 500 here rather than let the server close the connection (a
            # keep-alive client's next request would fail)
            log.exception("unexpected error on %s", path)
            body = APIError(f"internal error: {type(err).__name__}: {err}", 500).body()
            await JSONResponse(body, status_code=500)(scope, receive, counting_send)
        finally:
            self.metrics.requests.inc(endpoint=endpoint, status=str(status["code"]))

    def _browser_guard(self, scope: dict[str, Any]) -> JSONResponse | None:
        """403 for a ``Host`` not allowed, 415 for a POST body of a browser-only type."""
        headers = dict(scope.get("headers", []))
        if not self.any_host:
            host = headers.get(b"host", b"").decode("latin-1").lower()
            name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]")[0]
            if name and name not in self.hosts:
                err = APIError(
                    f"Host {name!r} is not served here; start the server with --allow-host "
                    f"{name} (or --allow-host '*')",
                    403,
                    code="host_not_allowed",
                )
                return JSONResponse(err.body(), status_code=403)
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if scope.get("method") == "POST" and kind in BROWSER_TYPES:
            err = APIError(
                f"a {kind.decode()} body is not accepted: send JSON with 'Content-Type: "
                "application/json'",
                415,
                code="unsupported_media_type",
            )
            return JSONResponse(err.body(), status_code=415)
        return None

    def _authorized(self, scope: dict[str, Any]) -> bool:
        """Exactly one ``Authorization`` header, holding the key: with several, proxies and
        the app could each read a different one."""
        assert self.key is not None
        values = [v for name, v in scope.get("headers", []) if name == b"authorization"]
        if len(values) != 1:
            return False
        scheme, _, token = values[0].partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
