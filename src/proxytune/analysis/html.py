"""A standalone HTML report: every generated token coloured by its shift.

Green tokens were raised by steering (``log p_combined > log p_base``), red ones lowered;
the stronger the colour, the larger the shift (full colour at ``|shift| >= scale`` nats). A
solid underline marks a token that steering made the top choice. Hovering a token shows its
probabilities, ranks, KL and the base's and combined distributions' best alternatives.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .records import SequenceRecord, TokenRecord
from .summary import summarize

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
.seq { border: 1px solid #ddd; border-radius: 6px; padding: 0.8em 1em; margin: 1em 0; }
.prompt { color: #666; white-space: pre-wrap; font-family: ui-monospace, monospace; }
.out { white-space: pre-wrap; font-family: ui-monospace, monospace; line-height: 1.7; }
.tok { border-radius: 3px; padding: 1px 0; }
.top { border-bottom: 2px solid #1a7f37; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: right; }
td:first-child, th:first-child { text-align: left; font-family: ui-monospace, monospace; }
.legend span { padding: 0.1em 0.5em; margin-right: 0.3em; border-radius: 3px; }
"""


def shift_color(shift: float, scale: float = 2.0) -> str:
    """Green for a positive shift, red for a negative one; alpha grows with ``|shift|``.

    >>> shift_color(0.0)
    'rgba(0, 0, 0, 0.00)'
    >>> shift_color(4.0)
    'rgba(46, 160, 67, 0.75)'
    """
    strength = min(abs(shift) / scale, 1.0) * 0.75
    if shift > 0:
        return f"rgba(46, 160, 67, {strength:.2f})"
    if shift < 0:
        return f"rgba(207, 34, 46, {strength:.2f})"
    return "rgba(0, 0, 0, 0.00)"


def _title(t: TokenRecord) -> str:
    def pct(p: float | None) -> str:
        return "-" if p is None else f"{100 * p:.2f}%"

    lines = [
        f"token {t.token_id} {t.token!r} at {t.position}",
        f"p_combined {pct(t.p_combined)}  p_base {pct(t.p_base)}",
        *(f"p_expert[{i}] {pct(p)}" for i, p in enumerate(t.p_experts)),
        *(f"p_anti_expert[{i}] {pct(p)}" for i, p in enumerate(t.p_antis)),
        f"shift {t.shift:+.3f} nats",
        f"rank base {t.rank_base} -> combined {t.rank_combined}",
        "KL(base||combined) "
        + ("inf" if t.kl_base_combined is None else f"{t.kl_base_combined:.4f}"),
    ]
    if t.top_base:
        lines.append("base top: " + ", ".join(f"{s!r} {pct(p)}" for s, p in t.top_base))
    if t.top_combined:
        lines.append("combined top: " + ", ".join(f"{s!r} {pct(p)}" for s, p in t.top_combined))
    return "\n".join(lines)


def token_spans(record: SequenceRecord, scale: float = 2.0) -> str:
    """The output of one sequence as coloured ``<span>`` elements."""
    spans = []
    for t in record.tokens:
        cls = "tok top" if t.promoted_to_top else "tok"
        text = t.text if t.text else "\u200b"
        spans.append(
            f'<span class="{cls}" style="background:{shift_color(t.shift, scale)}" '
            f'title="{html.escape(_title(t), quote=True)}">{html.escape(text)}</span>'
        )
    return "".join(spans)


def render_html(
    records: Sequence[SequenceRecord],
    title: str = "proxytune: token-level analysis",
    scale: float = 2.0,
    summary: dict[str, Any] | None = None,
    images: Sequence[str] = (),
) -> str:
    """The whole report as one HTML string (no external files except ``images``)."""
    summary = summary if summary is not None else summarize(records)
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        '<p class="legend">Colour = shift log p<sub>combined</sub> - log p<sub>base</sub>: '
        f'<span style="background:{shift_color(scale, scale)}">raised</span>'
        f'<span style="background:{shift_color(-scale, scale)}">lowered</span> '
        f"(full colour at {scale:g} nats); underlined = steering made it the top choice. "
        "Hover a token for its probabilities.</p>",
        _summary_table(summary),
    ]
    for src in images:
        parts.append(f'<img src="{esc(src)}" alt="{esc(src)}" style="max-width:48%">')
    for i, r in enumerate(records):
        alpha = "" if r.alpha is None else f", alpha {r.alpha:g}"
        parts += [
            f'<div class="seq"><h3>Sequence {i + 1}{esc(alpha)} ({esc(r.finish_reason)})</h3>',
            f'<div class="prompt">{esc(r.prompt)}</div><hr>',
            f'<div class="out">{token_spans(r, scale)}</div></div>',
        ]
    parts.append("</body></html>")
    return "\n".join(parts)


def _summary_table(summary: dict[str, Any]) -> str:
    def num(v: Any, fmt: str = "{:.4f}") -> str:
        return "-" if v is None else fmt.format(v)

    rows = [
        "<h2>Summary</h2><table>",
        f"<tr><td>sequences</td><td>{summary['sequences']}</td></tr>",
        f"<tr><td>tokens</td><td>{summary['tokens']}</td></tr>",
        f"<tr><td>mean shift (nats)</td><td>{num(summary['mean_shift'])}</td></tr>",
        "<tr><td>mean KL(base||combined)</td>"
        f"<td>{num(summary['mean_kl_base_combined'])}</td></tr>",
        f"<tr><td>promoted to top</td><td>{summary['promoted_to_top']}</td></tr>",
        "</table><h2>Most promoted tokens</h2><table>",
        "<tr><th>token</th><th>count</th><th>mean shift</th><th>mean p_base</th>"
        "<th>mean p_combined</th><th>made top</th></tr>",
    ]
    for r in summary["most_promoted"]:
        rows.append(
            f"<tr><td>{html.escape(repr(r['token']))}</td><td>{r['count']}</td>"
            f"<td>{r['mean_shift']:+.3f}</td><td>{r['mean_p_base']:.4f}</td>"
            f"<td>{r['mean_p_combined']:.4f}</td><td>{r['promoted_to_top']}</td></tr>"
        )
    rows.append("</table>")
    return "\n".join(rows)


def write_html(records: Sequence[SequenceRecord], path: str | Path, **options: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(records, **options), encoding="utf-8")
    return path
