"""Prompts a llama.cpp model has prefilled, kept in host memory to be restored, not prefilled
again.

An evaluation runs every system over the same prompts (the alphas of a sweep, the rules of a
comparison on one loaded pair), and a server sees the same prompt again (retries, ``n``
samples sent as separate requests). :class:`PromptCache` keeps, per prompt, the bytes of its
sequence's keys and values (``llama_state_seq_get_data``) and the output row its prefill
returned, in least-recently-used order within a byte budget. A restored prompt's keys, values
and output are the very bytes its prefill produced; they land in other cells of the KV cache,
so the decodes after it differ from a fresh prefill's by float rounding only, as another batch
composition does (the same tokens in the tests and on the reproduction's records,
docs/speed.md). Turned on by the engine option ``prefix_cache``, which also prefills the
preamble a batch's prompts share (a few-shot prompt's examples) once, its cells shared by
every row (:func:`common_prefix`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_BUDGET = 1 << 30
"""Bytes a model's prompt cache may hold (keys, values and output rows together)."""

Prefix = tuple[int, ...]


def common_prefix(rows: Sequence[Sequence[int]]) -> Prefix:
    """The longest run of ids every row starts with.

    >>> common_prefix([[1, 2, 3], [1, 2, 4]])
    (1, 2)
    """
    first = rows[0]
    n = min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != first[i] for r in rows):
            return tuple(first[:i])
    return tuple(first[:n])


@dataclass(frozen=True)
class Prefilled:
    """One prompt's prefill: its sequence's state bytes and its last position's output row."""

    state: bytes
    output: np.ndarray

    @property
    def size(self) -> int:
        return len(self.state) + self.output.nbytes


class PromptCache:
    """Prefilled prompts by ``(ids, hidden)``, least recently used dropped first.

    >>> cache = PromptCache(budget=20)
    >>> cache.put((1, 2), False, Prefilled(b"12345678", np.zeros(2, np.float32)))
    >>> cache.get((1, 2), False).state, cache.get((1, 2), True)
    (b'12345678', None)
    >>> cache.put((3,), False, Prefilled(b"87654321", np.zeros(2, np.float32)))
    >>> cache.get((1, 2), False) is None, cache.size  # over 20 bytes: the oldest went
    (True, 16)
    """

    def __init__(self, budget: int = DEFAULT_BUDGET, min_tokens: int = 1) -> None:
        self.budget = budget
        self.min_tokens = min_tokens
        """Shorter prompts are prefilled every time (cheap, and not worth the bytes)."""
        self.entries: OrderedDict[tuple[Prefix, bool], Prefilled] = OrderedDict()
        self.size = 0
        self.restored_tokens = 0
        """Prompt ids restored instead of prefilled (a counter for reports and tests)."""
        self.shared_tokens = 0
        """Prompt ids not prefilled because another row's shared preamble held them."""

    def wants(self, ids: Prefix) -> bool:
        """Whether a prompt of ``ids`` is kept (it has at least :attr:`min_tokens`)."""
        return len(ids) >= self.min_tokens

    def get(self, ids: Prefix, hidden: bool) -> Prefilled | None:
        entry = self.entries.get((ids, hidden))
        if entry is not None:
            self.entries.move_to_end((ids, hidden))
        return entry

    def put(self, ids: Prefix, hidden: bool, entry: Prefilled) -> None:
        """Keep ``entry`` (not if it alone exceeds the budget), dropping the oldest to fit."""
        if entry.size > self.budget:
            return
        old = self.entries.pop((ids, hidden), None)
        if old is not None:
            self.size -= old.size
        self.entries[(ids, hidden)] = entry
        self.size += entry.size
        while self.size > self.budget:
            _, dropped = self.entries.popitem(last=False)
            self.size -= dropped.size
