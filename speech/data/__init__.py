"""Synthetic speech corpus for training the LSLM (`python -m speech.data build`).

The speaking channel learns one target voice (Piper en_US-joe-medium); the listening channel learns to
hear interruptions (command words, short words) from many espeak-ng speakers, held out by split, and
to ignore back-channels and noise. This package writes the pieces; training samples are mixed from them
on the fly. Entry points: `build(BuildConfig(...))`, `load_manifest(root, part, split)`,
`read_wav16k(path)`, and `piper_phonemes(text)` (the phonemes the target voice is driven with).
"""

from .audio import SAMPLE_RATE, read_wav16k
from .build import build
from .manifest import PARTS, SPLITS, load_manifest, load_meta
from .plan import BuildConfig
from .synth import EspeakSynth, PiperSettings, PiperSynth, SynthError, piper_phonemes

__all__ = [
    "SAMPLE_RATE", "PARTS", "SPLITS", "BuildConfig", "EspeakSynth", "PiperSettings", "PiperSynth",
    "SynthError", "build", "load_manifest", "load_meta", "piper_phonemes", "read_wav16k",
]
