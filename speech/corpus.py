"""Read the generated speech corpus (``python -m speech.data build``) for training.

Layout: ``ROOT/{speech,listen,noise}/{train,val,test}.jsonl`` manifests whose ``path`` points at 16 kHz
mono 16-bit wav files. ``speech`` is the target voice, ``listen`` other speakers' interruption clips,
``noise`` background noise.
"""

from __future__ import annotations

import json
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000


def read_wav(path: str | Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1 or w.getframerate() != SAMPLE_RATE:
            raise ValueError(f"{path}: expected 16 kHz mono 16-bit PCM")
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0


class Corpus:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not (self.root / "speech" / "train.jsonl").is_file():
            raise FileNotFoundError(
                f"no speech corpus at {self.root}: build one with `python -m speech.data build --out {self.root}`"
            )
        self._manifests: dict[tuple[str, str], list[dict]] = {}
        self._audio: dict[str, np.ndarray] = {}

    def manifest(self, part: str, split: str) -> list[dict]:
        key = (part, split)
        if key not in self._manifests:
            path = self.root / part / f"{split}.jsonl"
            self._manifests[key] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
                if path.is_file() else []
        return self._manifests[key]

    def resolve(self, part: str, rel: str) -> Path:
        p = Path(rel)
        if p.is_absolute():
            return p
        for base in (self.root, self.root / part):
            if (base / p).is_file():
                return base / p
        raise FileNotFoundError(f"{rel} (listed in {part}) is missing under {self.root}")

    def audio(self, part: str, entry: dict) -> np.ndarray:
        path = str(self.resolve(part, entry["path"]))
        if path not in self._audio:
            self._audio[path] = read_wav(path)
        return self._audio[path]

    def utterances(self, part: str, split: str, limit: int | None = None) -> Iterator[np.ndarray]:
        for entry in self.manifest(part, split)[:limit]:
            yield self.audio(part, entry)

    def batch(self, n: int, length: int, rng: np.random.Generator, listen_share: float = 0.0,
              noise_prob: float = 0.0, split: str = "train") -> np.ndarray:
        """``n`` random crops of ``length`` samples: target voice, other speakers, optional noise mixed in."""
        speech, listen, noise = (self.manifest(p, split) for p in ("speech", "listen", "noise"))
        if not speech:
            raise ValueError(f"the corpus at {self.root} has no speech/{split} utterances")
        out = np.zeros((n, length), dtype=np.float32)
        for i in range(n):
            part, pool = ("listen", listen) if listen and rng.random() < listen_share else ("speech", speech)
            out[i] = _crop(self.audio(part, pool[rng.integers(len(pool))]), length, rng)
            out[i] *= 10 ** (rng.uniform(-12, 0) / 20)
            if noise and rng.random() < noise_prob:
                nz = _crop(self.audio("noise", noise[rng.integers(len(noise))]), length, rng)
                snr = rng.uniform(5, 25)
                p_s, p_n = np.mean(out[i] ** 2) + 1e-8, np.mean(nz**2) + 1e-8
                out[i] += nz * np.sqrt(p_s / (p_n * 10 ** (snr / 10)))
        return np.clip(out, -1, 1)


def _crop(x: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    if x.shape[0] >= length:
        start = rng.integers(0, x.shape[0] - length + 1)
        return x[start : start + length]
    out = np.zeros(length, dtype=np.float32)
    start = rng.integers(0, length - x.shape[0] + 1)
    out[start : start + x.shape[0]] = x
    return out
