"""Configurations of the speech models: the codec and the listening-while-speaking LM (LSLM).

Every size lives here as a dataclass, validated once, so that training recipes, checkpoints and the
serving engine agree on shapes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

Fusion = Literal["early", "middle", "late", "none"]


@dataclass
class CodecConfig:
    """A causal single-codebook speech codec: log-mel → conv encoder → VQ → conv decoder → iSTFT.

    One codec frame is ``frame_hops`` mel hops: 4 × 10 ms = 40 ms at 16 kHz (25 Hz tokens).
    """

    sample_rate: int = 16000
    hop_length: int = 160
    n_fft: int = 400
    n_mels: int = 80
    frame_hops: int = 4
    channels: int = 128
    latent_dim: int = 64
    codebook_size: int = 1024
    enc_blocks: int = 3  # residual causal blocks at the mel rate (dilations 1, 2, 4)
    frame_blocks: int = 2  # residual causal blocks at the frame rate, in the encoder and the decoder
    dec_blocks: int = 4  # residual causal blocks at the mel rate in the decoder
    dec_channels: int = 0  # the decoder's width; 0: ``channels`` (a wider decoder keeps the tokens)
    synth_n_fft: int = 640  # the decoder's iSTFT window; hop is hop_length (4x overlap, COLA for hann^2)

    def __post_init__(self) -> None:
        if self.n_fft < self.hop_length:
            raise ValueError(f"n_fft ({self.n_fft}) must be >= hop_length ({self.hop_length})")
        if self.synth_n_fft % self.hop_length:
            raise ValueError("synth_n_fft must be a multiple of hop_length for constant overlap-add")
        if self.codebook_size < 2:
            raise ValueError("codebook_size must be at least 2")
        if self.dec_channels < 0:
            raise ValueError("dec_channels must be >= 0 (0: the encoder's channels)")

    @property
    def frame_size(self) -> int:
        """Samples per codec frame at ``sample_rate``."""
        return self.hop_length * self.frame_hops

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.frame_size


@dataclass
class LSLMConfig:
    """The speaking channel (decoder-only TTS over codec tokens) and its fusion with the listening channel.

    Paper size is d=768, 12 layers, 12 heads; the default here is small enough for a CPU.
    """

    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    d_ff: int = 1024
    text_vocab: int = 259  # byte tokenizer: 256 bytes + pad, bos, eos (speech.text)
    max_text_len: int = 256
    max_speech_len: int = 750  # 30 s at 25 Hz
    fusion: Fusion = "middle"
    listen_dim: int = 128  # the codec encoder's continuous feature size (CodecConfig.channels)
    dropout: float = 0.0
    codebook_size: int = 1024
    tokenizer: str = "bytes"  # bytes | phonemes (speech.text)
    # LayerNorm the listening features and zero-init their projection. The codec's features have an RMS
    # near 16, ~1000x the token embeddings: unnormalised, they drown the text and position signal in
    # every block (early / middle fusion) and the TTS learns far slower. Checkpoints saved before this
    # field existed load with False.
    listen_norm: bool = True

    def __post_init__(self) -> None:
        if self.tokenizer not in ("bytes", "phonemes"):
            raise ValueError(f"tokenizer must be bytes or phonemes, not {self.tokenizer!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.fusion not in ("early", "middle", "late", "none"):
            raise ValueError(f"fusion must be early, middle, late or none, not {self.fusion!r}")

    # Output vocabulary: codec codes, then the two control tokens.
    @property
    def eos_id(self) -> int:
        return self.codebook_size

    @property
    def irq_id(self) -> int:
        return self.codebook_size + 1

    @property
    def out_vocab(self) -> int:
        return self.codebook_size + 2

    # Input vocabulary of the speech positions: codec codes, then BOS of speech.
    @property
    def speech_bos_id(self) -> int:
        return self.codebook_size

    @property
    def max_seq_len(self) -> int:
        return self.max_text_len + self.max_speech_len + 1


@dataclass
class VoiceModelConfig:
    """Everything the full-duplex voice model needs: codec + LSLM + decoding choices."""

    codec: CodecConfig = field(default_factory=CodecConfig)
    lslm: LSLMConfig = field(default_factory=LSLMConfig)
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 50
    # When to stop for the user: IRQ's logit must lead every other output by ``irq_margin`` on
    # ``irq_frames`` consecutive frames. (0, 1) is plain argmax decoding; a trained model ships the pair
    # fitted on the validation split (``python -m speech.calibrate``) in its checkpoint's metadata.
    irq_margin: float = 0.0
    irq_frames: int = 1

    def __post_init__(self) -> None:
        if self.lslm.codebook_size != self.codec.codebook_size:
            raise ValueError("lslm.codebook_size must equal codec.codebook_size")
        if self.lslm.listen_dim != self.codec.channels:
            raise ValueError("lslm.listen_dim must equal codec.channels (the listening features)")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.irq_frames < 1:
            raise ValueError("irq_frames must be at least 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VoiceModelConfig:
        return cls(
            codec=CodecConfig(**d.get("codec", {})),
            lslm=LSLMConfig(**d.get("lslm", {})),
            temperature=d.get("temperature", 0.0),
            top_k=d.get("top_k", 50),
            irq_margin=d.get("irq_margin", 0.0),
            irq_frames=d.get("irq_frames", 1),
        )

    @classmethod
    def tiny(cls) -> VoiceModelConfig:
        """A very small configuration for tests."""
        codec = CodecConfig(channels=32, latent_dim=16, codebook_size=64, enc_blocks=2, frame_blocks=1, dec_blocks=2)
        lslm = LSLMConfig(
            d_model=32, n_layers=2, n_heads=2, d_ff=64, max_text_len=64, max_speech_len=200,
            listen_dim=32, codebook_size=64,
        )
        return cls(codec=codec, lslm=lslm)
