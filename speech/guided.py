"""Guided attention for the speaking channel: one head per block learns to read the text in order.

A decoder-only TTS must discover by itself which phoneme each speech frame says; small models trained
briefly never do, and speak fluent babble (teacher-forced code accuracy rises while the words stay
unintelligible). Guided attention (Tachibana et al. 2018, "Efficiently trainable TTS ... with guided
attention") adds the prior that speech reads text monotonically at a roughly even pace: for speech
frame t of T and text token n of N, attention far from the diagonal n/N = t/T costs

    W(n, t) = 1 - exp(-(n/N - t/T)^2 / (2 g^2)),

and attention to speech positions costs 1, so the guided head is pushed onto the text, near the
diagonal. Only training changes: the loss reads the head's attention through forward hooks on the
blocks' ``qkv`` projections, so the model, its checkpoints and the serving path stay as they are.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from speech.lslm import LSLM


class GuidedAttention:
    """Records every block's query/key projection and scores one head against the diagonal prior."""

    def __init__(self, model: LSLM, head: int = 0, sigma: float = 0.2) -> None:
        if not 0 <= head < model.cfg.n_heads:
            raise ValueError(f"head must be in [0, {model.cfg.n_heads}), not {head}")
        if sigma <= 0:
            raise ValueError("sigma must be > 0")
        self.model, self.head, self.sigma = model, head, sigma
        self.qkv: list[Tensor] = []

    @contextmanager
    def recording(self) -> Iterator[GuidedAttention]:
        """Hooks on while inside: each forward appends one (B, T, 3D) projection per block."""
        handles = [
            blk.qkv.register_forward_hook(lambda _m, _i, out: self.qkv.append(out))
            for blk in self.model.blocks
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self.qkv.clear()

    def head_attention(self, qkv: Tensor, head: int | None = None) -> Tensor:
        """Causal attention probabilities (B, T, T) of the guided head (or ``head``), as the block computes them."""
        head = self.head if head is None else head
        d, hs = self.model.cfg.d_model, self.model.cfg.d_model // self.model.cfg.n_heads
        q = qkv[..., head * hs : (head + 1) * hs]
        k = qkv[..., d + head * hs : d + (head + 1) * hs]
        scores = q @ k.transpose(1, 2) / math.sqrt(hs)
        t = qkv.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=qkv.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(-1)

    def loss(self, is_speech: Tensor, targets: Tensor, n_frames: Tensor) -> Tensor:
        """Mean over blocks and scored speech positions of the guided head's off-diagonal attention mass.

        is_speech (B, T); targets (B, T), -100 where no loss; n_frames (B,) the utterance's full length
        in frames (the diagonal's T: an interrupted row stops early but reads at the same pace).
        """
        return self._costs(is_speech, targets, n_frames, heads=[self.head]).mean()

    @torch.no_grad()
    def best_head_cost(self, is_speech: Tensor, targets: Tensor, n_frames: Tensor) -> float:
        """The lowest off-diagonal mass of any head in any block: how well the model's best head reads the
        text in order (near 0: along the diagonal; about 0.9: anywhere else). Works for unguided models too."""
        return float(self._costs(is_speech, targets, n_frames, heads=range(self.model.cfg.n_heads)).min())

    def _costs(self, is_speech: Tensor, targets: Tensor, n_frames: Tensor, heads) -> Tensor:
        """Off-diagonal mass of each recorded block's ``heads``, averaged over the scored speech positions."""
        if not self.qkv:
            raise RuntimeError("no attention recorded: run the model's forward inside recording()")
        w = self.weights(is_speech, n_frames)
        scored = (targets != -100) & is_speech
        return torch.stack([(self.head_attention(qkv, h) * w).sum(-1)[scored].mean() for qkv in self.qkv for h in heads])

    def weights(self, is_speech: Tensor, n_frames: Tensor) -> Tensor:
        """W (B, T_query, T_key): the diagonal prior on text keys, 1 on speech keys."""
        t = is_speech.shape[1]
        dev = is_speech.device
        text_len = is_speech.float().argmax(1, keepdim=True)  # rows are [text, speech, pad]: the first speech position
        pos = torch.arange(t, device=dev)[None]
        frame = (pos - text_len).clamp_min(0)  # speech frame index of each query
        n = text_len.clamp_min(1).float()
        key_frac = (pos + 0.5) / n  # (B, T) position of a text key along the text
        query_frac = (frame + 0.5) / n_frames.to(dev).float()[:, None].clamp_min(1)
        diag = 1 - torch.exp(-((key_frac[:, None, :] - query_frac[:, :, None]) ** 2) / (2 * self.sigma**2))
        is_text_key = (pos < text_len)[:, None, :]
        return torch.where(is_text_key, diag, torch.ones_like(diag))
