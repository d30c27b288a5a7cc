"""The seam between the engine and a model: full next-token logits, with a cache.

A backend turns token ids into logits; it never sees text, alphas or sampling. The engine
keeps one :class:`DecodeState` per model role, so two roles may share one set of weights
(the expert and anti-expert of the prompt-based set-up) while each keeps its own cache.

:class:`LogitsModel` and :class:`DecodeState` are all a backend must implement. The optional
capabilities below are separate protocols: a backend implements the ones it can, and the
engine checks for them in one place (:mod:`proxytune.engine.capabilities`).

===================  =========================================  ==========================
capability           protocol                                   used by
===================  =========================================  ==========================
rollback             :class:`RollbackState`                     speculative decoding
extend / compact     :class:`ExtendableState`                   the server's running batch
start alone          :class:`StartsAlone`                       the speculative drafter
top-k only           :class:`TopKOnly`                          an API base (black-box loop)
candidate scoring    :class:`CandidateScoring`, `HiddenState`   rules that re-rank the base's
                                                                candidates (``rerank``)
===================  =========================================  ==========================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

import torch


def end_ids(generation_eos: Any, tokenizer_eos: int | None) -> tuple[int, ...]:
    """The ids that end a sequence: a generation config's ``eos_token_id`` (one id, a list or
    ``None``), then the tokenizer's EOS, without repeats.

    >>> end_ids([151645, 151643], 151643), end_ids(2, None), end_ids(None, 0)
    ((151645, 151643), (2,), (0,))
    """
    ids = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
    if tokenizer_eos is not None:
        ids.append(tokenizer_eos)
    return tuple(dict.fromkeys(int(i) for i in ids))


@runtime_checkable
class DecodeState(Protocol):
    """A batch of sequences in flight on one model."""

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``(B, k)`` ids to every row; return the logits at those ``k`` positions,
        ``(B, k, W)`` in float32 on the model's device."""
        ...

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices into the current batch), in that order."""
        ...


@runtime_checkable
class RollbackState(DecodeState, Protocol):
    """A :class:`DecodeState` that can forget its last ids (speculative decoding's rejected
    drafts). Optional: the plain decode loop never calls it."""

    def rollback(self, drop: torch.Tensor) -> None:
        """Forget the last ``drop[r]`` ids of each row ``r`` (``(B,)`` ints >= 0), as if they had
        never been advanced: the next :meth:`advance` continues from what is left."""
        ...


@runtime_checkable
class ExtendableState(DecodeState, Protocol):
    """A :class:`DecodeState` that rows can join between steps (continuous batching)."""

    @property
    def can_extend(self) -> bool:
        """Whether :meth:`extend` can merge another state into this one now."""
        ...

    def extend(self, other: Any) -> None:
        """Append the rows of ``other`` (a state of the same model) after this one's."""
        ...

    def compact(self) -> None:
        """Free the cache space left by rows that were dropped."""
        ...


@runtime_checkable
class LogitsModel(Protocol):
    """A causal LM that exposes full next-token logits (local weights)."""

    name: str
    tokenizer: Any
    device: torch.device

    @property
    def vocab_width(self) -> int:
        """Width ``W`` of the logits (lm_head rows, padding included)."""
        ...

    @property
    def context_length(self) -> int | None:
        """Most positions the model accepts, if known."""
        ...

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end a sequence for this model."""
        ...

    def start(
        self, prompts: Sequence[Sequence[int]], use_cache: bool = True
    ) -> tuple[DecodeState, torch.Tensor]:
        """Prefill ``prompts`` (ragged); return the state and last-position logits ``(B, W)``."""
        ...


@runtime_checkable
class StartsAlone(Protocol):
    """A model whose states normally run together with another role's (a stacked group, a
    one-pass LoRA pair) and that can also start a state that runs on its own."""

    def start_alone(
        self, prompts: Sequence[Sequence[int]], use_cache: bool = True
    ) -> tuple[DecodeState, torch.Tensor]:
        """As :meth:`LogitsModel.start`, never grouped with another role."""
        ...


@runtime_checkable
class SharesWeights(Protocol):
    """A role's view of weights another object owns (a role stacked on one model, one half of
    a one-pass LoRA pair). Views of one owner never decode at once
    (:func:`~proxytune.engine.overlap.engine`)."""

    @property
    def shared_weights(self) -> Any:
        """The owner of the weights this view computes with (itself a view, or not)."""
        ...


@runtime_checkable
class KnowsWeightBytes(Protocol):
    """A model that can say how many bytes of weights one decoding forward reads (the
    speculative drafter's cost prior)."""

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights as stored (int8 at 1 byte, packed 4-bit at its size)."""
        ...


class BaseRows(Protocol):
    """The base's rows of one black-box generation (:mod:`proxytune.engine.blackbox`), step
    by step: an API base's live rows (:meth:`TopKOnly.start_rows`), or a local base's."""

    @property
    def notes(self) -> list[str]:
        """What the base wants said about this generation (an endpoint's fallbacks)."""
        ...

    @property
    def prompt_path(self) -> str | None:
        """How prompts travelled to an API base (``tokens`` or ``text``; ``None``: local)."""
        ...

    def logprobs(
        self, rooms: Sequence[int], vocab_size: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Every live row's ``(B, V)`` log-probs, the ``(B, V)`` mask of ids the base scored
        itself (``None``: every id) and ``(B,)`` the share of its mass that mapped to ids.
        ``rooms``: tokens each row may still generate."""
        ...

    def support(
        self, known: torch.Tensor | None, experts: Sequence[torch.Tensor | None]
    ) -> torch.Tensor | None:
        """``(B, V)`` mask of the ids the rule may choose this step (``None``: all), from the
        base's ``known`` ids and the experts' log-probs."""
        ...

    def keep(self, rows: list[int]) -> None:
        """Keep only the live rows at ``rows``."""
        ...

    def advance(self, tokens: torch.Tensor) -> None:
        """Append each live row's chosen id (``(B,)``)."""
        ...


@runtime_checkable
class TopKOnly(Protocol):
    """A model that returns only its top-k log-probs per step (a base behind an API); the
    engine runs it in the black-box loop (:mod:`proxytune.engine.blackbox`)."""

    top_k_only: bool

    def start_rows(
        self,
        prompt_ids: Sequence[Sequence[int]],
        fmt: Any,
        prompts: Sequence[Any],
        chunks: ChunkStats,
        usage: APIUsage,
    ) -> BaseRows:
        """One generation's rows: each prompt as ids (``prompt_ids``) and as ``prompts``
        rendered in ``fmt`` (a text path sends those); ``chunks`` and ``usage`` fill in."""
        ...


# what a top-k-only model counts -------------------------------------------------------------------


@dataclass
class APIUsage:
    """What the endpoint was asked for and billed, over the model's lifetime (or one call of
    ``generate`` when a :class:`~proxytune.engine.blackbox.BlackBoxStats` is passed)."""

    calls: int = 0
    """HTTP requests answered 200 (a request carries every row that needs the endpoint)."""
    row_requests: int = 0
    """Prompts sent, summed over calls."""
    attempts: int = 0
    """HTTP requests made, retries and refused ones included."""
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    positions: int = 0
    """Token positions whose candidates came back (drafted chunk positions included)."""
    candidates: int = 0
    unmapped: int = 0
    """Candidates that mapped to no id (see :class:`~.api.candidates.CandidateMapper`)."""
    seconds: float = 0.0

    def add(self, other: APIUsage) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class ChunkStats:
    """Counts of one generation on an API base (see
    :class:`~proxytune.engine.blackbox.BlackBoxStats`)."""

    served: int = 0
    """Steps whose candidates came from an earlier call's drafted chunk (no call)."""
    agreed: int = 0
    """Drafted tokens the loop chose too (their next position stayed valid)."""
    disagreed: int = 0
    wasted: int = 0
    """Drafted positions thrown away after a disagreement (or a finished row)."""
    text_drift: int = 0
    """Text prompts whose re-tokenization differs from the loop's ids (text mode only)."""
    tbt_calls: int = 0
    """Calls a token-by-token run would have made (one per step, every live row batched)."""
    tbt_row_requests: int = 0
    tbt_prompt_tokens: int = 0
    """Prompt tokens a token-by-token run would have sent (each row's prefix, every step)."""
    chunks: list[int] = field(default_factory=list)
    """The chunk length of every call made."""


@runtime_checkable
class HiddenState(DecodeState, Protocol):
    """A :class:`DecodeState` that may return final hidden states instead of logits."""

    hidden: bool
    """True: :meth:`~DecodeState.advance` returns ``(B, k, H)`` final-norm outputs (the output
    matrix was not applied), to be scored by :meth:`CandidateScoring.candidate_logits`."""


@runtime_checkable
class CandidateScoring(Protocol):
    """A model that can stop each forward before its output matrix and score only the ids
    asked for: where a step needs the logits of a few candidate tokens (``rerank``: the base's
    top k), this skips the ``H x W`` head product for the other ``W - k``."""

    @property
    def scores_candidates(self) -> bool:
        """Whether :meth:`candidate_logits` reproduces this model's own logits."""
        ...

    def start_hidden(
        self, prompts: Sequence[Sequence[int]], use_cache: bool = True
    ) -> tuple[DecodeState, torch.Tensor]:
        """As :meth:`LogitsModel.start`, with a state that returns hidden states (and the last
        position's ``(B, H)``); where it cannot now, a plain state and logits (the state's
        :attr:`HiddenState.hidden` says which)."""
        ...

    def candidate_logits(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``(N, H)`` hidden states and ``(n,)`` ids -> the ``(N, n)`` float32 logits at ids."""
        ...
