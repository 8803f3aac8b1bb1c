"""Streaming building blocks: causal convolutions that run offline (training) or one chunk at a time.

A streaming module keeps the last ``(kernel_size - 1) · dilation`` input columns of every slot in a
preallocated tensor owned by the caller; running chunk by chunk from a zero state gives the offline
output (tested, to float rounding).

The chunk steps compute their convolutions as matrix products (``conv_as_matmul``, ``pointwise``): a
step sees a handful of columns, where PyTorch's CPU convolution takes slow paths (a dilated one goes
element by element) and the per-frame voice step spent most of its time there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_as_matmul(full: Tensor, weight: Tensor, bias: Tensor | None, dilation: int) -> Tensor:
    """The valid 1-D convolution of ``full`` (B, C_in, L) as one GEMM over its gathered taps → (B, C_out, t)."""
    c_out, c_in, k = weight.shape
    taps = full.unfold(-1, (k - 1) * dilation + 1, 1)[..., ::dilation]  # (B, C_in, t, k)
    taps = taps.permute(0, 2, 1, 3).reshape(full.shape[0], -1, c_in * k)  # (B, t, C_in·k)
    return F.linear(taps, weight.reshape(c_out, c_in * k), bias).transpose(1, 2)


def pointwise(conv: nn.Conv1d, x: Tensor) -> Tensor:
    """A kernel-1 Conv1d over a short chunk (B, C_in, t) as one GEMM."""
    return F.linear(x.transpose(1, 2), conv.weight[:, :, 0], conv.bias).transpose(1, 2)


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
            return conv_as_matmul(x, self.weight, self.bias, 1)
        full = torch.cat([state, x], dim=-1)
        state.copy_(full[..., -self.context :])
        return conv_as_matmul(full, self.weight, self.bias, self.dilation[0])


class ResidualCausalBlock(nn.Module):
    """x + W₂·gelu(causal_dilated_conv(gelu(x))): depth without losing streamability."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.conv = CausalConv1d(channels, channels, 3, dilation)
        self.mix = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mix(F.gelu(self.conv(F.gelu(x))))

    def step(self, x: Tensor, states: dict[str, Tensor]) -> Tensor:
        return x + pointwise(self.mix, F.gelu(self.conv.step(F.gelu(x), states[self.conv.state_key])))


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
