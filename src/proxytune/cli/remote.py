"""Calls to a running ``proxytune serve`` (the ``pairs`` and ``monitor`` commands): stdlib only."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Annotated, Any

from ..errors import ConfigError
from .options import Opt

ServerOption = Annotated[str, Opt(help="The server's base URL.")]
ApiKeyOption = Annotated[
    str | None,
    Opt(envvar="PROXYTUNE_API_KEY", help="The server's API key (env PROXYTUNE_API_KEY)."),
]


def call(
    method: str, server: str, path: str, api_key: str | None = None, body: Any = None,
    timeout: float = 600.0,
) -> Any:  # fmt: skip
    """``method`` on ``server + path``: the JSON answer, or a ``ConfigError`` with the server's
    own message (or why it could not be reached)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.rstrip("/") + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            raw = answer.read()
    except urllib.error.HTTPError as err:
        text = err.read().decode("utf-8", "replace")
        try:
            message = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = text.strip() or err.reason
        raise ConfigError(f"the server answered {err.code}: {message}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ConfigError(f"cannot reach {server}: {reason}; check --server") from None
    return json.loads(raw) if raw.strip().startswith((b"{", b"[")) else raw.decode()
