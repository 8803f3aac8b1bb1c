"""The codec study's phase schemes: peak-locked phase rebuilds a sinusoid from its magnitudes alone."""

import math

import torch

from speech.codec import SpeechCodec
from speech.codec_study import bin_centre_phase, peak_locked_phase, stft_frames, synthesise
from speech.config import CodecConfig


def spectral_error(codec, wav, ref, hops):
    a, b = stft_frames(codec, wav, hops).abs(), stft_frames(codec, ref, hops).abs()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def test_peak_locked_phase_rebuilds_a_sinusoid_between_bins():
    codec = SpeechCodec(CodecConfig(channels=16, latent_dim=8, codebook_size=8, enc_blocks=1, frame_blocks=1,
                                    dec_blocks=1))
    sr, hops = codec.cfg.sample_rate, 60
    length = (hops - 1) * codec.cfg.hop_length + codec.cfg.synth_n_fft
    t = torch.arange(length) / sr
    ref = 0.3 * torch.sin(2 * math.pi * 437.0 * t) + 0.2 * torch.sin(2 * math.pi * 1212.5 * t + 1.0)
    mag = stft_frames(codec, ref, hops).abs()
    locked = synthesise(codec, mag, peak_locked_phase(codec, mag), length)
    centred = synthesise(codec, mag, bin_centre_phase(codec, hops), length)
    inner = slice(codec.cfg.synth_n_fft, length - codec.cfg.synth_n_fft)  # fully overlapped samples
    err_locked = spectral_error(codec, locked[inner], ref[inner], 20)
    err_centred = spectral_error(codec, centred[inner], ref[inner], 20)
    assert err_locked < 0.15 and err_centred > 2 * err_locked, (err_locked, err_centred)
