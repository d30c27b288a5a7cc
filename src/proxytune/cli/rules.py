"""``proxytune rules``: the steering rules, what each does and its settings."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ._app import app
from .options import Opt


@app.command()
def rules(
    name: Annotated[str | None, typer.Argument(help="Show one rule (default: all).")] = None,
    as_json: Annotated[bool, Opt("--json", help="As JSON.")] = False,
) -> None:
    """List the steering rules: what each does, its formula, cost and settings."""
    # lazy: torch stays off the CLI's start (`proxytune --help` imports every command module)
    from ..rules import describe

    items = describe(name)
    if as_json:
        print(json.dumps(items, indent=2))
        return
    for item in items:
        print(f"{item['name']}: {item['summary']}")
        print(f"    formula: {item['formula']}")
        print(f"    cost: {item['cost']}")
        for s in item["settings"]:
            print(f"    {s['name']} = {json.dumps(s['default'])}: {s['help']}")
        print()
    print("Use: proxytune generate --rule NAME --rule-arg key=value ...; details: docs/rules.md")
