"""One check for the files and folders users name, so that every message says what the path
is instead (missing, a folder where a file was wanted, ...), not only "does not exist"."""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError, ProxyTuneError

TRAIN_META = "proxytune_train.json"
"""Written by ``proxytune train`` next to what it saves; names the base model of an adapter
and the prompt format it was trained in."""


def need_file(path: str | Path, what: str, error: type[ProxyTuneError] = ConfigError) -> Path:
    """``path`` (``~`` expanded) if it is a file, else ``error`` naming ``what`` it should be.

    >>> need_file("/", "recipe file")
    Traceback (most recent call last):
    ...
    proxytune.errors.ConfigError: recipe file '/' is a directory; give a file
    """
    return _need(Path(path).expanduser(), what, error, want_dir=False)


def need_dir(path: str | Path, what: str, error: type[ProxyTuneError] = ConfigError) -> Path:
    """``path`` (``~`` expanded) if it is a directory, else ``error`` naming ``what``."""
    return _need(Path(path).expanduser(), what, error, want_dir=True)


def _need(path: Path, what: str, error: type[ProxyTuneError], want_dir: bool) -> Path:
    if path.is_dir() if want_dir else path.is_file():
        return path
    if not path.exists():
        raise error(f"{what} {str(path)!r} does not exist")
    state = "a directory" if path.is_dir() else "a file" if path.is_file() else "not a file"
    raise error(f"{what} {str(path)!r} is {state}; give a {'directory' if want_dir else 'file'}")
