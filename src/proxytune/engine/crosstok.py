"""Different tokenizers: steer a base with a pair whose vocabulary is not the base's.

The decode loop stays in the base's ids. A pair of another tokenizer is fed, for every base
token, the pair tokens that spell the same bytes, and is read back in the base's ids::

    fast path   base token t and pair token u are the same string (bytes; specials by name)
                -> t is fed as u, and the pair's log p(t) is its log p(u). Precomputed once
                (an id map); exact: a pair whose vocabulary is the base's with ids permuted
                gives exactly the same-tokenizer result.
    text path   t has no twin: its bytes are spelled in pair tokens u_1..u_m (the pair
                tokenizer's own segmentation of those bytes) and
                    log p_pair(t) = sum_j log p(u_j | context, u_<j)
                the log-probability of exactly what the pair would be fed if t were chosen
                (one extra forward over the candidates, batched). Only the base's
                ``text_candidates`` most likely such tokens per step are scored.
    the rest    tokens on neither path (beyond ``text_candidates``, or special tokens the
                pair lacks) get no pair value: ``-inf`` for expert and anti-expert alike, so
                the proxy offset treats them as neutral (0) and expert-only rules veto them.

Coverage, per row and step, is the base's probability mass on tokens that got a pair value;
a row whose mean coverage falls below ``min_coverage`` is refused (:class:`CoverageError`):
the pair then cannot steer this base in any meaningful way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from ..arithmetic import log_probs
from ..backends.base import DecodeState, RollbackState
from ..errors import ConfigError, ProxyTuneError, VocabularyMismatchError
from ..vocab import (
    byte_level_encoder,
    defined_size,
    is_byte_level,
    shared_vocab_size,
    special_ids,
    token_bytes,
)


class CoverageError(ProxyTuneError):
    """Too little of the base's probability mass maps to the pair's vocabulary."""


@dataclass(frozen=True)
class CrossOptions:
    """The different-tokenizer mode (``cross_tokenizer: true`` or a mapping of these)."""

    min_coverage: float = 0.5
    """Refuse a row whose mean coverage (base mass that got a pair value) drops below this."""
    text_candidates: int = 8
    """Base tokens per step scored on the text path (0: fast path only)."""

    def __post_init__(self) -> None:
        c = self.min_coverage
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 <= c <= 1.0:
            raise ConfigError(f"cross_tokenizer.min_coverage must be in [0, 1], got {c!r}")
        t = self.text_candidates
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ConfigError(f"cross_tokenizer.text_candidates must be an int >= 0, got {t!r}")

    @classmethod
    def parse(cls, value: Any) -> CrossOptions | None:
        """``False``/``None``: off (mismatched tokenizers are refused); ``True``: defaults;
        a mapping of settings; or a :class:`CrossOptions`."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, CrossOptions):
            return value
        if isinstance(value, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ConfigError(f"cross_tokenizer: unknown setting(s) {unknown}; known: {known}")
            return cls(**dict(value))
        raise ConfigError(f"cross_tokenizer must be true, false or a mapping, got {value!r}")


# the vocabulary map -----------------------------------------------------------------------------


SPECIAL_ROLES = ("eos_token", "bos_token", "pad_token", "unk_token")


@dataclass
class VocabMap:
    """How the base's ids reach a pair of another tokenizer (see the module docstring)."""

    base_size: int
    pair_size: int
    fast: torch.Tensor
    """``(V_base,)`` long: the pair id with the same string, or -1."""
    text_ok: torch.Tensor
    """``(V_base,)`` bool: no twin, but its bytes can be spelled in pair tokens."""
    base_bytes: list[bytes | None]
    pair_tokenizer: Any
    byte_level: bool
    _pieces: dict[int, tuple[int, ...]]

    @property
    def fast_share(self) -> float:
        """Share of the base's ids that have a twin in the pair's vocabulary."""
        return float((self.fast >= 0).float().mean())

    def pieces(self, token: int) -> tuple[int, ...]:
        """The pair ids the base id ``token`` is fed as (``()``: the pair does not see it)."""
        hit = self._pieces.get(token)
        if hit is None:
            hit = self._spell(token)
            self._pieces[token] = hit
        return hit

    def _spell(self, token: int) -> tuple[int, ...]:
        twin = int(self.fast[token])
        if twin >= 0:
            return (twin,)
        if not bool(self.text_ok[token]):
            return ()
        raw = self.base_bytes[token] or b""
        if self.byte_level:
            enc = byte_level_encoder()
            model = self.pair_tokenizer.backend_tokenizer.model
            ids = [t.id for t in model.tokenize("".join(enc[b] for b in raw))]
        else:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                return ()
            ids = list(self.pair_tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids or any(i >= self.pair_size for i in ids):
            return ()
        return tuple(ids)

    def base_ids_of(self, pair_ids: Sequence[int]) -> list[int]:
        """Base ids whose twin is one of ``pair_ids`` (to carry a pair's EOS over)."""
        wanted = torch.tensor(list(pair_ids), dtype=torch.long)
        return (torch.isin(self.fast, wanted) & (self.fast >= 0)).nonzero().view(-1).tolist()


def vocab_map(base_tok: Any, base_size: int, pair_tok: Any, pair_size: int) -> VocabMap:
    """Precompute the fast path (identical strings) and which base ids can take the text path.

    Ordinary tokens are twins when their bytes are equal; special tokens when their names are
    equal or they play the same role (EOS to EOS, BOS to BOS, ...).
    """
    base_bytes = token_bytes(base_tok, base_size)
    pair_bytes = token_bytes(pair_tok, pair_size)
    base_special, pair_special = special_ids(base_tok), special_ids(pair_tok)
    plain: dict[bytes, int] = {}
    named: dict[bytes, int] = {}
    for i, b in enumerate(pair_bytes):
        if b is not None:
            (named if i in pair_special else plain).setdefault(b, i)
    for role in SPECIAL_ROLES:  # EOS <-> EOS even when their names differ
        name = getattr(base_tok, role, None)
        pid = getattr(pair_tok, f"{role}_id", None)
        if name and pid is not None and pid < pair_size:
            named.setdefault(str(name).encode("utf-8"), int(pid))
    fast = torch.full((base_size,), -1, dtype=torch.long)
    text_ok = torch.zeros(base_size, dtype=torch.bool)
    for i, b in enumerate(base_bytes):
        if b is None:
            continue
        if i in base_special:
            fast[i] = named.get(b, -1)
        elif b in plain:
            fast[i] = plain[b]
        elif b:
            text_ok[i] = True
    return VocabMap(
        base_size, pair_size, fast, text_ok, base_bytes, pair_tok, is_byte_level(pair_tok), {}
    )


def check_vocabularies(
    base: Any, pairs: Sequence[Any], options: CrossOptions | None
) -> tuple[int, dict[int, VocabMap]]:
    """The shared vocabulary size ``V`` and, per pair of another tokenizer, its map.

    Without ``options`` every model must share one vocabulary (:func:`shared_vocab_size`,
    which names the first mismatch). With them, a pair whose tokenizer differs from the
    base's is mapped instead; its expert and anti-expert must still share one tokenizer.
    """

    def named(m: Any) -> tuple[str, Any, int]:
        return (f"{m.role} ({m.model.name})", m.model.tokenizer, m.model.vocab_width)

    everyone = [named(base)] + [named(m) for p in pairs for m in p.members]
    if options is None:
        return shared_vocab_size(everyone), {}
    same = [named(base)]
    found: dict[int, tuple[Any, int]] = {}  # pair -> (its tokenizer, its vocabulary size)
    own = defined_size(base.model.tokenizer, base.model.vocab_width)
    for i, pair in enumerate(pairs):
        members = [named(m) for m in pair.members]
        try:  # the same vocabulary: every id the base defines, with the same string
            alike = shared_vocab_size([named(base), *members]) == own
        except VocabularyMismatchError:
            alike = False
        if not alike:
            try:
                pair_size = shared_vocab_size(members)
            except VocabularyMismatchError as err:
                raise VocabularyMismatchError(
                    f"pair {i}: the expert and anti-expert must share one tokenizer even in "
                    f"the different-tokenizer mode ({err})"
                ) from None
            found[i] = (pair.members[0].model.tokenizer, pair_size)
        else:
            same.extend(members)
    size = shared_vocab_size(same)
    base_tok = base.model.tokenizer
    base_size = min(size, defined_size(base_tok, base.model.vocab_width))
    maps = {i: vocab_map(base_tok, base_size, tok, n) for i, (tok, n) in found.items()}
    return size, maps


# feeding a pair of another tokenizer ------------------------------------------------------------


class CrossFeeder:
    """The running sides of one pair of another tokenizer, seen in the base's ids.

    ``states[side]`` / ``logits[side]``: side 0 the expert, 1 the anti-expert (absent if the
    rule does not read it). Every state must support ``rollback`` (base tokens become a
    varying number of pair tokens, and the text path scores candidates and forgets them).
    """

    def __init__(
        self,
        vmap: VocabMap,
        states: dict[int, DecodeState],
        logits: dict[int, torch.Tensor],
        options: CrossOptions,
        device: torch.device,
        names: dict[int, str],
    ) -> None:
        for side, state in states.items():
            if not isinstance(state, RollbackState):
                raise ConfigError(
                    f"the {names[side]} has another tokenizer than the base, and the "
                    "different-tokenizer mode needs a decode state that can roll back "
                    "(RollbackState.rollback), and this one cannot"
                )
        self.vmap, self.states, self.logits = vmap, states, logits
        self.options, self.device = options, device
        self.fast_src = (vmap.fast >= 0).nonzero().view(-1).to(device)
        self.fast_dst = vmap.fast[vmap.fast >= 0].to(device)
        self.text_ok = vmap.text_ok.to(device)
        self.scored = 0
        """Candidates scored on the text path so far."""

    # reading ------------------------------------------------------------------------------------

    def rows(self, base_lp: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Each side's ``(B, V)`` log-probs in the base's ids and the ``(B, V)`` mask of
        tokens that got a pair value."""
        rows, vocab = base_lp.shape
        lps = {s: log_probs(x, self.vmap.pair_size).to(self.device) for s, x in self.logits.items()}
        out = {}
        for side, lp in lps.items():
            row = torch.full((rows, vocab), float("-inf"), device=self.device)
            row[:, self.fast_src] = lp[:, self.fast_dst]
            out[side] = row
        mapped = torch.zeros((rows, vocab), dtype=torch.bool, device=self.device)
        mapped[:, self.fast_src] = True
        cands = self._candidates(base_lp)
        if cands:
            values = {s: self._score(lps[s], s, cands) for s in self.states}
            for n, (r, t, _) in enumerate(cands):
                mapped[r, t] = True
                for side in out:
                    out[side][r, t] = values[side][n]
            self.scored += len(cands)
        return out, mapped

    def _candidates(self, base_lp: torch.Tensor) -> list[tuple[int, int, tuple[int, ...]]]:
        """``(row, base id, pair pieces)`` of the base's most likely text-path tokens."""
        k = min(self.options.text_candidates, base_lp.shape[-1])
        if k <= 0 or not bool(self.text_ok.any()):
            return []
        masked = base_lp.masked_fill(~self.text_ok, float("-inf"))
        top = torch.topk(masked, k, dim=-1)
        out = []
        for r in range(base_lp.shape[0]):
            for value, t in zip(top.values[r].tolist(), top.indices[r].tolist(), strict=True):
                pieces = self.vmap.pieces(t) if value > float("-inf") else ()
                if pieces:
                    out.append((r, t, pieces))
        return out

    def _score(
        self, lp0: torch.Tensor, side: int, cands: list[tuple[int, int, tuple[int, ...]]]
    ) -> list[float]:
        """``sum_j log p(u_j | context, u_<j)`` of each candidate's pieces: one forward of
        the batch grown by one row per candidate (the real rows are fed filler and every
        fed id is rolled back, so the state is left as it was)."""
        rows = lp0.shape[0]
        longest = max(len(p) for _, _, p in cands) - 1
        values = [float(lp0[r, p[0]]) for r, _, p in cands]
        if longest == 0:
            return values
        state = self.states[side]
        grown = torch.tensor(list(range(rows)) + [r for r, _, _ in cands], device=self.device)
        feed = torch.zeros((rows + len(cands), longest), dtype=torch.long, device=self.device)
        for n, (_, _, p) in enumerate(cands):
            if len(p) > 1:
                feed[rows + n, : len(p) - 1] = torch.tensor(p[:-1])
        state.keep(grown)
        out = state.advance(feed)  # (B + N, L, W)
        state.keep(torch.arange(rows, device=self.device))
        state.rollback(torch.full((rows,), longest, dtype=torch.long))  # type: ignore[attr-defined]
        lp = log_probs(out[rows:], self.vmap.pair_size)  # (N, L, V_pair)
        for n, (_, _, p) in enumerate(cands):
            for j in range(1, len(p)):
                values[n] += float(lp[n, j - 1, p[j]])
        return values

    # moving on ----------------------------------------------------------------------------------

    def feed(self, tokens: Sequence[int]) -> None:
        """Append each row's chosen base id, as its pair pieces, to every side."""
        pieces = [self.vmap.pieces(int(t)) for t in tokens]
        lengths = [len(p) for p in pieces]
        longest = max(lengths)
        if longest == 0:
            return
        feed = torch.zeros((len(pieces), longest), dtype=torch.long, device=self.device)
        for r, p in enumerate(pieces):
            if p:
                feed[r, : len(p)] = torch.tensor(p)
        last = torch.tensor([max(n - 1, 0) for n in lengths], device=self.device)
        moved = torch.tensor([n > 0 for n in lengths], device=self.device)
        drop = torch.tensor([longest - n for n in lengths], dtype=torch.long)
        for side, state in self.states.items():
            out = state.advance(feed)  # (B, L, W)
            if bool(drop.any()):
                state.rollback(drop)  # type: ignore[attr-defined]
            new = out[torch.arange(len(pieces), device=out.device), last.to(out.device)]
            old = self.logits[side]
            self.logits[side] = torch.where(moved.to(new.device)[:, None], new, old.to(new))

    def keep(self, index: torch.Tensor) -> None:
        for side, state in self.states.items():
            state.keep(index)
            self.logits[side] = self.logits[side][index.to(self.logits[side].device)]
