"""Model backends behind one narrow protocol (see :mod:`proxytune.backends.base`)."""

from .base import DecodeState, LogitsModel

__all__ = ["DecodeState", "LogitsModel"]
