"""Incremental detokenization: the text of a growing token list at a cost per token that does not grow.

Decoding a request's whole answer again after every token costs O(n) per token, O(n²) per answer, on the
scheduler's thread, once per running request per step. As vLLM does, we decode only a short window: the
tokens since the last *prefix offset* (context that fixes spacing and merges), and emit what the window's
text adds beyond its already-emitted part. A window ending inside a multi-byte character decodes to
U+FFFD; it is held until the character completes.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """``push(token)`` → the text that token completes (often ``""``); ``text`` is everything so far."""

    __slots__ = ("tokenizer", "ids", "text", "_prefix", "_read")

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # window start: context only, its text already emitted
        self._read = 0  # tokens up to here are in ``text``

    def push(self, token: int) -> str:
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        window = decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(window) <= len(before) or window.endswith("\ufffd"):
            return ""  # nothing yet, or a character still incomplete
        new = window[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += new
        return new

    def flush(self) -> str:
        """At the end of the answer: whatever the window still holds, an incomplete character included."""
        before = self.tokenizer.decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        window = self.tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=True)
        new = window[len(before):]
        self._prefix = self._read = len(self.ids)
        self.text += new
        return new
