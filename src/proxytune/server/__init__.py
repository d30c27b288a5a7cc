"""An OpenAI-compatible server for proxy-tuned models (needs the ``server`` extra).

>>> from proxytune.server import ServerSettings, serve           # doctest: +SKIP
>>> serve(tuner, ServerSettings(model_name="steered"), port=8000)  # doctest: +SKIP

Modules: :mod:`.protocol` (OpenAI request/response models and parsing), :mod:`.scheduler` (queue
and worker thread, driving a :class:`~proxytune.engine.requests.RequestCore`: the running batch,
or the tuner's own loop for black-box tuners), :mod:`.render` (engine output -> OpenAI JSON
and server-sent events), :mod:`.tokens` (token text and bytes), :mod:`.metrics` (Prometheus),
:mod:`.gate` (API key, request counts), :mod:`.app` (FastAPI routes, ``serve``),
:mod:`.shutdown` (draining on SIGTERM/SIGINT), :mod:`.connections` (read deadlines and a
per-client connection cap, under ``serve``).
"""

from __future__ import annotations

from .app import ServerSettings, create_app, serve

__all__ = ["ServerSettings", "create_app", "serve"]
