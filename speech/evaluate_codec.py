"""Evaluate a codec: ``python -m speech.evaluate_codec [--quick] [--json PATH]``.

On held-out target-voice utterances: mel distance of the round trip, codebook perplexity, cost per
streamed frame, and intelligibility — Whisper tiny.en's word error rate on the round trip beside its
WER on the original audio (the ceiling), as the LSLM paper judges speech.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from speech.asr import WhisperASR, word_errors
from speech.checkpoints import load_codec
from speech.corpus import Corpus
from speech.recipe import finish_report
from speech.train_codec import evaluate, frame_cost_ms


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m speech.evaluate_codec", description=__doc__.split("\n\n")[0])
    p.add_argument("--codec", default="speech/weights/codec.safetensors")
    p.add_argument("--data", default="data/speech")
    p.add_argument("--split", default="test")
    p.add_argument("--utterances", type=int, default=150)
    p.add_argument("--asr-model", help="a local faster-whisper model folder (default: Whisper tiny.en, offline)")
    p.add_argument("--quick", action="store_true", help="12 utterances (under a minute)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    n = 12 if args.quick else args.utterances
    _, codec = load_codec(args.codec)
    codec.eval()
    corpus = Corpus(args.data)
    asr = WhisperASR(args.asr_model)
    fs = codec.cfg.frame_size
    refs, hyp_orig, hyp_codec = [], [], []
    for entry in tqdm(corpus.manifest("speech", args.split)[:n], desc="transcribe", unit="utt"):
        wav = corpus.audio("speech", entry)
        wav = wav[: wav.shape[0] // fs * fs]
        with torch.no_grad():
            recon = codec.decode(codec.encode(torch.from_numpy(wav)[None]))[0].numpy()
        refs.append(entry["text"])
        hyp_orig.append(asr.transcribe(wav))
        hyp_codec.append(asr.transcribe(recon))
    e_o, words = word_errors(refs, hyp_orig)
    e_c, _ = word_errors(refs, hyp_codec)
    report = {**evaluate(codec, corpus, args.split, n), "frame_ms_b1": frame_cost_ms(codec),
              "wer_codec": e_c / max(words, 1), "wer_original": e_o / max(words, 1), "words": words}
    finish_report(report, ["mel_distance", "perplexity", "frame_ms_b1", "wer_original", "wer_codec", "words"],
                  args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
