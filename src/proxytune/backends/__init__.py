"""Model backends behind one narrow protocol (see :mod:`proxytune.backends.base`).

Backends import nothing above them: not the engine, rules or sampling.
"""

from .base import (
    DecodeState,
    ExtendableState,
    LogitsModel,
    RollbackState,
    StartsAlone,
    TopKOnly,
)

__all__ = [
    "DecodeState",
    "ExtendableState",
    "LogitsModel",
    "RollbackState",
    "StartsAlone",
    "TopKOnly",
]
