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
    """``exclude_texts``: target-voice sentences to leave out, e.g. another corpus's held-out ones (the
    generator may say a sentence in two corpora, and training on it would leak the test)."""

    def __init__(self, root: str | Path, exclude_texts: frozenset[str] = frozenset()) -> None:
        self.root = Path(root)
        self.exclude_texts = exclude_texts
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
            entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
                if path.is_file() else []
            if part == "speech" and self.exclude_texts:
                entries = [e for e in entries if e.get("text") not in self.exclude_texts]
            self._manifests[key] = entries
        return self._manifests[key]

    def held_out_texts(self) -> frozenset[str]:
        """The sentences of the validation and test target-voice speech."""
        return frozenset(e.get("text") for split in ("val", "test") for e in self.manifest("speech", split))

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
        return mixed_batch([self], n, length, rng, listen_share, noise_prob, split)


def mixed_batch(corpora: list[Corpus], n: int, length: int, rng: np.random.Generator, listen_share: float = 0.0,
                noise_prob: float = 0.0, split: str = "train") -> np.ndarray:
    """Random crops whose target-voice speech comes from all ``corpora`` (pooled, so the bigger weighs
    more) and whose other speakers and noise come from the first (extra corpora may carry speech only)."""
    main = corpora[0]
    pools = [c.manifest("speech", split) for c in corpora]
    ends = np.cumsum([len(pool) for pool in pools])  # one index over the pooled manifests, no list built
    listen, noise = (main.manifest(p, split) for p in ("listen", "noise"))
    if not ends[-1]:
        raise ValueError(f"the corpus at {main.root} has no speech/{split} utterances")
    out = np.zeros((n, length), dtype=np.float32)
    for i in range(n):
        if listen and rng.random() < listen_share:
            clip = main.audio("listen", listen[rng.integers(len(listen))])
        else:
            j = int(rng.integers(ends[-1]))
            c = int(np.searchsorted(ends, j, side="right"))
            clip = corpora[c].audio("speech", pools[c][j - (ends[c - 1] if c else 0)])
        out[i] = _crop(clip, length, rng)
        out[i] *= 10 ** (rng.uniform(-12, 0) / 20)
        if noise and rng.random() < noise_prob:
            nz = _crop(main.audio("noise", noise[rng.integers(len(noise))]), length, rng)
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
