"""Vocabulary reconciliation: which token ids every model in a set can score."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

from .errors import VocabularyMismatchError


def defined_size(tokenizer: Any, head_width: int) -> int:
    """Ids both the tokenizer defines and the head scores: ``min(len(tokenizer), width)``.

    A head wider than its tokenizer has padding rows that decode to nothing; they are never
    scored or sampled.
    """
    return min(len(tokenizer), head_width)


def token_strings(tokenizer: Any, size: int) -> list[str | None]:
    """The token string of each id below ``size``."""
    return list(tokenizer.convert_ids_to_tokens(list(range(size))))


def shared_vocab_size(
    named: Sequence[tuple[str, Any, int]],
) -> int:
    """Check that every tokenizer agrees on ids ``< V`` and return ``V``.

    ``named`` holds ``(model name, tokenizer, head width)``. ``V`` is the smallest
    :func:`defined_size`; tokens past it in a bigger tokenizer (added specials, padding) are
    masked for everyone. Raises :class:`VocabularyMismatchError` naming the first id whose
    string differs.
    """
    if not named:
        raise ValueError("no models given")
    size = min(defined_size(tok, width) for _, tok, width in named)
    ref_name, ref_tok, _ = named[0]
    ref: list[str | None] | None = None
    for name, tok, _ in named[1:]:
        if tok is ref_tok:
            continue
        ref = ref if ref is not None else token_strings(ref_tok, size)
        other = token_strings(tok, size)
        for i, (a, b) in enumerate(zip(ref, other, strict=True)):
            if a != b:
                raise VocabularyMismatchError(
                    f"the tokenizers of {ref_name!r} and {name!r} differ at token id {i}: "
                    f"{a!r} vs {b!r}. Proxy-tuning on logits needs one shared vocabulary: use "
                    "models of the same tokenizer family (same token list), or the "
                    "different-tokenizer mode for pairs whose vocabularies differ."
                )
    return size


@cache
def byte_level_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE's printable stand-in character -> byte (the inverse of
    ``bytes_to_unicode``), to recover a token's exact bytes from its string."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


# token bytes ------------------------------------------------------------------------------------


@cache
def byte_level_encoder() -> dict[int, str]:
    """Byte -> GPT-2 byte-level BPE's printable stand-in character."""
    return {b: c for c, b in byte_level_decoder().items()}


def is_byte_level(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` is byte-level BPE (GPT-2, Llama-3, Qwen style)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return "ByteLevel" in repr(getattr(backend, "decoder", None))


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of special and added tokens (their text is a name, not bytes of text)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i, tok in added.items() if getattr(tok, "special", True))
    return ids


def token_bytes(tokenizer: Any, size: int) -> list[bytes | None]:
    """The bytes each id below ``size`` stands for (a special token: its name, UTF-8).

    Byte-level BPE pieces map through GPT-2's byte table, ``<0xNN>`` pieces are one byte, and
    SentencePiece's ``▁`` is a space; ``None`` where an id has no piece.
    """
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    byte_level = is_byte_level(tokenizer)
    table = byte_level_decoder()
    specials = special_ids(tokenizer)
    out: list[bytes | None] = []
    for i, piece in enumerate(pieces):
        if piece is None:
            out.append(None)
        elif i in specials:
            out.append(piece.encode("utf-8"))
        elif byte_level and all(ch in table for ch in piece):
            out.append(bytes(table[ch] for ch in piece))
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                out.append(bytes([int(piece[3:5], 16)]))
            except ValueError:
                out.append(piece.encode("utf-8"))
        else:
            out.append(piece.replace("▁", " ").encode("utf-8"))
    return out
