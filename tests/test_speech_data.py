"""The synthetic speech corpus generator (speech.data): real Piper and espeak-ng synthesis, tiny corpora.

Three small corpora are built once per module: two with the same seed (one in-process, one over two
spawned workers, so determinism must not depend on scheduling) and one with another seed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speech.data import BuildConfig, PiperSettings, PiperSynth, SynthError, build, load_manifest, read_wav16k
from speech.data.__main__ import main
from speech.data.manifest import PARTS, SPLITS, read_manifest_raw
from speech.data.noise import NOISE_KINDS, make_noise
from speech.data.plan import make_plan
from speech.data.sentences import COMMAND_WORDS, generate_sentences, number_words, word_count
from speech.data.speakers import split_speakers
from speech.data.synth import EspeakSynth, piper_phonemes

if shutil.which("espeak-ng") is None and not os.environ.get("CI"):  # CI installs it (make): never skip there
    pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)", allow_module_level=True)

SIZES = dict(sentences=8, listen_clips=24, noise_clips=8, noise_seconds=(2.0, 3.0), progress=False)


def _build(root: Path, seed: int, workers: int, **sizes) -> Path:
    build(BuildConfig.quick(str(root), seed=seed, workers=workers, **{**SIZES, **sizes}))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("corpus_a"), seed=0, workers=1)


@pytest.fixture(scope="module")
def corpus_again(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("corpus_b"), seed=0, workers=2)


@pytest.fixture(scope="module")
def corpus_other_seed(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("corpus_c"), seed=1, workers=1, sentences=4, noise_clips=3)


def _rows(root: Path, part: str) -> dict[str, list[dict]]:
    return {split: read_manifest_raw(root, part, split) for split in SPLITS}


def test_files_are_16k_mono_and_agree_with_manifests(corpus: Path) -> None:
    for part in PARTS:
        listed = set()
        for split in SPLITS:
            rows = load_manifest(corpus, part, split)
            assert rows, f"{part}/{split} is empty"
            for row in rows:
                info = sf.info(row["path"])
                assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
                assert abs(info.frames / 16000 - row["seconds"]) < 1e-3
                audio = read_wav16k(row["path"])
                assert audio.dtype == np.float32 and 0.6 < np.abs(audio).max() < 0.75  # about -3 dBFS
                listed.add(Path(row["path"]).resolve())
        on_disk = {p.resolve() for p in (corpus / part).rglob("*.wav")}
        assert on_disk == listed


def test_manifest_fields(corpus: Path) -> None:
    for split, rows in _rows(corpus, "speech").items():
        for row in rows:
            assert {"id", "text", "phonemes", "voice", "path", "seconds"} <= row.keys()
            assert row["voice"] == "piper-joe" and row["phonemes"].strip()
            assert row["path"] == f"speech/{split}/{row['id']}.wav"
    for rows in _rows(corpus, "listen").values():
        for row in rows:
            assert {"id", "text", "kind", "speaker", "engine", "path", "seconds"} <= row.keys()
            assert row["kind"] in {"command", "word", "backchannel"}
            assert row["engine"] in {"piper", "espeak-ng"}
    for rows in _rows(corpus, "noise").values():
        for row in rows:
            assert row["kind"] in NOISE_KINDS and 2.0 <= row["seconds"] <= 3.0
    meta = json.loads((corpus / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["counts"]["speech"] == {"train": 6, "val": 1, "test": 1}
    assert "espeak-ng" in meta["tools"] and meta["tools"]["piper-tts"] == "1.8.0"


def test_speech_splits_are_disjoint_in_sentences(corpus: Path) -> None:
    texts = {split: {r["text"] for r in rows} for split, rows in _rows(corpus, "speech").items()}
    assert not texts["train"] & texts["val"] and not texts["train"] & texts["test"]
    assert not texts["val"] & texts["test"]


def test_test_speakers_are_held_out(corpus: Path) -> None:
    rows = _rows(corpus, "listen")
    speakers = {s: {r["speaker"] for r in rs if r["engine"] == "espeak-ng"} for s, rs in rows.items()}
    assert speakers["test"] and not speakers["test"] & (speakers["train"] | speakers["val"])
    # The default-size plan (no synthesis): many speakers, held out by whole variant.
    plan = make_plan(BuildConfig(out="unused"))
    by_split = {s: {j.row["speaker"] for j in plan.jobs["listen"] if j.split == s and j.espeak} for s in SPLITS}
    variants = {s: {name.split("+")[1] for name in names} for s, names in by_split.items()}
    assert len(by_split["train"]) > 200 and len(by_split["test"]) > 20
    assert not variants["test"] & (variants["train"] | variants["val"])
    assert not variants["val"] & variants["train"]


def test_same_seed_same_manifests(corpus: Path, corpus_again: Path) -> None:
    for part in PARTS:
        for split in SPLITS:
            a, b = read_manifest_raw(corpus, part, split), read_manifest_raw(corpus_again, part, split)
            assert [r["path"] for r in a] == [r["path"] for r in b]
            for ra, rb in zip(a, b, strict=True):
                if part == "speech" or ra.get("engine") == "piper":
                    # Piper's default noise is unseeded inside its ONNX graph: durations may differ.
                    ra, rb = ({k: v for k, v in r.items() if k != "seconds"} for r in (ra, rb))
                else:  # espeak-ng and generated noise: identical samples
                    assert (corpus / ra["path"]).read_bytes() == (corpus_again / rb["path"]).read_bytes()
                assert ra == rb


def test_different_seed_differs(corpus: Path, corpus_other_seed: Path) -> None:
    a = [r["text"] for r in read_manifest_raw(corpus, "speech", "train")]
    c = [r["text"] for r in read_manifest_raw(corpus_other_seed, "speech", "train")]
    assert a != c
    la = [(r["text"], r["speaker"]) for r in read_manifest_raw(corpus, "listen", "train")]
    lc = [(r["text"], r["speaker"]) for r in read_manifest_raw(corpus_other_seed, "listen", "train")]
    assert la != lc


def test_a_speech_only_corpus(tmp_path: Path) -> None:
    """--listen 0 --noise 0: more target-voice speech to train on (speech.train --extra-data), nothing else."""
    root = _build(tmp_path / "speech-only", seed=2, workers=1, sentences=4, listen_clips=0, noise_clips=0)
    assert sum(len(read_manifest_raw(root, "speech", s)) for s in SPLITS) == 4
    assert all(read_manifest_raw(root, part, s) == [] for part in ("listen", "noise") for s in SPLITS)
    with pytest.raises(ValueError, match="0 or >= 3"):
        BuildConfig.quick(str(tmp_path / "x"), listen_clips=2)


def test_existing_corpus_is_not_overwritten_silently(corpus: Path) -> None:
    with pytest.raises(FileExistsError, match="--overwrite"):
        build(BuildConfig.quick(str(corpus), **SIZES))


def test_missing_espeak_gives_a_clear_error(tmp_path: Path, capsys) -> None:
    missing = str(tmp_path / "no" / "espeak-ng")
    with pytest.raises(SynthError, match="apt-get install espeak-ng"):
        build(BuildConfig.quick(str(tmp_path / "out"), espeak_binary=missing, **SIZES))
    assert not (tmp_path / "out" / "meta.json").exists()
    with pytest.raises(SynthError, match="espeak-ng not found"):
        EspeakSynth(binary=missing).synthesize("hello")
    assert main(["build", "--quick", "--out", str(tmp_path / "cli"), "--espeak", missing]) == 2
    assert "apt-get install espeak-ng" in capsys.readouterr().err


def test_piper_without_noise_is_bit_reproducible() -> None:
    synth = PiperSynth(PiperSettings(noise_scale=0.0, noise_w=0.0))
    a, b = synth.synthesize("Honey, wait."), synth.synthesize("Honey, wait.")
    assert a.dtype == np.float32 and a.size > 8000 and np.array_equal(a, b)
    assert synth.phonemes("Honey, wait.").startswith("hˈʌni,")
    assert piper_phonemes("Honey, wait.") == synth.phonemes("Honey, wait.")  # no model needed


def test_espeak_synth_and_phonemes() -> None:
    synth = EspeakSynth("en-gb-x-rp", "m3", speed=150, pitch=60)
    audio = synth.synthesize("Hold on")
    assert synth.speaker == "en-gb-x-rp+m3" and audio.dtype == np.float32 and audio.size > 3000
    assert "h" in synth.phonemes("Hold on")
    with pytest.raises(ValueError, match="pitch"):
        EspeakSynth(pitch=120)


def test_noise_is_deterministic_per_seed() -> None:
    speakers = split_speakers(0)
    for kind in NOISE_KINDS:
        a = make_noise(kind, 1.0, 7, ["a short test sentence"], speakers)
        b = make_noise(kind, 1.0, 7, ["a short test sentence"], speakers)
        c = make_noise(kind, 1.0, 8, ["a short test sentence"], speakers)
        assert a.shape == (16000,) and np.array_equal(a, b) and not np.array_equal(a, c)


def test_sentences() -> None:
    s = generate_sentences(3000, seed=0)
    assert len(set(s)) == 3000 and s == generate_sentences(3000, seed=0) and s != generate_sentences(3000, 1)
    assert all(3 <= word_count(t) <= 15 for t in s)
    lowered = " " + " ".join(s).lower().replace(",", " ").replace(".", " ").replace("?", " ") + " "
    assert not any(f" {w.lower()} " in lowered for w in COMMAND_WORDS)
    assert number_words(123) == "one hundred and twenty three" and number_words(40) == "forty"


def test_read_wav16k_resamples(tmp_path: Path) -> None:
    t = np.arange(22050) / 22050
    sf.write(str(tmp_path / "a.wav"), np.stack([np.sin(2 * np.pi * 440 * t)] * 2, axis=1) * 0.5, 22050)
    audio = read_wav16k(tmp_path / "a.wav")
    assert audio.dtype == np.float32 and abs(audio.size - 16000) <= 1
