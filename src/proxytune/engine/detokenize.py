"""Incremental detokenization with stop strings: token ids in, stable text deltas out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"  # what a half-decoded multi-byte character decodes to


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Index of the earliest stop string in ``text[start:]`` (absolute), or -1."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else -1


class TextTracker:
    """Follows one row's generated ids and says which text is safe to show.

    ``push`` returns the new text that can no longer change: a trailing half character is
    held back, and so are the last ``len(longest stop) - 1`` characters, which could still
    become the start of a stop string. ``finish`` releases the rest.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False
        self.stop_hit: str | None = None

    def _decode(self) -> str:
        return self.tokenizer.decode(
            self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def push(self, token_id: int) -> str:
        """Add one id; return the text delta now safe to emit. Sets ``stopped`` on a stop hit."""
        self.ids.append(int(token_id))
        self.text = self._decode()
        if self.stops:
            hit = find_stop(self.text, self.stops, max(0, self.emitted - self.holdback))
            if hit >= 0:
                self.stop_hit = next(s for s in self.stops if self.text.startswith(s, hit))
                self.text = self.text[:hit]
                self.stopped = True
                return self._release(len(self.text))
        stable = len(self.text.rstrip(REPLACEMENT))
        return self._release(max(self.emitted, stable - self.holdback))

    def finish(self) -> str:
        """Release everything left (half characters included, as the tokenizer decodes them)."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta
