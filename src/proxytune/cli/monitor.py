"""``proxytune monitor baseline``: capture what steering does on a reference prompt set."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import ConfigError
from ._app import app
from .options import ModelOptions, Opt, build_tuner
from .remote import ApiKeyOption, ServerOption, call

monitor_app = typer.Typer(no_args_is_help=True, help="Watch a running server's steering.")
app.add_typer(monitor_app, name="monitor")


def read_prompts(path: Path) -> list[str]:
    """One prompt per line, or JSON lines with a ``prompt`` field; blank lines skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ConfigError(f"cannot read --prompts {str(path)!r}: {err.strerror}") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                prompts.append(str(json.loads(line)["prompt"]))
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"{path}:{n}: a JSON line needs a 'prompt' field") from None
        else:
            prompts.append(line)
    if not prompts:
        raise ConfigError(f"--prompts {str(path)!r} holds no prompts")
    return prompts


@monitor_app.command("baseline")
def baseline(
    prompts: Annotated[Path, Opt(help="Reference prompts: one a line, or JSONL with 'prompt'.")],
    out: Annotated[Path, Opt(help="Where to write the baseline JSON.")] = Path("baseline.json"),
    max_tokens: Annotated[int, Opt(help="Tokens generated per prompt.")] = 64,
    server: ServerOption = "http://127.0.0.1:8000",
    api_key: ApiKeyOption = None,
    recipe: Annotated[
        str | None, Opt(help="Compute it offline on this recipe's models instead of a server.")
    ] = None,
) -> None:
    """Send every prompt (greedy, one at a time) and write each pair's mean KL, changed-top-
    token rate and entropy over them: the server's --drift-baseline. Capture it while no
    other traffic reaches the server (its /metrics counters are read before and after), or
    offline with --recipe (the same numbers, computed in process)."""
    # lazy: torch stays off the CLI's start (`proxytune --help` imports every command module)
    from ..server.drift import baseline_between, baseline_offline

    texts = read_prompts(prompts)
    if recipe is not None:
        pairs = baseline_offline(build_tuner(ModelOptions(recipe=recipe)), texts, max_tokens)
        server = f"offline:{recipe}"
    else:
        before = call("GET", server, "/metrics", api_key)
        for text in texts:
            body = {"prompt": text, "max_tokens": max_tokens, "temperature": 0}
            call("POST", server, "/v1/completions", api_key, body)
        pairs = baseline_between(before, call("GET", server, "/metrics", api_key))
    if not pairs:
        raise ConfigError("no pair steered any token: check that the server runs a pair")
    record: dict[str, Any] = {
        "version": 1,
        "created": int(time.time()),
        "server": server,
        "prompts": len(texts),
        "max_tokens": max_tokens,
        "pairs": pairs,
    }
    out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    for name, stats in pairs.items():
        shown = " ".join(f"{k}={v:.4g}" for k, v in stats.items())
        typer.echo(f"pair {name}: {shown}")
    typer.echo(f"wrote {out}")
