"""Grow a trained codec's decoder (wider, deeper) without changing what it says.

A fresh wider decoder starts from noise and needs as many steps as the one it replaces before it is
even as good. Growing instead embeds the trained decoder in the bigger one (Net2Net-style): every old
weight keeps its place, and every new weight that *writes* into a channel the old decoder reads — the
residual streams, the upsampler's outputs — starts at zero, while new weights that *read* start at a
fresh layer's random init. The new channels therefore carry zeros at first (gelu(0) = 0), the output
is exactly the old decoder's, and the gradients reach every new weight through the random reads. New
blocks are appended with a zero mix, so each is the identity until it learns something.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from speech.codec import SpeechCodec


def _embed(new: torch.Tensor, old: torch.Tensor) -> None:
    """Copy ``old`` into the leading corner of ``new`` (same rank, every dim at least as large)."""
    new[tuple(slice(0, n) for n in old.shape)] = old


def _grow_conv(new: nn.Module, old: nn.Module | None, zero_new_outputs: bool, zero_new_inputs: bool,
               out_dim: int = 0) -> None:
    """Embed ``old``'s weight and bias in ``new``; zero the new output rows and/or new input columns."""
    w, b = new.weight, new.bias
    in_dim = 1 - out_dim  # Conv1d stores (out, in, k); ConvTranspose1d stores (in, out, k)
    old_out = old.weight.shape[out_dim] if old is not None else 0
    old_in = old.weight.shape[in_dim] if old is not None else 0
    if zero_new_outputs:
        w.narrow(out_dim, old_out, w.shape[out_dim] - old_out).zero_()
        if b is not None:
            b[old_out:].zero_()
    if zero_new_inputs:
        w.narrow(in_dim, old_in, w.shape[in_dim] - old_in).zero_()
    if old is not None:
        _embed(w, old.weight)
        if b is not None:
            _embed(b, old.bias)


@torch.no_grad()
def grow_decoder(src: SpeechCodec, channels: int = 0, blocks: int = 0) -> SpeechCodec:
    """A codec equal to ``src`` whose decoder is ``channels`` wide and has ``blocks`` mel-rate blocks.

    0 keeps the source's size; shrinking is refused (it would change the sound). The encoder and the
    codebook are copied unchanged, so every token stays valid.
    """
    old_cfg = src.cfg
    old_c = old_cfg.dec_channels or old_cfg.channels
    c, n = channels or old_c, blocks or old_cfg.dec_blocks
    if c < old_c or n < old_cfg.dec_blocks:
        raise ValueError(f"can only grow the decoder: {old_c} channels x {old_cfg.dec_blocks} blocks "
                         f"-> {c} x {n} would shrink it")
    cfg = replace(old_cfg, dec_channels=0 if c == old_cfg.channels else c, dec_blocks=n)
    codec = SpeechCodec(cfg)
    codec.load_state_dict({k: v for k, v in src.state_dict().items() if not k.startswith("dec_")}, strict=False)
    _grow_conv(codec.dec_in, src.dec_in, zero_new_outputs=True, zero_new_inputs=False)
    for stack, old_stack in ((codec.dec_frame, src.dec_frame), (codec.dec_blocks, src.dec_blocks)):
        for i, block in enumerate(stack):
            old = old_stack[i] if i < len(old_stack) else None
            _grow_conv(block.conv, old.conv if old else None, zero_new_outputs=False, zero_new_inputs=False)
            if old is None:  # a new block: the identity until it learns
                nn.init.zeros_(block.mix.weight)
                nn.init.zeros_(block.mix.bias)
            else:
                _grow_conv(block.mix, old.mix, zero_new_outputs=True, zero_new_inputs=True)
    _grow_conv(codec.dec_up, src.dec_up, zero_new_outputs=True, zero_new_inputs=False, out_dim=1)
    _grow_conv(codec.dec_head, src.dec_head, zero_new_outputs=False, zero_new_inputs=False)
    return codec
