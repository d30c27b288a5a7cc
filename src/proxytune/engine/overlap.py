"""Several models' forwards at once: one thread per engine, the weights a model computes with.

Proxy-tuning runs a base and one or more expert/anti-expert pairs per token, one forward after
the other. A batch-1 forward does not keep every core of a CPU busy (torch's intra-op threads
barely help there: docs/speed.md measures it), and on a GPU each forward spends host time
launching kernels; so running the base's forward in the calling thread while the pair's run in
another hides much of the small models' time. Roles that compute with the same weights (the
embedded default's expert and anti-expert, a stacked group, a one-pass LoRA pair) form one
engine and run one after the other in one thread, in the order given, as they would
sequentially. Each forward computes exactly what it computes alone, so the output is the same
with or without overlap.

On CUDA the threads share each device's default stream: the host-side work overlaps, and
models on different devices run at the same time; separate CUDA streams are not used. On MPS
nothing is overlapped (:func:`can_overlap`).

Threads follow cores: while engines run at once, those whose thread count may change (llama.cpp
contexts whose ``threads`` were left ``auto``: ``shares_cores``) split the cores between them
(:func:`split_threads`, by ``thread_cost``), less the threads of those with a count given; one
after the other, each gets its own count back. Two contexts of two threads each on two cores
compete for them (docs/speed.md measures it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from ..backends.base import SharesWeights
from ..specs import available_cores

T = TypeVar("T")

WORKERS = 8
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def engine(model: Any) -> Any:
    """The object whose weights ``model`` computes with: views
    (:class:`~proxytune.backends.base.SharesWeights`) are followed down to their owner."""
    while isinstance(model, SharesWeights):
        model = model.shared_weights
    return model


def split_threads(cores: int, weights: Sequence[float]) -> list[int]:
    """Threads for contexts that decode at once, ``weights`` their costs: they add up to
    ``cores``, at least 1 each (1 each with fewer cores than contexts). Each core in turn goes
    to the context with the most cost per thread, so the slowest of them (cost / threads, were
    threads to scale perfectly) is as fast as it can be.

    >>> split_threads(2, [3.0, 1.0]), split_threads(4, [1.0, 1.0]), split_threads(8, [3.0, 1.0])
    ([1, 1], [2, 2], [6, 2])
    >>> split_threads(1, [1.0, 2.0, 3.0])
    [1, 1, 1]
    """
    threads = [1] * len(weights)
    for _ in range(cores - len(weights)):
        most = max(range(len(weights)), key=lambda i: weights[i] / threads[i])
        threads[most] += 1
    return threads


def concurrent_threads(
    engines: Sequence[Any], calls: Sequence[int], cores: int | None = None
) -> dict[Any, int]:
    """Threads for each engine of ``engines`` (running at once, ``calls`` calls each) that
    ``shares_cores``: ``cores`` (default :func:`available_cores`) less the ``threads`` of
    engines with a fixed count, split by each one's ``thread_cost`` times its calls."""
    sharing = [(e, n) for e, n in zip(engines, calls, strict=True) if _shares_cores(e)]
    if not sharing:
        return {}
    fixed = sum(getattr(e, "threads", 0) or 0 for e in engines if not _shares_cores(e))
    left = (available_cores() if cores is None else cores) - fixed
    weights = [float(e.thread_cost) * n for e, n in sharing]
    split = split_threads(left, weights)
    return {e: t for (e, _), t in zip(sharing, split, strict=True)}


def _shares_cores(engine: Any) -> bool:
    return getattr(engine, "shares_cores", False) is True


def can_overlap(models: Sequence[Any]) -> bool:
    """Whether ``models`` may run in several threads: not on Apple's MPS, whose command
    queues torch does not make safe across threads (there they run one after the other)."""
    return all(getattr(getattr(m, "device", None), "type", None) != "mps" for m in models)


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="proxytune-overlap")
        return _pool


def run_grouped(calls: Sequence[tuple[Hashable, Callable[[], T]]], overlap: bool) -> list[T]:
    """Run ``calls`` (``(engine key, thunk)`` pairs) and return their results in order.

    With ``overlap``, the calls of each engine run in order in one thread, the first engine's
    in the calling thread and the others' in worker threads, all engines at once, the engines
    that share cores with their :func:`concurrent_threads` meanwhile. If a call fails, every
    other engine still finishes its calls before the first error is raised.
    """
    if not overlap:
        return [call() for _, call in calls]
    groups: dict[Hashable, list[int]] = {}
    for i, (key, _) in enumerate(calls):
        groups.setdefault(key, []).append(i)
    if len(groups) < 2:
        return [call() for _, call in calls]
    results: list[Any] = [None] * len(calls)
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def run(indices: list[int]) -> None:  # autograd modes are per thread: take the caller's
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            for i in indices:
                results[i] = calls[i][1]()

    first, *rest = groups.values()
    shares = concurrent_threads(list(groups), [len(indices) for indices in groups.values()])
    for key, threads in shares.items():
        key.use_threads(threads)
    error: BaseException | None = None
    try:
        futures: list[Future[None]] = [_executor().submit(run, indices) for indices in rest]
        try:
            run(first)
        except BaseException as err:
            error = err
        for future in futures:
            try:
                future.result()
            except BaseException as err:
                error = error or err
    finally:
        for key in shares:
            key.use_threads(None)  # one after the other again: its own count
    if error is not None:
        raise error
    return results
