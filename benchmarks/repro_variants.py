"""Steering variants on a finished ``proxytune reproduce`` run: does calibration, gating, an
alpha schedule or an offset on the ending tokens alone let the base's own skill through where
plain proxy-tuning copies the expert?

    python benchmarks/repro_variants.py runs/reproduce --tasks sort_words --variants alpha=4,gated

Each variant runs on the test split at the proxy's alpha chosen on validation, with the run's
trained models; results go to ``OUT/eval/TASK/variants/`` (resumable like every evaluation) and
a table with 95% bootstrap intervals and gap closed is printed and written to
``OUT/variants.md``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from proxytune.evaluation import evaluate
from proxytune.evaluation.stats import aligned, gap_interval, mean_interval
from proxytune.evaluation.systems import System
from proxytune.reproduce import Experiment, ReproduceConfig
from proxytune.reproduce.report import per_example
from proxytune.reproduce.tasks import eval_task
from proxytune.rules import StepContext
from proxytune.schedules import Linear


def ending_ids(tokenizer: Any, eos: Sequence[int]) -> list[int]:
    """The ids that end an answer: end-of-sequence, and every token whose text holds a newline
    (the tasks stop at one)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return sorted(set(eos) | {i for i, text in enumerate(texts) if "\n" in text})


def end_only(ends: Sequence[int]) -> Any:
    """The proxy rule with each pair's offset added on the ``ends`` ids only: the base chooses
    the content, the pair only where the answer stops."""
    index = torch.tensor(list(ends))

    def end_only_proxy(ctx: StepContext) -> torch.Tensor:
        scores = ctx.base.clone()
        for (expert, anti), alpha in zip(*ctx.ran(), strict=True):
            scores[:, index] += alpha * (expert[:, index] - anti[:, index])
        return scores

    return end_only_proxy


def variants(alpha: float, ends: Sequence[int] = ()) -> dict[str, tuple[Any, Any]]:
    """name -> (alpha, rule), around the proxy's chosen ``alpha``; ``ends``: the ids that end
    an answer (:func:`ending_ids`)."""
    return {
        # flatten the pair's distributions before taking their log-ratio (calibration)
        "calibrated": (
            alpha,
            {"name": "proxy", "temperatures": {"expert": 2.0, "anti_expert": 2.0}},
        ),
        # steer only where the expert is more confident than the base
        "gated": (alpha, {"name": "gated"}),
        # full steer on the first tokens (format), fading to a quarter by the fourth
        "fading": (Linear(alpha, alpha / 4, 4), "proxy"),
        # the base's content, the pair's decision to stop
        "end-only": (alpha, end_only(ends)),
    }


def chosen(names: list[str], alpha: float, ends: Sequence[int]) -> dict[str, tuple[Any, Any]]:
    """The variants asked for: names from :func:`variants`, or ``alpha=A`` (plain proxy)."""
    known = variants(alpha, ends)
    out = {}
    for name in names:
        if name.startswith("alpha="):
            out[f"proxy@{float(name[6:]):g}"] = (float(name[6:]), "proxy")
        elif name in known:
            out[name] = known[name]
        else:
            raise SystemExit(f"unknown variant {name!r}; use {', '.join(known)} or alpha=A")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="a finished reproduce run's folder")
    parser.add_argument("--tasks", default=None, help="comma-separated; default: all")
    parser.add_argument(
        "--variants",
        default="calibrated,gated,fading",
        help="comma-separated: calibrated, gated, fading, end-only, alpha=A",
    )
    args = parser.parse_args()
    out = Path(args.out)
    recorded = json.loads((out / "reproduce.json").read_text())["config"]
    recorded.setdefault("backend", "transformers")  # runs made before the setting existed
    config = ReproduceConfig.from_dict(recorded)
    exp = Experiment(config, print)
    tasks = args.tasks.split(",") if args.tasks else list(exp.tasks)
    tuner = exp.proxy_tuner()
    ends = ending_ids(tuner.base.model.tokenizer, tuner.eos_token_ids)
    lines = ["| task | metric | system | score | gap closed |", "|---|---|---|---|---|"]
    for task in tasks:
        kind = exp.kind(task)
        alpha = exp.chosen_alphas()[task]["proxy"]
        systems = [
            System(name, tuner, "other", a, rule)
            for name, (a, rule) in chosen(args.variants.split(","), alpha, ends).items()
        ]
        evaluate(
            eval_task(kind, str(exp.data_file(task, "test"))),
            systems,
            out / "eval" / task / "variants",
            batch_size=config.eval_batch_size,
            write_summary=False,
        )
        for metric in kind.metrics:
            ids = sorted(per_example(out, task, "test", "base", metric))
            stored = {
                s: per_example(out, task, "test", s, metric) for s in ("base", "tuned", "proxy")
            }
            stored.update(
                {s.name: per_example(out, task, "variants", s.name, metric) for s in systems}
            )
            scores = aligned(stored, ids)
            for name in ["proxy", *(s.name for s in systems)]:
                gap, _ = gap_interval(scores[name], scores["base"], scores["tuned"])
                lines.append(
                    f"| {task} | {metric} | {name} | "
                    f"{mean_interval(scores[name]).percent()} | {gap.percent()} |"
                )
    table = "\n".join(lines) + "\n"
    (out / "variants.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
