"""Streaming building blocks: causal convolutions that run offline (training) or one chunk at a time.

A streaming module keeps the last ``kernel_size - 1`` input columns of every slot in a preallocated
tensor owned by the caller; running chunk by chunk from a zero state gives exactly the offline output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CausalConv1d(nn.Conv1d):
    """A stride-1 Conv1d that only looks at the past (left-padded by ``kernel_size - 1``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size)
        self.context = kernel_size - 1

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, T) -> (B, C_out, T)
        return super().forward(F.pad(x, (self.context, 0)))

    def state_shape(self) -> tuple[int, int]:
        return (self.in_channels, self.context)

    def step(self, x: Tensor, state: Tensor) -> Tensor:
        """One chunk: ``x`` (B, C_in, t), ``state`` (B, C_in, k-1) updated in place."""
        if self.context == 0:
            return super().forward(x)
        full = torch.cat([state, x], dim=-1)
        state.copy_(full[..., -self.context :])
        return F.conv1d(full, self.weight, self.bias)


def hann_ola_norm(n_fft: int, hop: int) -> float:
    """The constant that overlap-added squared hann windows sum to (windows at analysis and synthesis)."""
    w = torch.hann_window(n_fft, periodic=True, dtype=torch.float64) ** 2
    total = torch.zeros(n_fft + hop * (n_fft // hop))
    for k in range(n_fft // hop + 1):
        total[k * hop : k * hop + n_fft] += w
    # the middle of the buffer is fully overlapped
    return float(total[n_fft : n_fft + hop].mean())
