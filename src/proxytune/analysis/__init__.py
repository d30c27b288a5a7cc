"""Token-level analysis: what steering changed, token by token (``proxytune analyze``).

>>> records = analyze(tuner, ["Question: 3 + 4?\\nAnswer:"], max_new_tokens=32)  # doctest: +SKIP
>>> write_report(records, "runs/analysis")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .html import render_html, shift_color, write_html
from .plots import write_plots
from .records import (
    SequenceRecord,
    TokenRecord,
    analyze,
    load_records,
    save_records,
    token_texts,
)
from .summary import promoted_tokens, summarize


def write_report(
    records: Sequence[SequenceRecord],
    out_dir: str | Path,
    *,
    title: str = "proxytune: token-level analysis",
    top_tokens: int = 20,
    min_count: int = 1,
) -> dict[str, Path]:
    """Write ``records.jsonl``, ``summary.json``, the PNG plots and ``report.html``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(records, top_tokens, min_count)
    paths: dict[str, Any] = {"records": save_records(records, out / "records.jsonl")}
    paths["summary"] = out / "summary.json"
    paths["summary"].write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    try:
        plots = write_plots(records, out)
    except ImportError as err:  # matplotlib is optional: the report goes on without pictures
        warnings.warn(f"no PNG plots: {err}", stacklevel=2)
        plots = []
    paths.update({p.stem: p for p in plots})
    paths["html"] = write_html(
        records,
        out / "report.html",
        title=title,
        summary=summary,
        images=[p.name for p in plots],
    )
    return paths


__all__ = [
    "SequenceRecord",
    "TokenRecord",
    "analyze",
    "load_records",
    "promoted_tokens",
    "render_html",
    "save_records",
    "shift_color",
    "summarize",
    "token_texts",
    "write_html",
    "write_plots",
    "write_report",
]
