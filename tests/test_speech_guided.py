"""Guided attention: the prior is the diagonal, the scored head is the block's real head, and it learns."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from speech.config import LSLMConfig
from speech.guided import GuidedAttention
from speech.lslm import LSLM

CFG = LSLMConfig(
    d_model=32,
    n_layers=2,
    n_heads=2,
    d_ff=64,
    max_text_len=32,
    max_speech_len=48,
    codebook_size=16,
    listen_dim=8,
)


def packed(text_lens: list[int], speech_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows [text, speech, pad] as speech.train.collate builds them, with random ids."""
    t = max(a + b for a, b in zip(text_lens, speech_lens, strict=True)) + 2
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 16, (len(text_lens), t), generator=g)
    is_speech = torch.zeros(len(text_lens), t, dtype=torch.bool)
    for i, (a, b) in enumerate(zip(text_lens, speech_lens, strict=True)):
        is_speech[i, a : a + b] = True
    return ids, is_speech, torch.where(is_speech, 1, -100)


def test_prior_is_the_diagonal_per_row():
    _, is_speech, _ = packed([6, 3], [12, 20])
    w = GuidedAttention(LSLM(CFG)).weights(is_speech, torch.tensor([12, 20]))
    for row, (text_len, frames) in enumerate([(6, 12), (3, 20)]):
        for frame in range(frames):
            q = text_len + frame
            text_w = w[row, q, :text_len]
            # the cheapest text key is the one at the same fraction of the text as the frame of the speech
            assert int(text_w.argmin()) == min(text_len - 1, int((frame + 0.5) / frames * text_len))
            # ...and it costs at most what half a text token plus half a frame off the diagonal costs
            off = 0.5 / text_len + 0.5 / frames
            assert float(text_w.min()) <= 1 - math.exp(-(off**2) / (2 * 0.2**2)) + 1e-6
            assert torch.all(w[row, q, text_len:] == 1)  # speech keys (and padding) cost the full 1


def test_scored_head_is_the_blocks_attention():
    model = LSLM(CFG).eval()
    ids, is_speech, targets = packed([5, 4], [10, 11])
    guide = GuidedAttention(model, head=1)
    with guide.recording():
        model.forward_packed(ids, is_speech, torch.zeros(*ids.shape, 8))
        qkv = guide.qkv[0]
        probs = guide.head_attention(qkv)
    hs, d = 16, 32
    q, k, v = (qkv[..., i * d + hs : i * d + 2 * hs][:, None] for i in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, 0]
    assert torch.allclose(probs @ v[:, 0], expected, atol=1e-5)
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:2]), atol=1e-5)
    assert not guide.qkv  # hooks cleared on exit


def test_guided_loss_teaches_the_head_to_read_in_order():
    torch.manual_seed(0)
    model = LSLM(CFG)
    ids, is_speech, targets = packed([8, 6], [24, 30])
    n_frames = torch.tensor([24, 30])
    guide = GuidedAttention(model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        with guide.recording():
            model.forward_packed(ids, is_speech, torch.zeros(*ids.shape, 8))
            loss = guide.loss(is_speech, targets, n_frames)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[0] > 0.6 and losses[-1] < 0.5 * losses[0]
    with guide.recording():
        model.forward_packed(ids, is_speech, torch.zeros(*ids.shape, 8))
        att = guide.head_attention(guide.qkv[1])[0, 8 : 8 + 24, :8]  # speech queries of row 0 over its text
    # the attended text position advances with the frame
    peaks = att.argmax(-1).float()
    assert torch.corrcoef(torch.stack([peaks, torch.arange(24.0)]))[0, 1] > 0.8


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="head"):
        GuidedAttention(LSLM(CFG), head=2)
    with pytest.raises(ValueError, match="sigma"):
        GuidedAttention(LSLM(CFG), sigma=0)
    with pytest.raises(RuntimeError, match="recording"):
        GuidedAttention(LSLM(CFG)).loss(*packed([3], [4])[1:], torch.tensor([4]))
