"""Audio on the wire: PCM16 conversion, a streaming resampler, and an energy VAD for turn events.

The streaming resampler gives exactly what resampling the whole stream at once would give (tested),
delayed by a few samples: it keeps ``context`` blocks of history on the left and holds back
``lookahead`` blocks on the right, the reach of torchaudio's sinc kernel.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torchaudio

from realtime.protocol import ErrorCode, ProtocolError


def pcm16_to_float(data: bytes) -> np.ndarray:
    if len(data) % 2:
        raise ProtocolError(ErrorCode.INVALID_AUDIO, f"PCM16 audio needs an even byte count, got {len(data)}")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


class StreamingResampler:
    """Resample ``rows`` independent streams from ``orig`` Hz to ``new`` Hz, block by block.

    A block is ``orig/g`` input samples ↔ ``new/g`` output samples (g = gcd). ``process`` takes any
    number of whole blocks per row and returns as many output blocks, lagging by ``lookahead`` blocks.
    """

    def __init__(self, orig: int, new: int, rows: int = 1, device: str | torch.device = "cpu") -> None:
        g = math.gcd(orig, new)
        self.orig, self.new = orig, new
        self.in_block, self.out_block = orig // g, new // g
        self.identity = orig == new
        self._resample = torchaudio.transforms.Resample(orig, new).to(device)
        width = 0 if self.identity else self._resample.width  # the sinc kernel's reach, input samples
        reach = math.ceil(width / self.in_block) + 1 if width else 0
        self.context = self.lookahead = reach
        self.history = torch.zeros(rows, (self.context + self.lookahead) * self.in_block, device=device)
        self.latency_samples = self.lookahead * self.out_block  # at the output rate

    def reset(self, row: int | slice) -> None:
        self.history[row].zero_()

    def move(self, src: int, dst: int) -> None:
        self.history[dst].copy_(self.history[src])

    def process(self, x: torch.Tensor, lo: int = 0) -> torch.Tensor:
        """``x`` (B, k·in_block) for rows [lo, lo+B) → (B, k·out_block)."""
        if self.identity:
            return x
        if x.shape[-1] % self.in_block:
            raise ValueError(f"input length must be a multiple of {self.in_block}")
        hist = self.history[lo : lo + x.shape[0]]
        buf = torch.cat([hist, x], dim=-1)
        y = self._resample(buf)
        hist.copy_(buf[:, -hist.shape[1] :])
        start = self.context * self.out_block
        return y[:, start : start + x.shape[-1] // self.in_block * self.out_block]


class ChunkResampler:
    """One stream with arbitrary chunk sizes (what a client sends): buffers partial blocks."""

    def __init__(self, orig: int, new: int) -> None:
        self._r = StreamingResampler(orig, new, rows=1)
        self._pending = np.zeros(0, dtype=np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self._r.identity:
            return x
        buf = np.concatenate([self._pending, x]) if self._pending.size else x
        usable = buf.shape[0] // self._r.in_block * self._r.in_block
        self._pending = buf[usable:].copy()
        if usable == 0:
            return np.zeros(0, dtype=np.float32)
        with torch.inference_mode():
            y = self._r.process(torch.from_numpy(np.ascontiguousarray(buf[:usable]))[None])
        return y[0].numpy()

    def reset(self) -> None:
        self._r.reset(0)
        self._pending = np.zeros(0, dtype=np.float32)


class EnergyVAD:
    """Speech start / stop from frame energy with hysteresis (turn events while the model is silent).

    The model's IRQ token, not this, decides barge-in while it speaks; this only reports the user's
    turns when nothing is being said, like ``server_vad`` does.
    """

    def __init__(self, threshold: float = 0.5, silence_ms: int = 500) -> None:
        # threshold 0..1 maps to -60..-20 dBFS
        self.level_db = -60.0 + 40.0 * threshold
        self.silence_ms = silence_ms
        self.active = False
        self._quiet_ms = 0.0

    def update(self, chunk: np.ndarray, duration_ms: float) -> str | None:
        """Returns ``"started"``, ``"stopped"`` or None for one chunk of audio."""
        if chunk.size == 0:
            return None
        rms = float(np.sqrt(np.mean(np.square(chunk), dtype=np.float64)) + 1e-9)
        loud = 20 * math.log10(rms) > self.level_db
        if loud:
            self._quiet_ms = 0.0
            if not self.active:
                self.active = True
                return "started"
        elif self.active:
            self._quiet_ms += duration_ms
            if self._quiet_ms >= self.silence_ms:
                self.active = False
                return "stopped"
        return None
