"""Text tokenizers for the speaking channel's prefix.

The byte tokenizer needs no vocabulary file; the trained default replaces it with phonemes
(espeak-ng), behind the same two-method interface.
"""

from __future__ import annotations

from typing import Protocol


class TextTokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes; ids 256..258 are pad, bos, eos."""

    vocab_size = 259
    pad_id, bos_id, eos_id = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return [self.bos_id, *text.encode("utf-8"), self.eos_id]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
