"""Optional dependencies: one import helper, one error that names the install command.

Each optional feature's packages live in an extra of ``pyproject.toml``
(``[project.optional-dependencies]``); :func:`require` imports a module of one and, when it is
missing, raises :class:`MissingExtraError` with the command that installs it::

    >>> require("json", "server", "the server").__name__
    'json'
    >>> require("no_such_module", "plots", "plotting")
    Traceback (most recent call last):
    ...
    proxytune.extras.MissingExtraError: plotting needs no_such_module, which is not installed: pip install 'proxytune[plots]'
"""  # noqa: E501

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import ProxyTuneError

EXTRAS = {
    "server": ("fastapi", "uvicorn", "httpx"),
    "bnb": ("bitsandbytes",),
    "plots": ("matplotlib",),
    "llamacpp": ("llama-cpp-python",),
    "ray": ("ray",),
    "reasoning": ("reasoning-gym",),
}
"""The extras of ``pyproject.toml`` and the packages each brings (kept in step by a test)."""


class MissingExtraError(ProxyTuneError, ImportError):
    """An optional package is not installed; the message names the command that installs it.

    An :class:`ImportError` too, so code that goes on without an optional feature (plots) can
    catch either."""


def install_command(package: str, extra: str | None) -> str:
    """``pip install 'proxytune[EXTRA]'``, or ``pip install PACKAGE`` for a package that no
    extra brings."""
    return f"pip install 'proxytune[{extra}]'" if extra else f"pip install {package}"


def require(
    module: str,
    extra: str | None,
    feature: str,
    *,
    package: str | None = None,
    hint: str | None = None,
) -> ModuleType:
    """Import ``module`` for ``feature`` (e.g. ``"proxytune serve"``), or raise
    :class:`MissingExtraError` naming the install command: that of ``extra``, or (``extra``
    ``None``) ``pip install PACKAGE`` (``package`` defaults to the module's top-level name);
    ``hint``: another way out, added to the message."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        name = package or module.split(".")[0]
        missing = getattr(err, "name", None) or module
        why = (
            "which is not installed"
            if missing.split(".")[0] == module.split(".")[0]
            else f"which could not be imported ({err})"  # installed, but a dependency is not
        )
        message = f"{feature} needs {name}, {why}: {install_command(name, extra)}"
        raise MissingExtraError(message + (f"; {hint}" if hint else "")) from err


__all__ = ["EXTRAS", "MissingExtraError", "install_command", "require"]
