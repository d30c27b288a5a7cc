"""A repeated prompt prefix (a system prompt, a few-shot preamble) prefilled once per model.

>>> tuner = ProxyTuner.from_recipe("default").with_options(prefix_cache=True)  # doctest: +SKIP

:class:`PrefixCachingModel` wraps an :class:`~proxytune.backends.hf.HFModel`. When the prompts
of a batch, or a prompt and a recent one, start with the same ids (at least ``min_tokens``),
that prefix is prefilled once, its keys and values (batch 1) are kept in a small LRU, and each
prompt's remainder is prefilled on top of a copy. Later prompts that start with a cached prefix
reuse it, so the chat template's system turn is computed once per model, not once per request.
The keys and values of a prefix depend on the prefix alone (causal attention), so this is the
plain prefill up to float rounding. A row is laid out ``[prefix | padding | remainder]``: the
mask hides the padding and the explicit positions skip it, as they skip left padding.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

import torch

from .hf import HFDecodeState, HFModel
from .llamacpp import LlamaCppModel
from .llamacpp_prompts import Prefix, common_prefix


class PrefixCachingModel:
    """An :class:`HFModel` whose :meth:`start` reuses the cached prefill of shared prefixes."""

    def __init__(self, lm: HFModel, min_tokens: int = 16, capacity: int = 8) -> None:
        self.lm = lm
        self.min_tokens = min_tokens
        self.capacity = capacity
        self.prefixes: OrderedDict[Prefix, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.recent: deque[Prefix] = deque(maxlen=capacity)
        self.reused_tokens = 0
        """Prompt ids not prefilled thanks to the cache (a counter for reports)."""

    def __getattr__(self, name: str) -> Any:  # name, tokenizer, device, vocab_width, ...
        return getattr(self.lm, name)

    @property
    def vocab_width(self) -> int:
        return self.lm.vocab_width

    @property
    def context_length(self) -> int | None:
        return self.lm.context_length

    @property
    def weight_bytes(self) -> int:
        return self.lm.weight_bytes

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.lm.eos_token_ids

    def start(
        self, prompts: Sequence[Sequence[int]], use_cache: bool = True
    ) -> tuple[HFDecodeState, torch.Tensor]:
        rows = [tuple(int(t) for t in p) for p in prompts]
        prefix = self._prefix(rows) if use_cache and rows and all(rows) else None
        self.recent.extend(rows)
        if prefix is None:
            return self.lm.start(prompts, use_cache=use_cache)
        self.reused_tokens += len(prefix) * len(rows)
        return self._start_after(prefix, rows)

    def _prefix(self, rows: list[Prefix]) -> Prefix | None:
        """A cached prefix of every row (the longest), or a new one worth caching."""
        limit = min(len(r) for r in rows) - 1  # every row keeps one id to prefill
        hits = [p for p in self.prefixes if len(p) <= limit and all(r[: len(p)] == p for r in rows)]
        if hits:
            best = max(hits, key=len)
            self.prefixes.move_to_end(best)
            return best
        shared = common_prefix(rows)[:limit]
        candidates = [shared] if len(rows) > 1 else []
        candidates += [common_prefix([shared, old]) for old in self.recent]
        best = max(candidates, key=len, default=())
        if len(best) < self.min_tokens or not self._plain_cache():
            return None
        self.prefixes[best] = self._prefill(best)
        while len(self.prefixes) > self.capacity:
            self.prefixes.popitem(last=False)
        return best

    def _plain_cache(self) -> bool:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=self.lm.model.config)
        return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)

    def _prefill(self, prefix: Prefix) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of ``prefix`` alone, per layer, ``(1, H, P, D)`` each."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.lm.model.config)
        ids = torch.tensor([prefix], device=self.lm.device)
        self.lm.forward(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            position_ids=torch.arange(len(prefix), device=self.lm.device)[None],
            cache=cache,
            use_cache=True,
            keep=1,
        )
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _start_after(
        self, prefix: Prefix, rows: list[Prefix]
    ) -> tuple[HFDecodeState, torch.Tensor]:
        """Rows ``[prefix | padding | rest]``: copy the prefix's cache, prefill the rests."""
        n, size = len(prefix), len(rows)
        rests = [r[n:] for r in rows]
        width = max(len(r) for r in rests)
        ids = torch.full((size, n + width), self.lm.pad_id, dtype=torch.long)
        mask = torch.zeros((size, n + width), dtype=torch.long)
        ids[:, :n] = torch.tensor(prefix)
        mask[:, :n] = 1
        for i, rest in enumerate(rests):
            ids[i, n + width - len(rest) :] = torch.tensor(rest)
            mask[i, n + width - len(rest) :] = 1
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        device = self.lm.device
        state = HFDecodeState(self.lm, ids.to(device), mask.to(device), positions.to(device), True)
        assert state.cache is not None
        for i, (keys, values) in enumerate(self.prefixes[prefix]):
            state.cache.update(
                keys.expand(size, -1, -1, -1).clone(), values.expand(size, -1, -1, -1).clone(), i
            )
        logits = self.lm.forward(
            input_ids=state.ids[:, n:],
            attention_mask=state.mask,
            position_ids=state.positions[:, n:],
            cache=state.cache,
            use_cache=True,
            keep=1,
        )
        return state, logits[:, -1]


def cache_prefixes(
    models: Sequence[Any], min_tokens: int = 16, capacity: int = 8
) -> list[Any]:
    """``models`` (one per role) with each :class:`~proxytune.backends.hf.HFModel` wrapped in a
    :class:`PrefixCachingModel` (roles that share a model share its cache); a llama.cpp model
    keeps its prefilled prompts instead (:mod:`.llamacpp_prompts`, on the model itself); others
    as given."""
    wrapped: dict[int, PrefixCachingModel] = {}

    def wrap(model: Any) -> Any:
        if isinstance(model, LlamaCppModel):
            model.cache_prompts(min_tokens)
            return model
        if type(model) is not HFModel:
            return model
        return wrapped.setdefault(id(model), PrefixCachingModel(model, min_tokens, capacity))

    return [wrap(m) for m in models]
