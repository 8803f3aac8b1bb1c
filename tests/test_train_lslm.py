"""The LSLM recipe: targets follow the paper's shape exactly, and a short real run learns and resumes."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from speech.checkpoints import save_codec
from speech.codec import SpeechCodec
from speech.config import LSLMConfig
from speech.corpus import Corpus
from speech.train import LSLMTrainConfig, SampleMaker, Utterance, train
from tests.test_train_codec import TINY, _write, make_corpus

pytestmark = pytest.mark.skipif(
    shutil.which("espeak-ng") is None and not os.environ.get("CI"),  # CI installs it (make): never skipped there
    reason="espeak-ng is not installed (make installs it)",
)


def add_text_and_kinds(root):
    """Give the synthetic corpus sentences and interruption kinds, as speech.data writes them."""
    rows = [json.loads(x) for x in (root / "speech" / "train.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows):
        r["text"] = ["hello there friend", "how are you today", "the cat sat down"][i % 3]
    (root / "speech" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "speech" / "val.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n")
    listen = []
    for split in ("train", "val"):
        lines = []
        for i, (kind, text) in enumerate([("command", "Honey"), ("command", "Honey"), ("word", "hey"),
                                          ("backchannel", "uh-huh")]):
            rel = f"listen/{split}/{i}.wav"
            _write(root / rel, np.full(3000, 0.5, np.float32) * np.sin(np.arange(3000) / 3))
            lines.append(json.dumps({"id": f"l{i}", "path": rel, "kind": kind, "text": text, "seconds": 0.19}))
        (root / "listen" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        listen += lines
    return root


def test_targets_follow_the_paper(tmp_path):
    corpus = Corpus(add_text_and_kinds(make_corpus(tmp_path / "c")))
    cfg = LSLMConfig(codebook_size=64)
    tc = LSLMTrainConfig(p_noise=0.0, p_interrupt=1.0, p_distractor=0.0)
    maker = SampleMaker(tc, cfg, corpus, frame_size=640, frame_rate=25.0)
    assert maker.mu == 12 and all(e["text"] == "Honey" for e in maker.triggers)
    u = Utterance(np.array([1, 5, 7, 2]), np.arange(40) % 64)
    s = maker.make(u, np.random.default_rng(0))
    t = s["t_int"]
    assert s["targets"][-1] == cfg.irq_id and len(s["targets"]) == t + 12 + 1
    assert np.array_equal(s["targets"][:-1], u.codes[: t + 12])
    assert s["speech_in"][0] == cfg.speech_bos_id and np.array_equal(s["speech_in"][1:], u.codes[: t + 12])
    listen = s["listen"]
    assert np.abs(listen[: t * 640]).max() == 0 and np.abs(listen[t * 640 : t * 640 + 640]).max() > 0.1
    tc.p_interrupt = 0.0
    s = SampleMaker(tc, cfg, corpus, 640, 25.0).make(u, np.random.default_rng(1))
    assert s["t_int"] is None and s["targets"][-1] == cfg.eos_id and len(s["targets"]) == 41
    assert np.abs(s["listen"]).max() == 0


def test_lslm_training_learns_and_resumes(tmp_path):
    data = add_text_and_kinds(make_corpus(tmp_path / "c"))
    codec = SpeechCodec(TINY)
    save_codec(tmp_path / "codec.safetensors", codec)
    tiny = LSLMConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_text_len=128, max_speech_len=80)
    tc = LSLMTrainConfig(data=str(data), codec=str(tmp_path / "codec.safetensors"), out=str(tmp_path / "run"),
                         steps=60, batch=4, lr=3e-3, log_every=10, checkpoint_every=30, max_frames=60)
    report = train(tc, tiny)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.8 * log[0]["loss"]
    assert np.isfinite(report["val_loss"])
    tc.steps = 70
    assert train(tc, tiny)["steps"] == 70


def test_guided_attention_in_the_recipe(tmp_path):
    data = add_text_and_kinds(make_corpus(tmp_path / "c"))
    save_codec(tmp_path / "codec.safetensors", SpeechCodec(TINY))
    tiny = LSLMConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_text_len=128, max_speech_len=80)
    tc = LSLMTrainConfig(data=str(data), codec=str(tmp_path / "codec.safetensors"), out=str(tmp_path / "run"),
                         steps=60, batch=4, lr=3e-3, log_every=10, checkpoint_every=60, max_frames=60,
                         guided_attention=1.0)
    train(tc, tiny)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all("guided" in r for r in log)
    assert log[-1]["guided"] < 0.9 * log[0]["guided"]  # the first record is step 10: much is learned by then


def test_fine_tune_from_init_on_extra_corpora(tmp_path):
    """--init starts from a trained model (its loss, not a fresh one's); --extra-data adds target-voice
    speech less the main corpus's held-out sentences, and refuses another voice."""
    data = add_text_and_kinds(make_corpus(tmp_path / "c"))
    extra = add_text_and_kinds(make_corpus(tmp_path / "x", seed=1))
    rows = [json.loads(x) for x in (extra / "speech" / "train.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows):  # every other sentence is one of the main corpus's held-out ones
        r["text"] = "hello there friend" if i % 2 else f"a new sentence number {i}"
    (extra / "speech" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (extra / "speech" / "test.jsonl").unlink()
    save_codec(tmp_path / "codec.safetensors", SpeechCodec(TINY))
    tiny = LSLMConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_text_len=128, max_speech_len=80)
    base = dict(data=str(data), codec=str(tmp_path / "codec.safetensors"), batch=4, log_every=1, max_frames=60)
    train(LSLMTrainConfig(**base, out=str(tmp_path / "a"), steps=60, lr=3e-3, checkpoint_every=60), tiny)
    first = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    tuned = LSLMTrainConfig(**base, out=str(tmp_path / "b"), steps=2, lr=1e-6, checkpoint_every=2,
                            init=str(tmp_path / "a" / "lslm.safetensors"))
    train(tuned, tiny)
    log = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] < 0.8 * first[0]["loss"]

    from speech.text import PhonemeTokenizer
    from speech.train import extra_utterances
    codec = SpeechCodec(TINY).eval()
    tc = LSLMTrainConfig(**base, out=str(tmp_path / "c2"), extra_data=f"{extra}, ")
    (tmp_path / "c2").mkdir()
    held_out = {json.loads(x)["text"] for x in (data / "speech" / "val.jsonl").read_text().splitlines()}
    rows = [json.loads(x) for x in (extra / "speech" / "train.jsonl").read_text().splitlines()]
    kept = [r for r in rows if r["text"] not in held_out]
    assert 0 < len(kept) < len(rows)
    assert len(extra_utterances(tc, Corpus(data), codec, PhonemeTokenizer(), tmp_path / "c2")) == len(kept)
    # the token cache belongs to the corpus, not to its place in the list: another root is not served from it
    other = add_text_and_kinds(make_corpus(tmp_path / "y", seed=2))
    (other / "speech" / "test.jsonl").unlink()
    swapped = LSLMTrainConfig(**base, out=str(tmp_path / "c2"), extra_data=str(other))
    assert len(extra_utterances(swapped, Corpus(data), codec, PhonemeTokenizer(), tmp_path / "c2")) == 0
    for r in rows:
        r["voice"] = "someone-else"
    (extra / "speech" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "c3").mkdir()
    with pytest.raises(ValueError, match="not the target voice"):
        extra_utterances(tc, Corpus(data), codec, PhonemeTokenizer(), tmp_path / "c3")
