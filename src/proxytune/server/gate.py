"""ASGI middleware in front of every route: the API key check and request counting.

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


class Gate:
    """Checks the API key (every path but /health) and counts requests by route and status."""

    def __init__(self, app: Any, api_key: str | None, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path.startswith("/v1/models/"):
            endpoint = "/v1/models/{id}"
        else:
            endpoint = path if path in ENDPOINTS else "other"  # bounded label values
        status = {"code": 500, "started": False}

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        try:
            if self.key is not None and path != "/health" and not self._authorized(scope):
                err = APIError(
                    "invalid or missing API key: send 'Authorization: Bearer <key>'",
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

    def _authorized(self, scope: dict[str, Any]) -> bool:
        assert self.key is not None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
                    return True
        return False
