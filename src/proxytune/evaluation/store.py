"""Per-example results on disk: one JSON line per example, appended as soon as it is scored.

A run that is interrupted leaves every finished example behind; the next run with the same
settings reads them back and only does the rest. A half-written last line (the process was
killed mid-write) is dropped. Each results file has a ``.meta.json`` beside it holding the
settings that produced it; resuming under other settings is refused instead of mixing them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError


class ResultStore:
    """The JSONL results of one system on one task."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.meta_path = self.path.with_suffix(".meta.json")

    def open(self, meta: Mapping[str, Any], resume: bool = True) -> None:
        """Start (or continue) a run with settings ``meta``.

        With ``resume``, earlier results are kept if they were made with the same ``meta``;
        otherwise this raises :class:`ConfigError`. Without it, earlier results are removed.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        wanted = json.loads(json.dumps(meta, sort_keys=True, default=str))
        if resume and self.path.exists():
            old = self._read_meta()
            if old is not None and old != wanted:
                changed = sorted(k for k in set(old) | set(wanted) if old.get(k) != wanted.get(k))
                raise ConfigError(
                    f"{self.path} holds results made with other settings (changed: {changed}); "
                    "pass --no-resume (resume=False) to start over, or choose another --out"
                )
        elif self.path.exists():
            self.path.unlink()
        self.meta_path.write_text(json.dumps(wanted, indent=2, sort_keys=True) + "\n")

    def _read_meta(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def load(self) -> dict[str, dict[str, Any]]:
        """Finished examples by id; a truncated last line is cut off the file."""
        if not self.path.exists():
            return {}
        out: dict[str, dict[str, Any]] = {}
        good = 0
        with open(self.path, "rb") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    break
                if not line.endswith(b"\n"):
                    break
                out[str(record["id"])] = record
                good += len(line)
        if good < self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(good)
        return out

    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Add finished examples and flush them to disk before returning."""
        lines = "".join(
            json.dumps(r, ensure_ascii=False, default=_jsonable) + "\n" for r in records
        )
        if not lines:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())


def _jsonable(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
