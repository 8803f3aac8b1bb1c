"""A causal single-codebook speech codec (tokenizer + token-to-wave decoder).

Encoder: log-mel (10 ms hop) → causal residual convs → ÷4 downsample → one 25 Hz frame → continuous
feature ``h`` (the listening channel's input, as the LSLM paper uses vq-wav2vec's unquantized features)
→ latent → nearest codebook entry (the speaking channel's token).
Decoder: code → causal residual convs → ×4 upsample → causal residual convs → per-hop STFT magnitude
and phase advance → inverse STFT by overlap-add (Vocos-style: cheap and streamable). The phase is
synthesised like a phase vocoder: each bin advances by its centre frequency times the hop plus a
learned bounded deviation, so stationary partials stay coherent across overlapping hops by
construction (free per-hop phases interfere, and only an adversarial loss untangles them).

Every stateful layer keeps its past per slot in tensors the caller allocates (``init_state``), so the
engine runs many sessions in one batched ``encode_step`` / ``decode_step``; running the steps from a
zero state equals the offline ``encode`` / ``decode`` used for training (tested).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn

from speech.config import CodecConfig
from speech.streaming import CausalConv1d, CausalStack, conv_as_matmul, hann_ola_norm, name_states, pointwise


class VectorQuantizer(nn.Module):
    """One codebook of unit vectors, nearest-neighbour (cosine) lookup; training updates it by EMA.

    Latents and codes live on the unit sphere: this keeps the encoder from drifting away from the
    codebook and collapsing onto one code (as improved VQGAN does).
    """

    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("codebook", F.normalize(torch.randn(codebook_size, dim), dim=-1))

    def quantize(self, z: Tensor) -> Tensor:
        """``z`` (..., D) → codes (...) by squared distance."""
        flat = z.reshape(-1, z.shape[-1])
        cb = self.codebook
        dist = flat.pow(2).sum(-1, keepdim=True) - 2 * flat @ cb.t() + cb.pow(2).sum(-1)[None, :]
        return dist.argmin(-1).reshape(z.shape[:-1])

    def lookup(self, codes: Tensor) -> Tensor:
        return F.embedding(codes, self.codebook)


class SpeechCodec(nn.Module):
    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c, lat = cfg.channels, cfg.latent_dim
        self.register_buffer("analysis_window", torch.hann_window(cfg.n_fft), persistent=False)
        mel_fb = torchaudio.functional.melscale_fbanks(
            cfg.n_fft // 2 + 1, 0.0, cfg.sample_rate / 2, cfg.n_mels, cfg.sample_rate, norm="slaney",
            mel_scale="slaney",
        )
        self.register_buffer("mel_fb", mel_fb, persistent=False)  # (F, n_mels)
        # encoder
        self.enc_in = CausalConv1d(cfg.n_mels, c, 3)
        self.enc_blocks = CausalStack(c, cfg.enc_blocks)
        self.enc_down = nn.Conv1d(c, c, cfg.frame_hops, stride=cfg.frame_hops)
        self.enc_frame = CausalStack(c, cfg.frame_blocks)
        self.enc_latent = nn.Conv1d(c, lat, 1)
        self.quantizer = VectorQuantizer(cfg.codebook_size, lat)
        # decoder
        cd = cfg.dec_channels or c
        self.dec_in = CausalConv1d(lat, cd, 3)
        self.dec_frame = CausalStack(cd, cfg.frame_blocks)
        self.dec_up = nn.ConvTranspose1d(cd, cd, cfg.frame_hops, stride=cfg.frame_hops)
        self.dec_blocks = CausalStack(cd, cfg.dec_blocks)
        n_bins = cfg.synth_n_fft // 2 + 1
        self.dec_head = nn.Conv1d(cd, 2 * n_bins, 1)
        self.register_buffer("synthesis_window", torch.hann_window(cfg.synth_n_fft), persistent=False)
        bins = torch.arange(n_bins, dtype=torch.float64)
        advance = torch.remainder(2 * math.pi * bins * cfg.hop_length / cfg.synth_n_fft, 2 * math.pi)
        self.register_buffer("phase_advance", advance.float(), persistent=False)
        self.ola_norm = hann_ola_norm(cfg.synth_n_fft, cfg.hop_length)
        self._convs = name_states(self)

    # ---------------------------------------------------------------- shared pieces
    def log_mel(self, wav: Tensor) -> Tensor:
        """``wav`` (B, N) with N = n_fft - hop + k·hop → log-mel (B, n_mels, k); no centring."""
        spec = torch.stft(
            wav, self.cfg.n_fft, self.cfg.hop_length, window=self.analysis_window, center=False,
            return_complex=True,
        )
        power = spec.real.square() + spec.imag.square()  # (B, F, k)
        mel = torch.einsum("bft,fm->bmt", power, self.mel_fb)
        return torch.log(mel.clamp_min(1e-5))

    def _head_to_spectrum(self, h: Tensor, phase0: Tensor) -> tuple[Tensor, Tensor]:
        """Decoder head (B, 2F, k) and the previous hop's phase (B, F) → magnitude and phase (B, k, F).

        Phase is accumulated in float64 and wrapped, so long offline decodes equal streaming ones.
        """
        log_mag, dev = pointwise(self.dec_head, h).transpose(1, 2).chunk(2, dim=-1)  # (B, k, F)
        mag = torch.exp(log_mag.clamp(max=6.0))
        step = (self.phase_advance + math.pi * torch.tanh(dev)).double()
        phase = torch.remainder(phase0.double()[:, None] + torch.cumsum(step, dim=1), 2 * math.pi).to(mag.dtype)
        return mag, phase

    def spectrum_to_frames(self, mag: Tensor, phase: Tensor) -> Tensor:
        """Magnitude and phase (B, k, F) → windowed synthesis frames (B, k, synth_n_fft)."""
        return torch.fft.irfft(torch.polar(mag, phase), n=self.cfg.synth_n_fft) * self.synthesis_window

    def overlap_add(self, frames: Tensor) -> Tensor:
        """Windowed frames (B, k, n), one per hop from sample 0 → waveform (B, (k - 1)·hop + n)."""
        cfg = self.cfg
        k = frames.shape[1]
        out_len = (k - 1) * cfg.hop_length + cfg.synth_n_fft
        wav = F.fold(
            frames.transpose(1, 2), output_size=(1, out_len), kernel_size=(1, cfg.synth_n_fft),
            stride=(1, cfg.hop_length),
        ).reshape(frames.shape[0], out_len)
        return wav / self.ola_norm

    # ---------------------------------------------------------------- offline (training)
    def encode_features(self, wav: Tensor) -> Tensor:
        """``wav`` (B, T·frame_size) → continuous features (B, T, channels), causal."""
        cfg = self.cfg
        if wav.shape[-1] % cfg.frame_size:
            raise ValueError(f"audio length must be a multiple of the frame size {cfg.frame_size}")
        x = self.log_mel(F.pad(wav, (cfg.n_fft - cfg.hop_length, 0)))
        x = self.enc_blocks(self.enc_in(x))
        x = F.gelu(self.enc_down(x))
        return self.enc_frame(x).transpose(1, 2)

    def features_to_latent(self, h: Tensor) -> Tensor:
        """(B, T, channels) → unit latents (B, T, latent_dim), before quantization."""
        return F.normalize(self.enc_latent(h.transpose(1, 2)).transpose(1, 2), dim=-1)

    def encode(self, wav: Tensor) -> Tensor:
        """``wav`` (B, T·frame_size) → codes (B, T)."""
        return self.quantizer.quantize(self.features_to_latent(self.encode_features(wav)))

    def decode_spectrum(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """Quantized latents (B, T, latent_dim) → the decoder's magnitude and phase (B, 4T, F), one per hop."""
        x = self.dec_frame(self.dec_in(q.transpose(1, 2)))
        x = F.gelu(self.dec_up(x))
        phase0 = x.new_zeros(x.shape[0], self.phase_advance.shape[0])
        return self._head_to_spectrum(self.dec_blocks(x), phase0)

    def decode_latent(self, q: Tensor) -> Tensor:
        """Quantized latents (B, T, latent_dim) → waveform (B, T·frame_size)."""
        wav = self.overlap_add(self.spectrum_to_frames(*self.decode_spectrum(q)))
        return wav[:, : q.shape[1] * self.cfg.frame_size]

    def decode(self, codes: Tensor) -> Tensor:
        """``codes`` (B, T) → waveform (B, T·frame_size); equals T decode steps from a zero state."""
        return self.decode_latent(self.quantizer.lookup(codes))

    # ---------------------------------------------------------------- streaming (serving)
    def init_state(self, slots: int, device: torch.device | str = "cpu", dtype=torch.float32) -> dict[str, Tensor]:
        """Preallocated per-slot streaming state of every causal conv, the mel context and the OLA tail."""
        cfg = self.cfg
        state = {m.state_key: torch.zeros(slots, *m.state_shape(), device=device, dtype=dtype) for m in self._convs}
        state["enc_mel_ctx"] = torch.zeros(slots, cfg.n_fft - cfg.hop_length, device=device, dtype=dtype)
        state["dec_ola"] = torch.zeros(slots, cfg.synth_n_fft - cfg.hop_length, device=device, dtype=dtype)
        state["dec_phase"] = torch.zeros(slots, cfg.synth_n_fft // 2 + 1, device=device, dtype=dtype)
        return state

    def decoder_parameters(self) -> list[nn.Parameter]:
        """What turns tokens into sound; training only these keeps every token (and the LSLM) as it is."""
        return [p for name, p in self.named_parameters() if name.startswith("dec_")]

    @staticmethod
    def decoder_state_keys(state: dict[str, Tensor]) -> list[str]:
        """The keys to zero when a new utterance starts (the listening side keeps its state)."""
        return [k for k in state if k.startswith("dec")]

    def encode_step(
        self, audio: Tensor, state: dict[str, Tensor], with_codes: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """One frame for B slots: ``audio`` (B, frame_size) → features (B, channels), codes (B,) or None.

        ``state`` holds (B, ...) views of the slots' rows; updated in place. The listening channel only
        needs the continuous features, so the quantizer runs only when ``with_codes``.
        """
        ctx = state["enc_mel_ctx"]
        wav = torch.cat([ctx, audio], dim=-1)
        ctx.copy_(wav[:, -ctx.shape[1] :])
        x = self.log_mel(wav)  # (B, n_mels, frame_hops)
        x = self.enc_blocks.step(self.enc_in.step(x, state[self.enc_in.state_key]), state)
        x = F.gelu(conv_as_matmul(x, self.enc_down.weight, self.enc_down.bias, 1))  # (B, C, 1): stride = kernel
        h = self.enc_frame.step(x, state)
        codes = self.quantizer.quantize(self.features_to_latent(h.transpose(1, 2))[:, 0]) if with_codes else None
        return h.squeeze(-1), codes

    def decode_step(self, codes: Tensor, state: dict[str, Tensor]) -> Tensor:
        """One frame for B slots: ``codes`` (B,) → waveform (B, frame_size); ``state`` updated in place."""
        cfg = self.cfg
        x = self.quantizer.lookup(codes).unsqueeze(-1)  # (B, lat, 1)
        x = self.dec_frame.step(self.dec_in.step(x, state[self.dec_in.state_key]), state)
        up = self.dec_up  # one column in, ``frame_hops`` out (stride = kernel): a GEMM
        x = (x[:, :, 0] @ up.weight.reshape(up.in_channels, -1)).view(x.shape[0], up.out_channels, -1)
        x = F.gelu(x + up.bias[:, None])  # (B, C, hops)
        mag, phase = self._head_to_spectrum(self.dec_blocks.step(x, state), state["dec_phase"])
        state["dec_phase"].copy_(phase[:, -1])
        frames = self.spectrum_to_frames(mag, phase)  # (B, hops, n)
        ola = state["dec_ola"]
        hop, n = cfg.hop_length, cfg.synth_n_fft
        buf = torch.zeros(codes.shape[0], n + (cfg.frame_hops - 1) * hop, device=ola.device, dtype=ola.dtype)
        buf[:, : ola.shape[1]] += ola
        for i in range(cfg.frame_hops):
            buf[:, i * hop : i * hop + n] += frames[:, i]
        ola.copy_(buf[:, cfg.frame_size :])
        return buf[:, : cfg.frame_size] / self.ola_norm
