"""Background noise the listening channel must learn to ignore (the paper mixes noise into it with
p = 0.5), deterministic from a seed.

Four kinds, chosen for what they teach: **white** (broadband hiss), **pink** (1/f, like fans, rain and
traffic), **hum** (mains at 50 or 60 Hz with harmonics, like a cheap microphone), and **babble**
(3-6 overlapping espeak-ng talkers saying random sentences at different levels): speech-shaped noise
that is *not* an interruption, the hardest negative. Babble sentences never contain a command word.
Every clip is peak-normalised; the trainer sets its level (SNR) when mixing, and the manifest records
each clip's RMS level to help.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from .audio import SAMPLE_RATE, peak_normalize, trim_silence
from .speakers import SpeakerSplit, sample_speaker

NOISE_KINDS: tuple[str, ...] = ("white", "pink", "hum", "babble")


def white(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(n).astype(np.float32)


def pink(n: int, rng: np.random.Generator) -> np.ndarray:
    """1/f power spectrum: white noise shaped by 1/sqrt(f) in the frequency domain."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(spectrum.size, dtype=np.float64)
    f[0] = 1.0
    out = np.fft.irfft(spectrum / np.sqrt(f), n)
    return (out / (np.std(out) + 1e-12)).astype(np.float32)


def hum(n: int, rng: np.random.Generator, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Mains hum: 50 or 60 Hz and up to 8 harmonics with random levels and phases, a slow drift in
    frequency, and a little hiss under it."""
    base = float(rng.choice((50.0, 60.0))) * (1 + rng.uniform(-0.003, 0.003))
    t = np.arange(n) / sr
    out = np.zeros(n)
    for k in range(1, int(rng.integers(3, 9)) + 1):
        level = rng.uniform(0.2, 1.0) / k ** rng.uniform(0.3, 1.2)
        out += level * np.sin(2 * np.pi * base * k * t + rng.uniform(0, 2 * np.pi))
    out += 0.02 * rng.standard_normal(n)
    return out.astype(np.float32)


def babble(
    n: int,
    rng: np.random.Generator,
    sentences: Sequence[str],
    speakers: SpeakerSplit,
    split: str,
    binary: str = "espeak-ng",
) -> np.ndarray:
    """3-6 espeak-ng talkers from `split`'s speakers, each saying random sentences back to back
    (looped to fill the clip), at random offsets and levels (0 to -12 dB)."""
    if not sentences:
        raise ValueError("babble needs at least one sentence")
    picker = random.Random(int(rng.integers(2**63)))
    out = np.zeros(n, dtype=np.float32)
    for _ in range(int(rng.integers(3, 7))):
        speaker = sample_speaker(picker, speakers, split, binary)
        parts: list[np.ndarray] = []
        total = 0
        while total < n:
            clip = trim_silence(speaker.synthesize(picker.choice(list(sentences))))
            gap = np.zeros(int(rng.uniform(0.05, 0.4) * SAMPLE_RATE), dtype=np.float32)
            parts += [clip, gap]
            total += clip.size + gap.size
        talker = np.concatenate(parts)
        start = int(rng.integers(0, talker.size - n + 1))
        talker = talker[start:start + n]
        out += talker / (np.max(np.abs(talker)) + 1e-9) * 10 ** (rng.uniform(-12, 0) / 20)
    return out


def make_noise(
    kind: str,
    seconds: float,
    seed: int,
    sentences: Sequence[str] = (),
    speakers: SpeakerSplit | None = None,
    split: str = "train",
    binary: str = "espeak-ng",
) -> np.ndarray:
    """One noise clip of `kind`, `seconds` long at 16 kHz, peak at -3 dBFS. Same arguments, same
    samples."""
    if seconds <= 0:
        raise ValueError("seconds must be > 0")
    n = int(round(seconds * SAMPLE_RATE))
    rng = np.random.default_rng(seed)
    if kind == "white":
        audio = white(n, rng)
    elif kind == "pink":
        audio = pink(n, rng)
    elif kind == "hum":
        audio = hum(n, rng)
    elif kind == "babble":
        if speakers is None:
            raise ValueError("babble needs a SpeakerSplit")
        audio = babble(n, rng, sentences, speakers, split, binary)
    else:
        raise ValueError(f"unknown noise kind {kind!r}; expected one of {NOISE_KINDS}")
    return peak_normalize(audio)
