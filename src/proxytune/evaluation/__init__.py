"""Evaluation: tasks as data, systems, a resumable runner, gap closed, alpha sweeps and search.

>>> from proxytune.evaluation import load_task, standard_systems, evaluate
>>> task = load_task("gsm_symbolic")                                   # doctest: +SKIP
>>> systems = standard_systems(tuner, alphas=[0, 0.5, 1], tuned=tuned)  # doctest: +SKIP
>>> report = evaluate(task, systems, "runs/eval/gsm", limit=50)         # doctest: +SKIP
>>> print(report.table())                                               # doctest: +SKIP

Modules: :mod:`.tasks` (task definitions, built-in data), :mod:`.extract` and
:mod:`.metrics` (pure scoring functions), :mod:`.scoring` (teacher-forced log-likelihood
under the combined distribution), :mod:`.sandbox` (generated code in a separate process),
:mod:`.systems`, :mod:`.rerank` (a system that reranks finished answers), :mod:`.runner`,
:mod:`.report`, :mod:`.search`, :mod:`.lm_eval_adapter`.
Names load on first use, so the pure parts import without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Task": "tasks",
    "load_task": "tasks",
    "builtin_tasks": "tasks",
    "gsm_answer": "extract",
    "last_number": "extract",
    "get_extractor": "extract",
    "exact_match": "metrics",
    "gap_closed": "metrics",
    "pass_at_k": "metrics",
    "multiple_choice_scores": "metrics",
    "score": "scoring",
    "score_ids": "scoring",
    "score_rolling": "scoring",
    "score_sweep": "scoring",
    "ContinuationScore": "scoring",
    "TokenScore": "scoring",
    "run_program": "sandbox",
    "run_programs": "sandbox",
    "ExecResult": "sandbox",
    "System": "systems",
    "standard_systems": "systems",
    "RerankSystem": "rerank",
    "evaluate": "runner",
    "EvalReport": "runner",
    "SystemResult": "runner",
    "write_report": "report",
    "search": "search",
    "SearchResult": "search",
    "ProxyTuneLM": "lm_eval_adapter",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'proxytune.evaluation' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
