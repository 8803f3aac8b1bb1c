"""Text tokenizers for the speaking channel's prefix.

``PhonemeTokenizer`` (the trained default) conditions on espeak-ng IPA, as METHODS.md advises for small
TTS models: the Piper target voice is driven by the same phonemes. ``ByteTokenizer`` needs nothing
installed and serves untrained models. Both have the same two-method interface.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from typing import Protocol


class TextTokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes; ids 256..258 are pad, bos, eos."""

    name = "bytes"
    vocab_size = 259
    pad_id, bos_id, eos_id = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return [self.bos_id, *text.encode("utf-8"), self.eos_id]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


# espeak-ng's English IPA inventory (en-us and en-gb), stress and length marks, and a clause break.
PHONEME_SYMBOLS = (
    "abdefhijklmnoprstuvwxzæçðŋɐɑɒɔəɚɛɜɝɡɪɫɬɲɹɾʃʊʌʒʔθᵻʲʰχβɣʍɕʑœøɵʏ"
    "ˈˌːˑ̃ ̩|"
)
BREAK = "|"  # between clauses (where espeak-ng starts a new line)


class PhonemeTokenizer:
    """IPA characters → ids; 0..3 are pad, bos, eos, unk."""

    name = "phonemes"
    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(self, espeak: str = "espeak-ng", voice: str = "en-us") -> None:
        self.symbols = list(dict.fromkeys(PHONEME_SYMBOLS))
        self.index = {s: i + 4 for i, s in enumerate(self.symbols)}
        self.vocab_size = len(self.symbols) + 4
        self.espeak, self.voice = espeak, voice

    def encode(self, text: str) -> list[int]:
        return self.encode_phonemes(phonemize(text, self.espeak, self.voice))

    def encode_phonemes(self, phonemes: str) -> list[int]:
        return [self.bos_id, *(self.index.get(ch, self.unk_id) for ch in phonemes), self.eos_id]


@functools.lru_cache(maxsize=4096)
def phonemize(text: str, espeak: str = "espeak-ng", voice: str = "en-us") -> str:
    """Text → espeak-ng IPA, clauses joined by `` | ``. Runs the espeak-ng program (no library import)."""
    binary = shutil.which(espeak)
    if binary is None:
        raise RuntimeError(f"{espeak} is not installed: apt-get install espeak-ng (make installs it)")
    out = subprocess.run(
        [binary, "-q", "--ipa", "-v", voice, "--stdin"], input=text.replace("\n", " "), capture_output=True,
        text=True, timeout=30, check=True,
    ).stdout
    return f" {BREAK} ".join(line.strip() for line in out.splitlines() if line.strip())
