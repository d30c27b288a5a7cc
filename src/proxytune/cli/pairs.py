"""``proxytune pairs list|load|unload``: change the pairs of a running server."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from ._app import app
from .options import Opt
from .remote import ApiKeyOption, ServerOption, call

pairs_app = typer.Typer(
    no_args_is_help=True,
    help="List, load, replace and unload the pairs of a running server (its admin API).",
)
app.add_typer(pairs_app, name="pairs")

NameArg = Annotated[
    str, typer.Argument(help="The pair's name (loading an existing name replaces it).")
]


def _show(answer: dict[str, Any]) -> None:
    for p in answer["pairs"]:
        sides = [
            f"{role}={p[role]['model']} ({p[role]['prompt']})"
            for role in ("expert", "anti_expert")
            if p[role] is not None
        ]
        typer.echo(f"[{p['index']}] {p['name']}: alpha={p['alpha']} " + " ".join(sides))


@pairs_app.command("list")
def list_pairs(
    server: ServerOption = "http://127.0.0.1:8000",
    api_key: ApiKeyOption = None,
    as_json: Annotated[bool, Opt("--json", help="Print the server's JSON answer.")] = False,
) -> None:
    """The served pairs, in index order (the order ``alpha`` and ``active_pairs`` use)."""
    answer = call("GET", server, "/admin/pairs", api_key)
    if as_json:
        typer.echo(json.dumps(answer, indent=2))
    else:
        _show(answer)


@pairs_app.command("load")
def load(
    name: NameArg,
    expert: Annotated[
        str | None, Opt(help="Expert: a model directory, GGUF or LoRA adapter.")
    ] = None,
    anti_expert: Annotated[str | None, Opt(help="Anti-expert: a model directory or GGUF.")] = None,
    alpha: Annotated[float, Opt(help="The pair's default alpha.")] = 1.0,
    expert_prompt: Annotated[str, Opt(help="The expert's prompt format.")] = "auto",
    anti_expert_prompt: Annotated[str, Opt(help="The anti-expert's prompt format.")] = "auto",
    dtype: Annotated[str, Opt(help="auto | float32 | bfloat16 | float16")] = "auto",
    server: ServerOption = "http://127.0.0.1:8000",
    api_key: ApiKeyOption = None,
) -> None:
    """Load pair NAME (paths on the server, under its --model-root); an existing NAME is
    replaced: requests in flight finish on the old pair, new ones get the new one."""
    body = {
        "expert": expert,
        "anti_expert": anti_expert,
        "alpha": alpha,
        "expert_prompt": expert_prompt,
        "anti_expert_prompt": anti_expert_prompt,
        "dtype": dtype,
    }
    answer = call("PUT", server, f"/admin/pairs/{name}", api_key, body)
    typer.echo(f"{'replaced' if answer['replaced'] else 'loaded'} {name}")
    _show(answer)


@pairs_app.command("unload")
def unload(
    name: NameArg, server: ServerOption = "http://127.0.0.1:8000", api_key: ApiKeyOption = None
) -> None:
    """Unload pair NAME (later pairs move down one index); its memory is freed once the
    requests running on it finish."""
    answer = call("DELETE", server, f"/admin/pairs/{name}", api_key)
    typer.echo(f"unloaded {name}")
    _show(answer)
