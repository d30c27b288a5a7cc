"""PNG plots of token records (matplotlib's Agg canvas; pyplot's backend is never touched).

- ``shift_hist.png``: the distribution of shifts over every generated token;
- ``kl_by_position.png``: KL(base || combined) along each sequence (the first 10);
- ``promoted_tokens.png``: the most promoted tokens by mean shift;
- ``p_base_vs_combined.png``: each token's probability under the base and combined.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..extras import require
from .records import SequenceRecord
from .summary import all_tokens, promoted_tokens


def _figure(width: float = 6.0, height: float = 3.8) -> Any:
    require("matplotlib", "plots", "the analysis plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def write_plots(records: Sequence[SequenceRecord], out_dir: str | Path) -> list[Path]:
    """Write the plots of the module docstring into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokens = all_tokens(records)
    paths = []

    fig = _figure()
    ax = fig.add_subplot()
    ax.hist([t.shift for t in tokens], bins=40, color="tab:blue")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("shift = log p_combined - log p_base (nats)")
    ax.set_ylabel("generated tokens")
    ax.set_title("How steering moved each generated token")
    fig.tight_layout()
    paths.append(out / "shift_hist.png")
    fig.savefig(paths[-1])

    fig = _figure()
    ax = fig.add_subplot()
    for i, r in enumerate(records[:10]):
        xs = [t.position for t in r.tokens if t.kl_base_combined is not None]
        ys = [t.kl_base_combined for t in r.tokens if t.kl_base_combined is not None]
        ax.plot(xs, ys, linewidth=1, label=f"seq {i + 1}")
    ax.set_xlabel("generated position")
    ax.set_ylabel("KL(base || combined) (nats)")
    ax.set_title("Steering strength along each sequence")
    if records:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(out / "kl_by_position.png")
    fig.savefig(paths[-1])

    top = promoted_tokens(records, n=15)
    fig = _figure(6.0, 0.3 * max(len(top), 4) + 1.2)
    ax = fig.add_subplot()
    ax.barh(
        [repr(r["token"]) for r in reversed(top)],
        [r["mean_shift"] for r in reversed(top)],
        color="tab:green",
    )
    ax.set_xlabel("mean shift (nats)")
    ax.set_title("Most promoted tokens")
    fig.tight_layout()
    paths.append(out / "promoted_tokens.png")
    fig.savefig(paths[-1])

    fig = _figure(4.6, 4.2)
    ax = fig.add_subplot()
    ax.scatter([t.p_base for t in tokens], [t.p_combined for t in tokens], s=8, alpha=0.6)
    ax.plot([0, 1], [0, 1], color="gray", linewidth=0.8, linestyle="--")
    ax.set_xlabel("p_base")
    ax.set_ylabel("p_combined")
    ax.set_title("Each generated token")
    fig.tight_layout()
    paths.append(out / "p_base_vs_combined.png")
    fig.savefig(paths[-1])
    return paths
