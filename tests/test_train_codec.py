"""The codec recipe trains for real on a small corpus written by the test: loss falls, it resumes."""

from __future__ import annotations

import json
import wave

import numpy as np
import pytest

from speech.config import CodecConfig
from speech.corpus import Corpus
from speech.train_codec import CodecTrainConfig, train


def _write(path, x):
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())


def make_corpus(root, n=12, seed=0):
    """Harmonic 'vowels' with moving pitch: speech-like enough for a codec to learn."""
    rng = np.random.default_rng(seed)
    for part, split, count in [("speech", "train", n), ("speech", "test", 3), ("listen", "train", 4),
                               ("noise", "train", 2)]:
        lines = []
        for i in range(count):
            t = np.arange(int(16000 * rng.uniform(1.2, 2.0))) / 16000
            if part == "noise":
                x = rng.standard_normal(t.shape[0]) * 0.1
            else:
                f0 = rng.uniform(90, 220) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
                phase = 2 * np.pi * np.cumsum(f0) / 16000
                x = sum(np.sin(k * phase) / k for k in range(1, 8)) * 0.2 * (0.6 + 0.4 * np.sin(3 * t))
            rel = f"{part}/{split}/{i:03d}.wav"
            _write(root / rel, x.astype(np.float32))
            lines.append(json.dumps({"id": f"{part}{i}", "path": rel, "seconds": float(t[-1])}))
        (root / part / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


TINY = CodecConfig(channels=32, latent_dim=16, codebook_size=32, enc_blocks=1, frame_blocks=1, dec_blocks=1)


def test_codec_training_lowers_the_loss_and_resumes(tmp_path):
    data = make_corpus(tmp_path / "corpus")
    out = tmp_path / "run"
    tc = CodecTrainConfig(data=str(data), out=str(out), steps=60, batch=4, crop_frames=8, log_every=10,
                          checkpoint_every=30, lr=3e-3, vq_start=20, restart_every=20)
    report = train(tc, TINY)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 60
    assert log[-1]["loss"] < 0.8 * log[0]["loss"]
    assert np.isfinite(report["mel_distance"]) and report["perplexity"] >= 1
    assert (out / "codec.safetensors").is_file()
    # resume: the same command with more steps continues from step 60
    tc.steps = 70
    report2 = train(tc, TINY)
    assert report2["steps"] == 70
    log2 = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log2[-1]["step"] == 70 and len(log2) == len(log) + 1


def test_missing_corpus_says_how_to_build_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m speech.data build"):
        Corpus(tmp_path / "nowhere")


def test_decoder_only_training_keeps_every_token_and_improves_the_sound(tmp_path):
    """--decoder-from: a wider decoder learns to speak the source codec's tokens; the encoder and the
    codebook do not move, so the tokens (and an LSLM trained on them) stay valid."""
    import torch

    from speech.checkpoints import load_codec

    data = make_corpus(tmp_path / "corpus")
    src_tc = CodecTrainConfig(data=str(data), out=str(tmp_path / "src"), steps=40, batch=4, crop_frames=8,
                              log_every=10, checkpoint_every=40, lr=3e-3, vq_start=10, restart_every=20)
    train(src_tc, TINY)
    _, src = load_codec(tmp_path / "src" / "codec.safetensors")
    tc = CodecTrainConfig(data=str(data), out=str(tmp_path / "dec"), steps=60, batch=4, crop_frames=8,
                          log_every=10, checkpoint_every=60, lr=3e-3,
                          decoder_from=str(tmp_path / "src" / "codec.safetensors"), dec_channels=48)
    train(tc)
    cfg, student = load_codec(tmp_path / "dec" / "codec.safetensors")
    assert cfg.dec_channels == 48 and student.dec_head.in_channels == 48
    wav = torch.from_numpy(next(iter(Corpus(data).utterances("speech", "test", 1)))[: 640 * 20])[None]
    with torch.no_grad():
        assert torch.equal(student.encode(wav), src.encode(wav))
        assert torch.equal(student.quantizer.codebook, src.quantizer.codebook)
        for name, p in src.named_parameters():
            if not name.startswith("dec_"):
                assert torch.equal(p, student.get_parameter(name)), name
    log = [json.loads(line) for line in (tmp_path / "dec" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.8 * log[0]["loss"]  # the new decoder learned
