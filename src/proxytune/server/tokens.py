"""Token ids as the OpenAI API shows them: text, UTF-8 bytes, or ``token_id:N``.

A token's bytes are exact for byte-level BPE (GPT-2, Llama-3, Qwen) and byte-fallback
SentencePiece (``<0xNN>``); a token that is half of a multi-byte character shows as U+FFFD in
``token`` and exactly in ``bytes``.
"""

from __future__ import annotations

import re
from typing import Any

from ..vocab import byte_level_decoder

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenText:
    """Caches each id's display string and bytes for one tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = "ByteLevel" in repr(decoder)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def bytes(self, token_id: int) -> list[int]:
        return self._lookup(token_id)[1]

    def text(self, token_id: int, as_id: bool = False) -> str:
        """The token's text, or ``token_id:N`` (vLLM's ``return_tokens_as_token_ids``)."""
        return f"token_id:{token_id}" if as_id else self._lookup(token_id)[0]

    def _lookup(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._raw_bytes(token_id)
            hit = (raw.decode("utf-8", errors="replace"), list(raw))
            self._cache[token_id] = hit
        return hit

    def _raw_bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
        if piece is None:
            return b""
        if self.byte_level:
            table = byte_level_decoder()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
        match = _BYTE_TOKEN.match(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        text = self.tokenizer.decode([int(token_id)], skip_special_tokens=False)
        return text.encode("utf-8")
