"""The one Typer app every command module registers on."""

from __future__ import annotations

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Decoding-time tuning: steer a large base model with small expert/anti-expert pairs.",
)
