"""The ``proxytune`` command line.

One module per command, each registering on the shared :data:`app` (:mod:`._app`):
:mod:`.generate`, :mod:`.rules`, :mod:`.setup`, :mod:`.serve`, :mod:`.train`, :mod:`.export`,
:mod:`.evaluate` (``eval``), :mod:`.analyze`, :mod:`.reproduce`, :mod:`.pairs` and
:mod:`.monitor` (a running server's pairs and drift baseline). Options used by several
commands (models, loading, decoding settings, rules, engine options) are declared once as
option groups in :mod:`.options`, which also builds the tuner from them; :mod:`.batch` runs
``generate``'s batch jobs.
"""

from __future__ import annotations

import importlib
import sys

import typer

from ..errors import ProxyTuneError
from ._app import app

COMMANDS = (
    "generate",
    "rules",
    "setup",
    "serve",
    "train",
    "export",
    "evaluate",
    "analyze",
    "reproduce",
    "pairs",
    "monitor",
)
"""The command modules, in the order ``--help`` lists them."""

for _module in COMMANDS:
    importlib.import_module(f"{__name__}.{_module}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input) instead of exiting."""
    try:
        # a command's ``raise typer.Exit(code)`` comes back as the return value here
        code = app(args=argv, standalone_mode=False)
    except ProxyTuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except typer.Exit as err:
        return err.exit_code
    except typer.TyperException as err:  # usage errors, bad parameters
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        print(f"error: {message}", file=sys.stderr)
        return int(getattr(err, "exit_code", 2))
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 1
    return code if isinstance(code, int) and not isinstance(code, bool) else 0


__all__ = ["app", "main"]
