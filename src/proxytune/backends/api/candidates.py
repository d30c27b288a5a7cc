"""An API base's candidate tokens as ids of a local tokenizer (:class:`CandidateMapper`), in order:

1. ``token_id:N`` (vLLM's ``return_tokens_as_token_ids``, asked for by default): ``N``, exact.
2. ``bytes:\\xNN...`` (how some servers show a partial UTF-8 token): the token with those bytes.
3. the token's text: the one id whose bytes decode (UTF-8, errors replaced) to that text, else
   the one id whose raw piece (``Ġthe``) is that text; a text that several ids share (half
   characters all show as U+FFFD) or that no id has is *unmapped*: counted, and its mass is
   treated as missing mass.
"""

from __future__ import annotations

from typing import Any

from ...vocab import token_bytes


class CandidateMapper:
    """Maps the endpoint's candidate tokens to ids of a local tokenizer (rule in the module
    docstring). Tables are built on first use of a text candidate."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._by_bytes: dict[bytes, int] | None = None
        self._by_text: dict[str, int | None] = {}
        self._by_piece: dict[str, int | None] = {}

    def id_of(self, token: str) -> int | None:
        """The id of one candidate, or ``None`` when it maps to no single id."""
        if token.startswith("token_id:"):
            try:
                value = int(token[len("token_id:") :])
            except ValueError:
                return None
            return value if 0 <= value < self.vocab_size else None
        self._tables()
        if token.startswith("bytes:"):
            raw = _unescape_bytes(token[len("bytes:") :])
            return None if raw is None else self._by_bytes.get(raw)  # type: ignore[union-attr]
        if token in self._by_text:
            return self._by_text[token]
        return self._by_piece.get(token)

    def _tables(self) -> None:
        if self._by_bytes is not None:
            return
        raw = token_bytes(self.tokenizer, self.vocab_size)
        pieces = self.tokenizer.convert_ids_to_tokens(list(range(self.vocab_size)))
        self._by_bytes = {}
        for i, b in enumerate(raw):
            if b is not None:
                self._by_bytes.setdefault(b, i)
            _unique(self._by_text, b.decode("utf-8", errors="replace") if b else "", i)
            if pieces[i] is not None:
                _unique(self._by_piece, pieces[i], i)


def _unique(table: dict[str, int | None], key: str, value: int) -> None:
    """``table[key] = value``, or ``None`` once a second id has the same key (ambiguous)."""
    table[key] = value if key not in table else None


def _unescape_bytes(text: str) -> bytes | None:
    try:
        return text.encode("latin-1").decode("unicode_escape").encode("latin-1")
    except (UnicodeError, ValueError):
        return None
