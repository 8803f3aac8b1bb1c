"""Phonetic supervision of the codec's tokens (speech/phone_ctc.py) and the recipe flags that use it:
the CTC loss really teaches the tokens to spell a toy language whose 'phonemes' are tones."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from speech.config import CodecConfig
from speech.corpus import Corpus, mixed_batch
from speech.phone_ctc import PhoneBatches, PhoneHead, greedy_phones, phone_ctc_loss, phone_targets
from speech.text import PhonemeTokenizer
from speech.train_codec import CodecTrainConfig, train
from tests.test_train_codec import TINY, _write, make_corpus

TONES = {"a": 300.0, "i": 900.0, "u": 1800.0}  # each toy phoneme is one tone, 4 codec frames long


def tone_corpus(root, n=40, seed=0):
    """Speech whose manifest spells its tones as phonemes (with stress marks and spaces to drop)."""
    make_corpus(root, n=4, seed=seed)  # listen and noise parts
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", 8)):
        lines = []
        for i in range(count):
            word = rng.choice(list(TONES))
            while len(word) < rng.integers(2, 5):  # no phoneme twice in a row: it would need a blank between
                word += rng.choice([ch for ch in TONES if ch != word[-1]])
            t = np.arange(int(0.16 * 16000)) / 16000
            x = np.concatenate([0.3 * np.sin(2 * np.pi * TONES[ch] * t) for ch in word] + [np.zeros(640)])
            rel = f"speech/{split}/{i:03d}.wav"
            _write(root / rel, x.astype(np.float32))
            lines.append(json.dumps({"id": f"{split}{i}", "path": rel, "seconds": x.shape[0] / 16000,
                                     "phonemes": "ˈ" + " ".join(word) + "."}))
        (root / "speech" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_phone_targets_drop_stress_breaks_and_punctuation():
    tok = PhonemeTokenizer()
    assert phone_targets("lˈɛts tˈeɪk | ðə.", tok) == [tok.index[c] for c in "lɛtsteɪkðə"]
    assert phone_targets("", tok) == []


def spell_heldout(data, out, seed: int) -> tuple[list[dict], dict, int, float]:
    """Train the tiny codec with CTC (seed ``seed``); (log, train state, held-out words spelled exactly of 8,
    held-out CTC loss)."""
    tc = CodecTrainConfig(data=str(data), out=str(out), steps=500, batch=4, crop_frames=8, log_every=20,
                          checkpoint_every=250, lr=2e-3, vq_start=20, restart_every=20, ctc_weight=1.0,
                          ctc_batch=8, listen_share=0.0, noise_prob=0.0, seed=seed)
    train(tc, TINY)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    state = torch.load(out / "train_state.pt", weights_only=False)
    # what the trained tokens spell, read back through the trained head on held-out utterances
    from speech.checkpoints import load_codec

    _, codec = load_codec(out / "codec.safetensors")
    batches = PhoneBatches([Corpus(data)], codec.cfg.frame_size, split="val")
    head = PhoneHead(codec.cfg.latent_dim, batches.vocab_size)
    head.load_state_dict(state["phone_head"])
    pb = batches.sample(8, np.random.default_rng(1), "cpu")
    with torch.no_grad():
        q = codec.quantizer.lookup(codec.encode(pb.audio))
        loss = float(phone_ctc_loss(head, q, pb))
        spelled = greedy_phones(head, q)
    truth = torch.split(pb.targets, pb.target_lengths.tolist())
    return log, state, sum(s == t.tolist() for s, t in zip(spelled, truth, strict=True)), loss


def test_ctc_teaches_the_tokens_to_spell_the_phonemes(tmp_path):
    """Training on this toy language is bimodal: most seeds spell every held-out word, some stick at a partial
    solution (about 1 in 4 on some CPUs, and which seeds depends on the CPU's arithmetic). So three seeds are
    trained: every one's CTC loss must fall, and the best must spell at least 6 of 8 held-out words exactly."""
    data = tone_corpus(tmp_path / "corpus")
    runs = [spell_heldout(data, tmp_path / f"run{seed}", seed) for seed in range(3)]
    for log, state, _, heldout in runs:
        assert log[-1]["ctc"] < 0.1 * log[0]["ctc"]
        assert heldout < log[0]["ctc"]
        assert "phone_head" in state  # a resumed run keeps its head
    assert max(right for *_, right, _ in runs) >= 6, [right for *_, right, _ in runs]


def test_utterances_without_phonemes_are_refused_clearly(tmp_path):
    data = make_corpus(tmp_path / "corpus")  # no phonemes in its manifests
    with pytest.raises(ValueError, match="no target-voice utterances with phonemes"):
        PhoneBatches([Corpus(data)], 640)


def test_extra_corpora_pool_their_speech(tmp_path):
    main = Corpus(make_corpus(tmp_path / "main"))
    extra_root = tmp_path / "extra"
    lines = []
    for i in range(12):  # silent 'speech': a crop from here is all zeros, one from main never is
        _write(extra_root / f"speech/train/{i}.wav", np.zeros(16000, dtype=np.float32))
        lines.append(json.dumps({"id": str(i), "path": f"speech/train/{i}.wav", "seconds": 1.0}))
    (extra_root / "speech").mkdir(parents=True, exist_ok=True)
    (extra_root / "speech" / "train.jsonl").write_text("\n".join(lines) + "\n")
    extra = Corpus(extra_root)
    rng = np.random.default_rng(0)
    alone = mixed_batch([main], 64, 6400, rng)
    assert (np.abs(alone).max(1) > 0).all()
    pooled = mixed_batch([main, extra], 64, 6400, rng)
    silent = int((np.abs(pooled).max(1) == 0).sum())
    assert 20 < silent < 60  # 12 of 24 utterances are silent: about half the crops
    # the first corpus's other speakers and noise still come in
    assert (np.abs(mixed_batch([main, extra], 16, 6400, rng, listen_share=1.0)).max(1) > 0).all()
    # sentences held out by the main corpus are left out of the extra one
    assert len(Corpus(extra_root, frozenset({"said twice"})).manifest("speech", "train")) == 12
    (extra_root / "speech" / "train.jsonl").write_text("\n".join(
        json.dumps({**json.loads(line), "text": "said twice" if i < 5 else f"only here {i}"})
        for i, line in enumerate(lines)) + "\n")
    assert len(Corpus(extra_root, frozenset({"said twice"})).manifest("speech", "train")) == 7
    # and a single corpus draws exactly as Corpus.batch does
    assert np.array_equal(main.batch(8, 6400, np.random.default_rng(5), 0.3, 0.5),
                          mixed_batch([main], 8, 6400, np.random.default_rng(5), 0.3, 0.5))


def test_init_continues_from_a_trained_codec(tmp_path):
    data = make_corpus(tmp_path / "corpus")
    first = tmp_path / "first"
    train(CodecTrainConfig(data=str(data), out=str(first), steps=30, batch=4, crop_frames=8, log_every=10,
                           checkpoint_every=30, lr=3e-3, vq_start=10, restart_every=10), TINY)
    second = tmp_path / "second"
    tc = CodecTrainConfig(data=str(data), out=str(second), steps=10, batch=4, crop_frames=8, log_every=10,
                          checkpoint_every=10, lr=1e-3, init=str(first / "codec.safetensors"))
    train(tc, CodecConfig())  # the config comes from --init, not from the argument
    log = [json.loads(line) for line in (second / "log.jsonl").read_text().splitlines()]
    first_log = [json.loads(line) for line in (first / "log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] < first_log[0]["loss"]  # it starts trained, quantizing at once
    assert log[0]["commit"] > 0
    with pytest.raises(ValueError, match="pick one"):
        CodecTrainConfig(init="a", decoder_from="b")
    with pytest.raises(ValueError, match="frozen"):
        CodecTrainConfig(decoder_from="b", ctc_weight=1.0)
