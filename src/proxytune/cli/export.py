"""``proxytune export``: a model or a trained expert as a GGUF file for the llama.cpp backend."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._app import app
from .options import Opt


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="A model directory or a `proxytune train` output.")],
    out: Annotated[Path, typer.Argument(help="A new directory for model.gguf and its tokenizer.")],
    dtype: Annotated[str, Opt(help="Weights in the file: float32 or float16.")] = "float32",
) -> None:
    """Write a model (a LoRA expert merged into its base) as GGUF, for ``backend: llamacpp``."""
    # lazy: torch stays off the CLI's start (`proxytune --help` imports every command module)
    from ..backends.gguf_write import export_gguf

    path = export_gguf(model, out, dtype)
    print(f"wrote {path}; use it as a model path (the llama.cpp backend runs it)")
