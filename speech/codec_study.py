"""Where does the codec lose intelligibility? ``python -m speech.codec_study [--quick] [--json PATH]``.

Whisper tiny.en's word error rate on target-voice sentences resynthesised several ways, all through the
decoder's own framing (one ``synth_n_fft`` window per 10 ms hop, overlap-added):

* the true STFT magnitude with the true phase (the framing itself loses nothing), with the phase our
  decoder's scheme would make from nothing (each bin advancing at its centre frequency), with
  peak-locked phase (each spectral peak advancing at its interpolated frequency, the bins around it
  locked to it, as a phase vocoder with identity phase locking), and with Griffin-Lim;
* the codec's round trip, and the decoder's own magnitudes with peak-locked phase and with Griffin-Lim.

The first group says what a perfect magnitude would give with each phase; the second whether the
decoder's magnitudes or its phase cost more. It is a study, not a recipe: nothing here ships.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from speech.asr import WhisperASR, word_errors
from speech.checkpoints import load_codec
from speech.codec import SpeechCodec
from speech.corpus import Corpus

GRIFFIN_LIM_ITERS = 32


def stft_frames(codec: SpeechCodec, wav: torch.Tensor, hops: int) -> torch.Tensor:
    """``wav`` (N,) → complex spectra (hops, F) of the windows starting at every hop, as the decoder frames."""
    n, hop = codec.cfg.synth_n_fft, codec.cfg.hop_length
    need = (hops - 1) * hop + n
    padded = torch.nn.functional.pad(wav, (0, max(0, need - wav.shape[0])))
    return torch.fft.rfft(padded.unfold(0, n, hop)[:hops] * codec.synthesis_window)


def synthesise(codec: SpeechCodec, mag: torch.Tensor, phase: torch.Tensor, length: int) -> torch.Tensor:
    return codec.overlap_add(codec.spectrum_to_frames(mag[None], phase[None]))[0, :length]


def bin_centre_phase(codec: SpeechCodec, hops: int) -> torch.Tensor:
    """Every bin advancing at its centre frequency: the decoder's phase with no learned deviation."""
    steps = codec.phase_advance.double().expand(hops, -1)
    return torch.remainder(torch.cumsum(steps, 0), 2 * math.pi).float()


def peak_locked_phase(codec: SpeechCodec, mag: torch.Tensor, floor_db: float = 104.0) -> torch.Tensor:
    """Phase from magnitudes alone, hop by hop: each peak advances at its quadratically interpolated
    frequency; every bin takes its nearest peak's phase plus π per bin (a hann window's alternating sign)."""
    hops, nb = mag.shape
    advance_per_bin = 2 * math.pi * codec.cfg.hop_length / codec.cfg.synth_n_fft
    bins = torch.arange(nb, dtype=torch.float64)
    log_mag = mag.double().clamp_min(1e-7).log()
    phase = torch.zeros(hops, nb, dtype=torch.float64)
    prev = torch.zeros(nb, dtype=torch.float64)
    for t in range(hops):
        m = log_mag[t]
        left, right = torch.cat([m[:1] - 1, m[:-1]]), torch.cat([m[1:], m[-1:] - 1])
        peaks = torch.nonzero((m >= left) & (m > right) & (m > m.max() - floor_db / 8.686)).flatten()
        if peaks.numel() == 0:
            peaks = m.argmax().reshape(1)
        a, b, c = left[peaks], m[peaks], right[peaks]
        den = a - 2 * b + c
        offset = torch.where(den.abs() > 1e-9, 0.5 * (a - c) / den, torch.zeros_like(den)).clamp(-0.5, 0.5)
        peak_phase = prev[peaks] + advance_per_bin * (peaks.double() + offset)
        owner = torch.bucketize(bins, (peaks[:-1].double() + peaks[1:].double()) / 2)
        phase[t] = torch.remainder(peak_phase[owner] + math.pi * (bins - peaks[owner].double()), 2 * math.pi)
        prev = phase[t]
    return phase.float()


def griffin_lim(codec: SpeechCodec, mag: torch.Tensor, phase: torch.Tensor, iters: int = GRIFFIN_LIM_ITERS):
    hops = mag.shape[0]
    length = (hops - 1) * codec.cfg.hop_length + codec.cfg.synth_n_fft
    for _ in range(iters):
        phase = torch.angle(stft_frames(codec, synthesise(codec, mag, phase, length), hops))
    return phase


ROWS = (
    "target voice",
    "true magnitude, true phase",
    "true magnitude, bin-centre phase",
    "true magnitude, peak-locked phase",
    "true magnitude, Griffin-Lim",
    "codec round trip (decoder's phase)",
    "decoder magnitude, peak-locked phase",
    "decoder magnitude, Griffin-Lim",
)


@torch.no_grad()
def resyntheses(codec: SpeechCodec, wav: np.ndarray) -> dict[str, np.ndarray]:
    """The target audio and its resyntheses, one per row of ``ROWS``."""
    fs = codec.cfg.frame_size
    x = torch.from_numpy(wav[: wav.shape[0] // fs * fs])
    codes = codec.encode(x[None])
    hops, length = codes.shape[1] * codec.cfg.frame_hops, x.shape[0]
    spec = stft_frames(codec, x, hops)
    true_mag = spec.abs()
    true_locked = peak_locked_phase(codec, true_mag)
    dec_mag, dec_phase = (t[0] for t in codec.decode_spectrum(codec.quantizer.lookup(codes)))
    out = {
        ROWS[0]: x,
        ROWS[1]: synthesise(codec, true_mag, torch.angle(spec), length),
        ROWS[2]: synthesise(codec, true_mag, bin_centre_phase(codec, hops), length),
        ROWS[3]: synthesise(codec, true_mag, true_locked, length),
        ROWS[4]: synthesise(codec, true_mag, griffin_lim(codec, true_mag, true_locked), length),
        ROWS[5]: synthesise(codec, dec_mag, dec_phase, length),  # = codec.decode(codes), without decoding twice
        ROWS[6]: synthesise(codec, dec_mag, peak_locked_phase(codec, dec_mag), length),
        ROWS[7]: synthesise(codec, dec_mag, griffin_lim(codec, dec_mag, dec_phase), length),
    }
    return {k: v.numpy() for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m speech.codec_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--codec", default="speech/weights/codec.safetensors")
    p.add_argument("--data", default="data/speech")
    p.add_argument("--split", default="val")
    p.add_argument("--utterances", type=int, default=24)
    p.add_argument("--asr-model", help="a local faster-whisper model folder (default: Whisper tiny.en, offline)")
    p.add_argument("--quick", action="store_true", help="6 utterances (under a minute)")
    p.add_argument("--json", type=Path, help="write the WER of every row here")
    args = p.parse_args(argv)
    n = 6 if args.quick else args.utterances
    _, codec = load_codec(args.codec)
    codec.eval()
    corpus = Corpus(args.data)
    asr = WhisperASR(args.asr_model)
    entries = corpus.manifest("speech", args.split)[:n]
    if not entries:
        raise SystemExit(f"no {args.split} sentences in {args.data}")
    hyps: dict[str, list[str]] = {row: [] for row in ROWS}
    for entry in tqdm(entries, desc="resynthesise + transcribe", unit="utt"):
        for row, audio in resyntheses(codec, corpus.audio("speech", entry)).items():
            hyps[row].append(asr.transcribe(audio))
    refs = [e["text"] for e in entries]
    words = word_errors(refs, refs)[1]
    wer = {row: word_errors(refs, h)[0] / max(words, 1) for row, h in hyps.items()}
    print(f"\nWhisper tiny.en WER, {len(entries)} {args.split} sentences ({words} words), codec {args.codec}")
    print(f"{'resynthesis':40}{'WER %':>8}")
    for row in ROWS:
        print(f"{row:40}{100 * wer[row]:8.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"codec": args.codec, "split": args.split, "utterances": len(entries),
                                         "words": words, "wer": wer}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
