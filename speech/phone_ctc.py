"""Phonetic supervision of the codec's tokens: a CTC loss from the quantized latents to the phonemes.

A codec trained on reconstruction alone spends its 10 bits per 40 ms on whatever lowers the spectral
error most (pitch, loudness, breath), and the phonetic detail the words hang on gets blurred: at 25 Hz
with one codebook the round trip lost 18 WER points on the target voice (speech/codec_study.py). Asking
the tokens to also spell the utterance's phonemes, through a head too small to do the work itself (one
frame in, no context), makes the phone sequence recoverable from the codes, as SpeechTokenizer's
semantic distillation and CosyVoice's ASR-supervised tokenizer do. CTC needs no alignment: the corpus
manifests already carry espeak-ng's IPA for every target-voice utterance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speech.corpus import SAMPLE_RATE, Corpus
from speech.text import PhonemeTokenizer

BLANK = 0  # the tokenizer's pad id doubles as CTC's blank
SKIPPED = frozenset("ˈˌ |")  # stress marks, word and clause breaks: not sounds of their own


def phone_targets(phonemes: str, tokenizer: PhonemeTokenizer) -> list[int]:
    """espeak-ng IPA → the phone ids CTC spells (stress, breaks and punctuation dropped)."""
    return [tokenizer.index[ch] for ch in phonemes if ch not in SKIPPED and ch in tokenizer.index]


class PhoneHead(nn.Module):
    """One quantized latent → phone logits, with no context: the phonetic content must be in the code."""

    def __init__(self, latent_dim: int, vocab_size: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.GELU(), nn.Linear(hidden, vocab_size))

    def forward(self, q: Tensor) -> Tensor:
        return self.net(q)


@dataclass
class PhoneBatch:
    audio: Tensor  # (B, L) whole utterances, zero-padded at the end
    frames: Tensor  # (B,) codec frames that hold each utterance
    targets: Tensor  # (sum of lengths,) phone ids
    target_lengths: Tensor  # (B,)


class PhoneBatches:
    """Whole target-voice utterances with their phone ids, drawn at random from one or more corpora."""

    def __init__(self, corpora: list[Corpus], frame_size: int, split: str = "train", max_seconds: float = 8.0) -> None:
        self.tokenizer = PhonemeTokenizer()
        self.frame_size = frame_size
        self.items: list[tuple[Corpus, dict, list[int]]] = []
        for corpus in corpora:
            for entry in corpus.manifest("speech", split):
                phones = phone_targets(entry.get("phonemes", ""), self.tokenizer)
                frames = int(entry.get("seconds", 0) * SAMPLE_RATE) // frame_size
                if phones and entry.get("seconds", 0) <= max_seconds and frames >= len(phones):
                    self.items.append((corpus, entry, phones))
        if not self.items:
            raise ValueError("no target-voice utterances with phonemes to supervise the tokens with")
        self.vocab_size = self.tokenizer.vocab_size

    def sample(self, n: int, rng: np.random.Generator, device: torch.device | str) -> PhoneBatch:
        picks = [self.items[i] for i in rng.integers(len(self.items), size=n)]
        wavs = [corpus.audio("speech", entry) for corpus, entry, _ in picks]
        fs = self.frame_size
        frames = [max(1, -(-w.shape[0] // fs)) for w in wavs]
        audio = np.zeros((n, max(frames) * fs), dtype=np.float32)
        for i, w in enumerate(wavs):
            audio[i, : w.shape[0]] = w * 10 ** (rng.uniform(-12, 0) / 20)
        phones = [p for _, _, p in picks]
        return PhoneBatch(
            audio=torch.from_numpy(audio).to(device),
            frames=torch.tensor(frames, dtype=torch.long),
            targets=torch.tensor([i for p in phones for i in p], dtype=torch.long),
            target_lengths=torch.tensor([len(p) for p in phones], dtype=torch.long),
        )


def phone_ctc_loss(head: PhoneHead, q: Tensor, batch: PhoneBatch) -> Tensor:
    """Mean CTC loss per phone of ``head`` over quantized latents ``q`` (B, T, D)."""
    log_probs = F.log_softmax(head(q).float(), dim=-1).transpose(0, 1)  # (T, B, V)
    return F.ctc_loss(log_probs, batch.targets, batch.frames, batch.target_lengths, blank=BLANK,
                      zero_infinity=True)


@torch.no_grad()
def greedy_phones(head: PhoneHead, q: Tensor) -> list[list[int]]:
    """Best-path decoding (repeats merged, blanks dropped): what the tokens spell."""
    out = []
    for row in head(q).argmax(-1).tolist():
        seq, prev = [], BLANK
        for t in row:
            if t != prev and t != BLANK:
                seq.append(t)
            prev = t
        out.append(seq)
    return out
