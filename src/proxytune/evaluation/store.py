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
        """Finished examples by id (:func:`load_records`)."""
        return load_records(self.path)

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


def load_records(path: str | Path) -> dict[str, dict[str, Any]]:
    """The records of a JSONL results file by ``id``, in file order ({} if there is none).

    A torn last line (a kill mid-write: no newline) is cut off the file. Any other line that
    is not a JSON object with an ``id`` means the file is not one of these: refused, and the
    file is left as it is.
    """
    path = Path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    out: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(complete.splitlines(), start=1):
        try:
            record = json.loads(line)
            out[str(record["id"])] = record
        except (ValueError, KeyError, TypeError):
            raise ConfigError(
                f"{str(path)!r} line {number} is not a result this command wrote; give a new "
                "output file (nothing in an existing file is overwritten)"
            ) from None
    if len(complete) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    return out


def _jsonable(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
