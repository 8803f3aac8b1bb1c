"""Streaming building blocks: causal convolutions that run offline (training) or one chunk at a time.

A streaming module keeps the last ``(kernel_size - 1) · dilation`` input columns of every slot in a
preallocated tensor owned by the caller; running chunk by chunk from a zero state gives exactly the
offline output (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CausalConv1d(nn.Conv1d):
    """A stride-1 Conv1d that only looks at the past (left-padded by ``(kernel_size - 1) · dilation``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation)
        self.context = (kernel_size - 1) * dilation
        self.state_key = ""  # set by the owning model: the name of this conv's slot state

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, T) -> (B, C_out, T)
        return super().forward(F.pad(x, (self.context, 0)))

    def state_shape(self) -> tuple[int, int]:
        return (self.in_channels, self.context)

    def step(self, x: Tensor, state: Tensor) -> Tensor:
        """One chunk: ``x`` (B, C_in, t), ``state`` (B, C_in, context) updated in place."""
        if self.context == 0:
            return super().forward(x)
        full = torch.cat([state, x], dim=-1)
        state.copy_(full[..., -self.context :])
        return F.conv1d(full, self.weight, self.bias, dilation=self.dilation)


class ResidualCausalBlock(nn.Module):
    """x + W₂·gelu(causal_dilated_conv(gelu(x))): depth without losing streamability."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.conv = CausalConv1d(channels, channels, 3, dilation)
        self.mix = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mix(F.gelu(self.conv(F.gelu(x))))

    def step(self, x: Tensor, states: dict[str, Tensor]) -> Tensor:
        return x + self.mix(F.gelu(self.conv.step(F.gelu(x), states[self.conv.state_key])))


class CausalStack(nn.Sequential):
    """Residual causal blocks with dilations 1, 2, 4, ..."""

    def __init__(self, channels: int, n_blocks: int) -> None:
        super().__init__(*(ResidualCausalBlock(channels, 2**i) for i in range(n_blocks)))

    def step(self, x: Tensor, states: dict[str, Tensor]) -> Tensor:
        for block in self:
            x = block.step(x, states)
        return x


def name_states(model: nn.Module) -> list[CausalConv1d]:
    """Give every causal conv of ``model`` its state key (its module path) and return them."""
    convs = []
    for name, m in model.named_modules():
        if isinstance(m, CausalConv1d):
            m.state_key = name
            convs.append(m)
    return convs


def hann_ola_norm(n_fft: int, hop: int) -> float:
    """The constant that overlap-added squared hann windows sum to (windows at analysis and synthesis)."""
    w = torch.hann_window(n_fft, periodic=True, dtype=torch.float64) ** 2
    total = torch.zeros(n_fft + hop * (n_fft // hop))
    for k in range(n_fft // hop + 1):
        total[k * hop : k * hop + n_fft] += w
    return float(total[n_fft : n_fft + hop].mean())  # the fully overlapped middle
