"""A regression gate: a new evaluation run against a saved one, example by example.

For every system both runs scored (``OUT/<system>.jsonl``) and every metric they share, the
examples both hold are paired by id; the change is the mean of the per-example differences,
with a 95% paired-bootstrap interval, and the counts of examples that got better, worse or
stayed. A metric *drops* when the new mean is more than ``max_drop`` below the old one and the
interval lies wholly below zero (the drop is not resampling noise); :func:`failures` lists the
drops of the gated metric, and ``proxytune eval --against OLD_RUN`` exits 1 on any, so CI can
refuse a worse expert.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .stats import Estimate, mean_interval
from .store import ResultStore


@dataclass(frozen=True)
class Change:
    """One system's one metric, new run against old."""

    system: str
    metric: str
    examples: int
    old: float
    new: float
    diff: Estimate
    better: int
    worse: int

    @property
    def same(self) -> int:
        return self.examples - self.better - self.worse

    def dropped(self, max_drop: float) -> bool:
        """A drop beyond ``max_drop`` whose interval excludes no change."""
        high = self.diff.high if self.diff.high is not None else self.diff.value
        return self.new - self.old < -max_drop and high is not None and high < 0


def _scores(path: Path) -> dict[str, dict[str, float]]:
    """Per example id: its numeric scores."""
    out = {}
    for key, record in ResultStore(path).load().items():
        scores = record.get("scores") or {}
        out[key] = {
            m: float(v)
            for m, v in scores.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
    return out


def compare_runs(
    new_dir: str | Path,
    old_dir: str | Path,
    metrics: Sequence[str] | None = None,
    seed: int = 0,
) -> list[Change]:
    """Every (system, metric) both runs hold, paired on the examples both scored."""
    new_root, old_root = Path(new_dir).expanduser(), Path(old_dir).expanduser()
    if not old_root.is_dir():
        raise ConfigError(f"--against {str(old_root)!r} is not a folder of an earlier eval run")
    changes = []
    for new_file in sorted(new_root.glob("*.jsonl")):
        old_file = old_root / new_file.name
        if not old_file.is_file():
            continue
        new, old = _scores(new_file), _scores(old_file)
        ids = sorted(set(new) & set(old))
        names = sorted({m for i in ids for m in new[i]} & {m for i in ids for m in old[i]})
        for metric in names if metrics is None else [m for m in names if m in metrics]:
            paired = [(new[i][metric], old[i][metric]) for i in ids
                      if metric in new[i] and metric in old[i]]  # fmt: skip
            if not paired:
                continue
            diffs = [a - b for a, b in paired]
            changes.append(
                Change(
                    system=new_file.stem,
                    metric=metric,
                    examples=len(paired),
                    old=sum(b for _, b in paired) / len(paired),
                    new=sum(a for a, _ in paired) / len(paired),
                    diff=mean_interval(diffs, seed=seed),
                    better=sum(d > 0 for d in diffs),
                    worse=sum(d < 0 for d in diffs),
                )
            )
    if not changes:
        raise ConfigError(
            f"{str(new_root)!r} and {str(old_root)!r} share no system, metric or example to "
            "compare (same task and systems?)"
        )
    return changes


def failures(changes: Sequence[Change], metric: str, max_drop: float) -> list[Change]:
    """The changes of ``metric`` that dropped beyond ``max_drop``."""
    if not any(c.metric == metric for c in changes):
        known = sorted({c.metric for c in changes})
        raise ConfigError(f"--gate-metric {metric!r} is in neither run; metrics: {known}")
    return [c for c in changes if c.metric == metric and c.dropped(max_drop)]


def table(changes: Sequence[Change], failed: Sequence[Change] = ()) -> str:
    """A Markdown table of the changes (``DROP`` marks the failures)."""
    lines = [
        "| system | metric | n | old | new | change [95% CI] | better | worse | same | gate |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in changes:
        d = c.diff
        interval = "" if d.low is None or d.high is None else f" [{d.low:+.3f}, {d.high:+.3f}]"
        mark = "DROP" if c in failed else ""
        lines.append(
            f"| {c.system} | {c.metric} | {c.examples} | {c.old:.3f} | {c.new:.3f} | "
            f"{c.new - c.old:+.3f}{interval} | {c.better} | {c.worse} | {c.same} | {mark} |"
        )
    return "\n".join(lines)
