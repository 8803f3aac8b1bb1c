"""What to synthesize, decided up front from the seed alone: the build's config and its list of jobs.

Planning is separate from synthesis so determinism is easy to see and to keep: every random choice
(which sentence goes to which split, which word, which speaker, speed, pitch, noise kind and length)
is made here, in one process, from seeded generators; workers only render jobs, in any order, and
each job carries its own seed. So the same seed gives the same files and manifests whatever the
number of workers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from .noise import NOISE_KINDS
from .sentences import (
    BACKCHANNEL_WORDS,
    COMMAND_WORDS,
    ESPEAK_SAY,
    INTERRUPTION_WORDS,
    MAIN_COMMAND,
    PIPER_SAY,
    generate_sentences,
)
from .speakers import SpeakerSplit, sample_speaker, split_speakers
from .synth import PIPER_VOICE_NAME, EspeakSynth, PiperSettings

BABBLE_SENTENCES = 300  # babble draws from its own sentences, disjoint from the speech sentences


@dataclass(frozen=True)
class BuildConfig:
    """Everything a build depends on. `quick()` gives a tiny corpus for tests and smoke runs."""

    out: str = "data/speech"
    seed: int = 0
    sentences: int = 3000
    listen_clips: int = 2000
    noise_clips: int = 300
    speech_fractions: tuple[float, float, float] = (0.90, 0.05, 0.05)  # train, val, test by sentence
    listen_fractions: tuple[float, float, float] = (0.80, 0.10, 0.10)
    noise_fractions: tuple[float, float, float] = (0.80, 0.10, 0.10)
    speaker_holdout: tuple[float, float] = (0.10, 0.10)  # share of espeak variants for val, test
    kind_weights: tuple[float, float, float] = (0.50, 0.35, 0.15)  # command, word, backchannel
    main_command_share: float = 0.6  # of command clips, the share that say MAIN_COMMAND ("Honey")
    piper_listen_share: float = 0.15  # of listen clips, the share spoken by the target voice
    speech_length_scale: tuple[float, float] = (1.0, 1.0)  # uniform range; (1, 1) = no variation
    listen_length_scale: tuple[float, float] = (0.8, 1.25)
    noise_seconds: tuple[float, float] = (2.0, 10.0)
    piper: PiperSettings = field(default_factory=PiperSettings)
    espeak_binary: str = "espeak-ng"
    workers: int = 2
    overwrite: bool = False
    progress: bool = True

    @classmethod
    def quick(cls, out: str, seed: int = 0, **overrides) -> BuildConfig:
        values = dict(out=out, seed=seed, sentences=20, listen_clips=30, noise_clips=8)
        values.update(overrides)
        return cls(**values)

    def __post_init__(self) -> None:
        if self.sentences < 3:
            raise ValueError(f"sentences must be >= 3 (one per split), got {self.sentences}")
        for name in ("listen_clips", "noise_clips"):  # 0: a target-voice-only corpus (more speech to train on)
            if getattr(self, name) != 0 and getattr(self, name) < 3:
                raise ValueError(f"{name} must be 0 or >= 3 (one per split), got {getattr(self, name)}")
        if self.workers < 1:
            raise ValueError("workers must be >= 1")
        lo, hi = self.noise_seconds
        if not 0 < lo <= hi:
            raise ValueError(f"noise_seconds must be 0 < low <= high, got {self.noise_seconds}")


@dataclass(frozen=True)
class Job:
    """One file to render. `row` holds the manifest fields known before synthesis."""

    part: str  # "speech" | "listen" | "noise"
    split: str
    row: dict
    engine: str  # "piper" | "espeak" | "noise"
    say: str = ""  # what the engine is given (may differ from row["text"], e.g. raw phonemes)
    length_scale: float | None = None
    espeak: EspeakSynth | None = None
    noise_seconds: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class Plan:
    config: BuildConfig
    speakers: SpeakerSplit
    babble_sentences: tuple[str, ...]
    jobs: dict[str, list[Job]]  # by part, in manifest order


def split_counts(n: int, fractions: tuple[float, float, float]) -> dict[str, int]:
    """n items over train/val/test by fractions, at least one each (none at all when n is 0)."""
    if n == 0:
        return {"train": 0, "val": 0, "test": 0}
    if n < 3:
        raise ValueError("need at least 3 items to fill three splits")
    val = max(1, round(n * fractions[1]))
    test = max(1, round(n * fractions[2]))
    return {"train": n - val - test, "val": val, "test": test}


def _job_seed(seed: int, *keys: int) -> int:
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint64)[0])


def _speech_jobs(cfg: BuildConfig, sentences: list[str]) -> list[Job]:
    jobs, start = [], 0
    rng = random.Random(f"speech-{cfg.seed}")
    for split, count in split_counts(len(sentences), cfg.speech_fractions).items():
        for i, text in enumerate(sentences[start:start + count]):
            sid = f"{split}-{i:05d}"
            scale = round(rng.uniform(*cfg.speech_length_scale), 3)
            row = {"id": sid, "text": text, "voice": PIPER_VOICE_NAME, "path": f"speech/{split}/{sid}.wav",
                   "length_scale": scale}
            jobs.append(Job("speech", split, row, "piper", text, length_scale=scale))
        start += count
    return jobs


def _listen_text(rng: random.Random, cfg: BuildConfig) -> tuple[str, str]:
    kind = rng.choices(("command", "word", "backchannel"), weights=cfg.kind_weights)[0]
    if kind == "command":
        others = [w for w in COMMAND_WORDS if w != MAIN_COMMAND]
        text = MAIN_COMMAND if rng.random() < cfg.main_command_share else rng.choice(others)
    elif kind == "word":
        text = rng.choice(INTERRUPTION_WORDS)
    else:
        text = rng.choice(BACKCHANNEL_WORDS)
    return kind, text


def _listen_jobs(cfg: BuildConfig, speakers: SpeakerSplit) -> list[Job]:
    jobs = []
    rng = random.Random(f"listen-{cfg.seed}")
    for split, count in split_counts(cfg.listen_clips, cfg.listen_fractions).items():
        for i in range(count):
            sid = f"{split}-{i:05d}"
            kind, text = _listen_text(rng, cfg)
            base = {"id": sid, "text": text, "kind": kind}
            if rng.random() < cfg.piper_listen_share:
                scale = round(rng.uniform(*cfg.listen_length_scale), 3)
                row = {**base, "speaker": PIPER_VOICE_NAME, "engine": "piper",
                       "path": f"listen/{split}/{sid}.wav", "params": {"length_scale": scale}}
                jobs.append(Job("listen", split, row, "piper", PIPER_SAY.get(text, text), length_scale=scale))
            else:
                synth = sample_speaker(rng, speakers, split, cfg.espeak_binary)
                row = {**base, "speaker": synth.speaker, "engine": "espeak-ng",
                       "path": f"listen/{split}/{sid}.wav",
                       "params": {"speed": synth.speed, "pitch": synth.pitch}}
                jobs.append(Job("listen", split, row, "espeak", ESPEAK_SAY.get(text, text), espeak=synth))
    return jobs


def _noise_jobs(cfg: BuildConfig) -> list[Job]:
    jobs = []
    rng = random.Random(f"noise-{cfg.seed}")
    for s, (split, count) in enumerate(split_counts(cfg.noise_clips, cfg.noise_fractions).items()):
        for i in range(count):
            kind = NOISE_KINDS[i % len(NOISE_KINDS)]  # balanced kinds, even in tiny corpora
            sid = f"{split}-{i:04d}-{kind}"
            seconds = round(rng.uniform(*cfg.noise_seconds), 2)
            row = {"id": sid, "kind": kind, "path": f"noise/{split}/{sid}.wav"}
            jobs.append(Job("noise", split, row, "noise", kind, noise_seconds=seconds,
                            seed=_job_seed(cfg.seed, 3, s, i)))
    return jobs


def make_plan(cfg: BuildConfig) -> Plan:
    """All jobs of a build, deterministic from `cfg` (the seed and the sizes)."""
    pool = generate_sentences(cfg.sentences + BABBLE_SENTENCES, cfg.seed)
    speakers = split_speakers(cfg.seed, *cfg.speaker_holdout)
    jobs = {
        "speech": _speech_jobs(cfg, pool[:cfg.sentences]),
        "listen": _listen_jobs(cfg, speakers),
        "noise": _noise_jobs(cfg),
    }
    return Plan(cfg, speakers, tuple(pool[cfg.sentences:]), jobs)
