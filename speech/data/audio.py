"""Waveform plumbing shared by every part of the corpus: one format (16 kHz mono float32, stored as
16-bit PCM wav), resampling into it, and the clean-up every clip gets (silence trimmed, peak-normalised).

One format because the trainer mixes pieces from different engines (Piper at 22.05 kHz, espeak-ng at
22.05 kHz, generated noise) sample by sample. Trimming matters because the LSLM's interruption target is
timed from the moment the user *starts* speaking, so a clip must start with the word, not with silence.
Files are read and written with soundfile (libsndfile), never torchaudio.load/save (those need
torchcodec); resampling uses torchaudio.functional.resample, a pure tensor op.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000
PEAK_DBFS = -3.0


def to_mono(audio: np.ndarray) -> np.ndarray:
    """(n,) or (n, channels) -> (n,) float32."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if audio.ndim != 1:
        raise ValueError(f"expected a 1-D or (samples, channels) array, got shape {audio.shape}")
    return audio


def resample(audio: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited (windowed-sinc) resampling of a mono float array."""
    audio = to_mono(audio)
    if sr_in == sr_out or audio.size == 0:
        return audio
    import torch

    with torch.no_grad():
        out = _resampler(int(sr_in), int(sr_out))(torch.from_numpy(np.ascontiguousarray(audio)))
    return out.numpy().astype(np.float32, copy=False)


@functools.lru_cache(maxsize=8)
def _resampler(sr_in: int, sr_out: int):
    """torchaudio's Resample keeps its sinc kernel; building one costs ~0.1 s, more than the work."""
    import torchaudio.transforms as T

    return T.Resample(sr_in, sr_out)


def trim_silence(
    audio: np.ndarray,
    sr: int = SAMPLE_RATE,
    threshold_db: float = -40.0,
    frame_ms: float = 10.0,
    pad_ms: float = 30.0,
) -> np.ndarray:
    """Cut leading/trailing frames whose RMS is more than `threshold_db` below the loudest frame,
    keeping `pad_ms` of margin so consonant onsets and tails survive. All-silent input is returned
    unchanged."""
    audio = to_mono(audio)
    frame = max(1, int(sr * frame_ms / 1000))
    n_frames = audio.size // frame
    if n_frames == 0:
        return audio
    rms = np.sqrt(np.mean(audio[: n_frames * frame].reshape(n_frames, frame) ** 2, axis=1) + 1e-12)
    loud = np.flatnonzero(rms >= rms.max() * 10 ** (threshold_db / 20))
    if rms.max() < 1e-6 or loud.size == 0:
        return audio
    pad = int(sr * pad_ms / 1000)
    start = max(0, loud[0] * frame - pad)
    end = min(audio.size, (loud[-1] + 1) * frame + pad)
    return audio[start:end]


def peak_normalize(audio: np.ndarray, peak_dbfs: float = PEAK_DBFS) -> np.ndarray:
    """Scale so the largest |sample| is `peak_dbfs` (default -3 dBFS); silence stays silence."""
    audio = to_mono(audio)
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak < 1e-9:
        return audio
    return (audio * (10 ** (peak_dbfs / 20) / peak)).astype(np.float32)


def rms_dbfs(audio: np.ndarray) -> float:
    """Level of a clip in dBFS (RMS), for mixing at a chosen SNR later."""
    audio = to_mono(audio)
    return float(20 * np.log10(np.sqrt(np.mean(audio.astype(np.float64) ** 2)) + 1e-12))


def clean_clip(audio: np.ndarray, sr: int, trim: bool = True) -> np.ndarray:
    """Any engine's output -> the corpus format: 16 kHz mono, trimmed, peak at -3 dBFS."""
    audio = resample(audio, sr, SAMPLE_RATE)
    if trim:
        audio = trim_silence(audio, SAMPLE_RATE)
    return peak_normalize(audio)


def write_wav(path: str | Path, audio: np.ndarray, sr: int = SAMPLE_RATE) -> None:
    """Save as 16-bit PCM wav (clipped to [-1, 1])."""
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(to_mono(audio), -1.0, 1.0), sr, subtype="PCM_16")


def read_wav16k(path: str | Path) -> np.ndarray:
    """A wav as 16 kHz mono float32 in [-1, 1]; other rates are resampled, channels averaged."""
    import soundfile as sf

    audio, sr = sf.read(str(path), dtype="float32", always_2d=False)
    return resample(to_mono(audio), int(sr), SAMPLE_RATE)


def read_wav_bytes(data: bytes) -> tuple[np.ndarray, int]:
    """A wav held in memory (espeak-ng --stdout) -> (mono float32, sample rate)."""
    import io

    import soundfile as sf

    audio, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    return to_mono(audio), int(sr)
