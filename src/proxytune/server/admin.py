"""The admin API: the served pairs, listed and changed while the server runs.

| route | what |
|---|---|
| ``GET /admin/pairs`` | the pairs in order (index, name, models, alpha) |
| ``PUT /admin/pairs/{name}`` | load a pair (replacing the pair of that name, else appended) |
| ``DELETE /admin/pairs/{name}`` | unload a pair (later pairs move down one index) |

Behind the API key: a server started without one answers 403 on every admin route. Models
load on a thread of their own; the swap happens between two decode steps (see
:mod:`~proxytune.server.pairs`). One change at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from ..errors import ProxyTuneError
from .pairs import LivePairs, PairLoad, PathRefused
from .protocol import APIError, parse_request
from .scheduler import QueueFull, ShuttingDown

if TYPE_CHECKING:
    from ..tuner import ProxyTuner
    from .app import ServerSettings
    from .scheduler import Scheduler


def add_admin_routes(
    app: FastAPI,
    tuner: ProxyTuner,
    scheduler: Scheduler,
    settings: ServerSettings,
    on_change: Callable[[str], None] | None = None,
) -> LivePairs:
    """Register the admin routes on ``app``; returns the registry they change. ``on_change``
    hears the name of each pair loaded, replaced or unloaded (the drift monitor resets it)."""
    live = LivePairs(
        tuner,
        roots=settings.model_roots,
        allow_pickle=settings.allow_pickle,
        trust_remote_code=settings.trust_remote_code,
    )
    changing = asyncio.Lock()

    def check_key() -> None:
        if not settings.api_key:
            raise APIError(
                "the admin API needs an API key: start the server with --api-key "
                "(or PROXYTUNE_API_KEY) and send it as 'Authorization: Bearer KEY'",
                403,
                code="admin_disabled",
            )

    async def swap(new: ProxyTuner, code: str) -> None:
        try:
            await asyncio.wrap_future(scheduler.call(lambda: live.apply(new)))
        except (QueueFull, ShuttingDown) as err:
            raise APIError(f"{err}; retry the change later", 503, code="busy") from None
        except ProxyTuneError as err:  # the new set fails its probe: nothing changed
            raise APIError(f"refused, nothing changed: {one_line(err)}", 400, code=code) from None

    @app.get("/admin/pairs")
    async def list_pairs() -> dict[str, Any]:
        check_key()
        return {"pairs": live.listing()}

    @app.put("/admin/pairs/{name}")
    async def load_pair(name: str, request: Request) -> dict[str, Any]:
        check_key()
        req = parse_request(await request.body(), PairLoad)
        async with changing:
            replaced = name in live.names
            try:
                new = await run_in_threadpool(live.load, name, req)
            except PathRefused as err:
                raise APIError(str(err), 403, code="path_refused") from None
            except ProxyTuneError as err:
                raise APIError(one_line(err), 400, code="pair_not_loaded") from None
            except Exception as err:  # the loader's own error (a broken file, a bad config)
                raise APIError(
                    f"{type(err).__name__}: {one_line(err)}", 422, code="pair_not_loaded"
                ) from None
            await swap(new, "pair_not_loaded")
        if on_change is not None:
            on_change(name)
        return {"loaded": name, "replaced": replaced, "pairs": live.listing()}

    @app.delete("/admin/pairs/{name}")
    async def unload_pair(name: str) -> dict[str, Any]:
        check_key()
        async with changing:
            try:
                new = live.without(name)
            except KeyError:
                raise APIError(
                    f"no pair named {name!r}; the pairs are {live.names}", 404, code="no_pair"
                ) from None
            except ProxyTuneError as err:  # the rule needs that pair
                raise APIError(one_line(err), 400, code="pair_not_unloaded") from None
            await swap(new, "pair_not_unloaded")
        if on_change is not None:
            on_change(name)
        return {"unloaded": name, "pairs": live.listing()}

    return live


def one_line(err: BaseException) -> str:
    """An error's first line (loaders can be verbose)."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
