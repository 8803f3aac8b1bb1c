"""The full-duplex voice model: codec + LSLM behind one batched per-frame step over session slots.

This is the hot path of the voice server. One call of ``step`` advances every live slot by one codec
frame (40 ms): the listening encoder consumes the slot's newest microphone frame, the speaking decoder
emits the next speech token (or EOS / IRQ) with that frame fused in, and the codec decoder turns the
token into audio. Slots are rows of preallocated tensors; the engine keeps live slots packed at
``[0, n)`` so each step works on views, never on gathered copies.

Shapes (B = rows stepped, F = frame_size samples at ``sample_rate``):
    audio_in (B, F) float  →  StepOutput.audio (B, F) float, StepOutput.events (B,) int8 on the host.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from speech.checkpoints import load_codec, load_irq_policy, load_lslm
from speech.codec import SpeechCodec
from speech.config import VoiceModelConfig
from speech.lslm import LSLM
from speech.text import ByteTokenizer, PhonemeTokenizer, TextTokenizer

log = logging.getLogger(__name__)

# Per-row events of a step (int8 on the host).
EV_LISTEN = 0  # not speaking: listened only
EV_AUDIO = 1  # spoke one frame of audio
EV_EOS = 2  # finished speaking
EV_IRQ = 3  # interrupted by the user: stopped at once, this frame carries no audio
EV_LIMIT = 4  # ran out of positions: stopped


@dataclass
class StepOutput:
    events: np.ndarray  # (B,) int8
    audio: torch.Tensor  # (B, F) on the model's device; rows without EV_AUDIO are to be ignored


class DuplexVoiceModel:
    """Owns the networks and every slot's state. Not thread-safe: one engine thread drives it."""

    def __init__(
        self,
        cfg: VoiceModelConfig,
        capacity: int,
        device: str | torch.device = "cpu",
        tokenizer: TextTokenizer | None = None,
        codec: SpeechCodec | None = None,
        lslm: LSLM | None = None,
        seed: int = 0,
        weights_note: str = "random init",
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.cfg = cfg
        self.capacity = capacity
        self.device = torch.device(device)
        self.tokenizer = tokenizer or (PhonemeTokenizer() if cfg.lslm.tokenizer == "phonemes" else ByteTokenizer())
        if self.tokenizer.vocab_size > cfg.lslm.text_vocab:
            raise ValueError("the tokenizer's vocabulary is larger than lslm.text_vocab")
        torch.manual_seed(seed)
        self.codec = (codec or SpeechCodec(cfg.codec)).to(self.device).eval()
        self.lslm = (lslm or LSLM(cfg.lslm)).to(self.device).eval()
        self.weights_note = weights_note
        self.sample_rate = cfg.codec.sample_rate
        self.frame_size = cfg.codec.frame_size
        self.frame_rate = cfg.codec.frame_rate
        dev, f32 = self.device, torch.float32
        self.codec_state = self.codec.init_state(capacity, dev, f32)
        self.k_cache, self.v_cache = self.lslm.init_cache(capacity, dev, f32)
        self.prev_token = torch.zeros(capacity, dtype=torch.long, device=dev)
        self.pos = torch.zeros(capacity, dtype=torch.long, device=dev)
        # host mirrors: the engine reads these without touching the device
        self.speaking = np.zeros(capacity, dtype=bool)
        self.pos_host = np.zeros(capacity, dtype=np.int64)
        self.generator = torch.Generator(device=dev).manual_seed(seed)
        self.logit_bias = torch.zeros(cfg.lslm.out_vocab, device=dev)
        # IRQ is a decision, not a sample: speech tokens are chosen among the other outputs, and IRQ
        # fires once its lead over them has held for ``irq_frames`` frames (VoiceModelConfig)
        self._no_irq = torch.zeros(cfg.lslm.out_vocab, device=dev)
        self._no_irq[cfg.lslm.irq_id] = float("-inf")
        self.irq_lead = torch.zeros(capacity, device=dev)  # this step's lead, per slot (calibration reads it)
        self.irq_streak = torch.zeros(capacity, dtype=torch.long, device=dev)
        self._silence = torch.zeros(capacity, self.frame_size, device=dev)  # returned when no row speaks

    # ---------------------------------------------------------------- slot lifecycle
    def reset_slot(self, slot: int) -> None:
        for t in self.codec_state.values():
            t[slot].zero_()
        self.speaking[slot] = False
        self.pos_host[slot] = 0
        self.pos[slot] = 0
        self.prev_token[slot] = 0
        self.irq_streak[slot] = 0

    def move_slot(self, src: int, dst: int) -> None:
        """Copy every per-slot tensor of ``src`` into ``dst`` (the engine packs live slots)."""
        for t in self.codec_state.values():
            t[dst].copy_(t[src])
        n = int(self.pos_host[src]) + 1
        self.k_cache[:, dst, :, :n].copy_(self.k_cache[:, src, :, :n])
        self.v_cache[:, dst, :, :n].copy_(self.v_cache[:, src, :, :n])
        self.prev_token[dst] = self.prev_token[src]
        self.pos[dst] = self.pos[src]
        self.irq_streak[dst] = self.irq_streak[src]
        self.speaking[dst] = self.speaking[src]
        self.pos_host[dst] = self.pos_host[src]

    @property
    def max_text_chars(self) -> int:
        """Text (UTF-8 bytes) that always fits one response's prefix: longer answers are spoken in parts.

        Exact for the byte tokenizer; espeak-ng IPA runs about one symbol per letter, so half is safe.
        """
        budget = self.cfg.lslm.max_text_len - 2  # bos, eos
        return budget if isinstance(self.tokenizer, ByteTokenizer) else budget // 2

    def encode_text(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        limit = self.cfg.lslm.max_text_len
        if len(ids) > limit:
            raise ValueError(f"text is {len(ids)} tokens; the voice model speaks at most {limit} per response")
        return ids

    @torch.inference_mode()
    def start_speaking(self, slot: int, text: str) -> None:
        """Prefill the text to speak into the slot's KV cache; the next step speaks its first frame."""
        self.start_speaking_ids(slot, self.encode_text(text))

    @torch.inference_mode()
    def start_speaking_ids(self, slot: int, token_ids: list[int]) -> None:
        """``start_speaking`` for text already tokenized (benchmarks; machines without espeak-ng)."""
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        self.lslm.prefill(ids, self.k_cache[:, slot], self.v_cache[:, slot])
        for name in self.codec.decoder_state_keys(self.codec_state):
            self.codec_state[name][slot].zero_()
        self.prev_token[slot] = self.cfg.lslm.speech_bos_id
        self.pos[slot] = len(ids)
        self.pos_host[slot] = len(ids)
        self.irq_streak[slot] = 0
        self.speaking[slot] = True

    def stop_speaking(self, slot: int) -> None:
        self.speaking[slot] = False

    def max_speech_frames(self, slot: int) -> int:
        """Frames the slot can still speak before its positions run out."""
        return int(self.cfg.lslm.max_seq_len - self.pos_host[slot])

    def set_logit_bias(self, token_id: int, value: float) -> None:
        """Add ``value`` to one output logit for every slot (e.g. to force or forbid IRQ / EOS)."""
        self.logit_bias[token_id] = value

    # ---------------------------------------------------------------- the per-frame step
    @torch.inference_mode()
    def step(self, lo: int, hi: int, audio_in: torch.Tensor) -> StepOutput:
        """Advance slots ``[lo, hi)`` by one frame. ``audio_in`` (hi-lo, F) on the model's device."""
        cfg = self.cfg.lslm
        n = hi - lo
        rows = slice(lo, hi)
        state = {k: v[rows] for k, v in self.codec_state.items()}
        feats, _ = self.codec.encode_step(audio_in, state)  # listening channel, every row
        speaking_host = self.speaking[lo:hi].copy()
        events = np.zeros(n, dtype=np.int8)
        if not speaking_host.any():
            return StepOutput(events, self._silence[:n])
        t_max = int(self.pos_host[lo:hi][speaking_host].max()) + 1
        pos = torch.clamp(self.pos[rows], max=t_max - 1)  # idle rows may sit past t_max; their output is unused
        logits = self.lslm.decode_step(
            self.prev_token[rows], pos, feats, self.k_cache[:, rows], self.v_cache[:, rows], t_max
        )
        logits = logits + self.logit_bias
        speech_logits = logits + self._no_irq
        lead = logits[:, cfg.irq_id] - speech_logits.amax(-1)
        self.irq_lead[rows] = lead
        streak = torch.where(lead >= self.cfg.irq_margin, self.irq_streak[rows] + 1, 0)
        self.irq_streak[rows] = streak
        nxt = torch.where(streak >= self.cfg.irq_frames, cfg.irq_id, self._sample(speech_logits))  # (B,)
        is_code = nxt < cfg.codebook_size
        audio = self.codec.decode_step(torch.where(is_code, nxt, 0), state)
        nxt_host = nxt.cpu().numpy()  # the one device→host sync of the step
        speaking = torch.from_numpy(speaking_host).to(self.device, non_blocking=True)
        advance = speaking & is_code
        self.prev_token[rows] = torch.where(advance, nxt, self.prev_token[rows])
        self.pos[rows] += advance.long()
        code_host = nxt_host < cfg.codebook_size
        events[speaking_host & code_host] = EV_AUDIO
        events[speaking_host & (nxt_host == cfg.eos_id)] = EV_EOS
        events[speaking_host & (nxt_host == cfg.irq_id)] = EV_IRQ
        self.pos_host[lo:hi] += (speaking_host & code_host).astype(np.int64)
        full = speaking_host & code_host & (self.pos_host[lo:hi] >= cfg.max_seq_len)
        events[full] = EV_LIMIT
        self.speaking[lo:hi] &= events == EV_AUDIO
        return StepOutput(events, audio)

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        temp = self.cfg.temperature
        if temp <= 0:
            return logits.argmax(-1)
        top = torch.topk(logits / temp, min(self.cfg.top_k, logits.shape[-1]), dim=-1)
        choice = torch.multinomial(torch.softmax(top.values, -1), 1, generator=self.generator)
        return top.indices.gather(-1, choice)[:, 0]

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {f"codec.{k}": v for k, v in self.codec.state_dict().items()}
        sd.update({f"lslm.{k}": v for k, v in self.lslm.state_dict().items()})
        return sd


DEFAULT_WEIGHTS = Path(__file__).parent / "weights"


def load_voice_model(
    weights_dir: str | Path, capacity: int, device: str | torch.device = "cpu", seed: int = 0
) -> DuplexVoiceModel:
    """``codec.safetensors`` and ``lslm.safetensors`` from a folder; a missing one is a seeded random init.

    The LSLM must have been trained on this codec's tokens: their sizes are checked.
    """
    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        raise FileNotFoundError(f"voice weights folder not found: {weights_dir}")
    cfg = VoiceModelConfig()
    codec = lslm = None
    notes = []
    if (weights_dir / "codec.safetensors").is_file():
        cfg.codec, codec = load_codec(weights_dir / "codec.safetensors")
        cfg.lslm.codebook_size, cfg.lslm.listen_dim = cfg.codec.codebook_size, cfg.codec.channels
        notes.append("codec: trained")
    irq: dict[str, float] = {}
    if (weights_dir / "lslm.safetensors").is_file():
        cfg.lslm, lslm = load_lslm(weights_dir / "lslm.safetensors")
        irq = load_irq_policy(weights_dir / "lslm.safetensors")
        notes.append("lslm: trained")
    missing = [n for n, m in (("codec", codec), ("lslm", lslm)) if m is None]
    if missing:
        log.warning("no trained %s in %s: serving a seeded random init for it", " or ".join(missing), weights_dir)
        notes += [f"{n}: random init (untrained)" for n in missing]
    cfg = VoiceModelConfig(codec=cfg.codec, lslm=cfg.lslm, **irq)  # re-validates codec/lslm agreement
    return DuplexVoiceModel(cfg, capacity, device, codec=codec, lslm=lslm, seed=seed, weights_note="; ".join(notes))


def load_default_voice_model(capacity: int, device: str | torch.device = "cpu") -> DuplexVoiceModel:
    """The embedded default: the committed weights in ``speech/weights`` (random init where none)."""
    if not DEFAULT_WEIGHTS.is_dir():
        log.warning("no voice weights shipped at %s: serving a seeded random init (untrained)", DEFAULT_WEIGHTS)
        return DuplexVoiceModel(VoiceModelConfig(), capacity, device, weights_note="random init (untrained)")
    return load_voice_model(DEFAULT_WEIGHTS, capacity, device)
