"""The espeak-ng speaker pool for the listening channel, and which speakers each split may use.

The voice-based setting of the paper is judged on *unseen speakers*, so speakers are held out by split.
A speaker is an accent voice + a voice variant ("en-gb-x-rp+m3"). Holding out single combinations is
weak: "en-us+m3" and "en-gb+m3" share the variant's pitch, formants and voicing and sound alike. So
whole **variants** are held out: a variant assigned to test is used with every accent in test and with
no accent in train or val (and likewise for val), which makes the splits' speakers disjoint too.
Speed and pitch are drawn per clip on top of the speaker.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .synth import EspeakSynth, SynthError, espeak_variants

# The espeak-ng English accents that ship with espeak-ng itself (the mbrola "mb-*" voices need extra
# packages and are left out).
ACCENTS: tuple[str, ...] = (
    "en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029",
    "en-us-nyc",
)

# Variant files (espeak-ng-data/voices/!v) that sound like a person talking; robots, whispers, croaks,
# demons, the test variant "fast", and "klatt6"/"caleb" (identical to "klatt" in espeak-ng 1.51) are
# left out.
VARIANTS: tuple[str, ...] = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2",
    "klatt3", "klatt4", "klatt5", "adam", "Alex", "Alicia", "Andrea", "Andy", "Annie",
    "AnxiousAndy", "antonio", "aunty", "belinda", "benjamin", "boris", "david", "Denis",
    "Diogo", "ed", "edward", "edward2", "Gene", "Gene2", "grandma", "grandpa", "gustave", "Henrique",
    "Hugo", "iven", "iven2", "iven3", "iven4", "Jacky", "john", "kaukovalta", "Lee", "linda", "marcelo",
    "Marco", "Mario", "max", "Michael", "michel", "miguel", "Mike", "Nguyen", "norbert", "pablo",
    "paul", "pedro", "quincy", "RicishayMax", "RicishayMax2", "RicishayMax3", "rob", "robert",
    "sandro", "shelby", "steph", "steph2", "steph3", "Storm", "travis", "victor", "zac",
)

SPLITS: tuple[str, ...] = ("train", "val", "test")
SPEED_RANGE = (130, 210)  # words per minute; espeak-ng's default is 175
PITCH_RANGE = (25, 75)  # 0..99; default 50


@dataclass(frozen=True)
class SpeakerSplit:
    """Variants per split (disjoint); every accent is used in every split."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def variants(self, split: str) -> tuple[str, ...]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return getattr(self, split)

    def speakers(self, split: str) -> list[str]:
        """"accent+variant" names of a split, sorted."""
        return sorted(f"{a}+{v}" for a in ACCENTS for v in self.variants(split))


def split_speakers(seed: int, val_fraction: float = 0.1, test_fraction: float = 0.1) -> SpeakerSplit:
    """Assign whole variants to train/val/test, deterministically from `seed`."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in (0, 1) and sum to less than 1")
    order = list(VARIANTS)
    random.Random(f"speakers-{seed}").shuffle(order)
    n_test = max(1, round(len(order) * test_fraction))
    n_val = max(1, round(len(order) * val_fraction))
    return SpeakerSplit(
        test=tuple(sorted(order[:n_test])),
        val=tuple(sorted(order[n_test:n_test + n_val])),
        train=tuple(sorted(order[n_test + n_val:])),
    )


def check_variants_installed(binary: str = "espeak-ng") -> None:
    """Fail early, and clearly, if this espeak-ng lacks a variant (it would silently fall back to
    the plain voice and blur the held-out speakers)."""
    missing = sorted(set(VARIANTS) - espeak_variants(binary))
    if missing:
        raise SynthError(f"espeak-ng at {binary!r} lacks voice variants {missing}; install the full "
                         "espeak-ng-data package (apt-get install espeak-ng)")


def sample_speaker(rng: random.Random, split: SpeakerSplit, name: str, binary: str = "espeak-ng"
                   ) -> EspeakSynth:
    """A random speaker of split `name` with a random speed and pitch."""
    return EspeakSynth(
        voice=rng.choice(ACCENTS),
        variant=rng.choice(split.variants(name)),
        speed=rng.randint(*SPEED_RANGE),
        pitch=rng.randint(*PITCH_RANGE),
        binary=binary,
    )
