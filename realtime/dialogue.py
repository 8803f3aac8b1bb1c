"""The dialogue brain of voice chat: a user's spoken turn → its transcript → a streamed answer → speech.

A session with a ``Dialogue`` keeps the audio of each user turn (from the energy detector's
``speech_started`` to ``speech_stopped``, plus ``prefix_padding_ms`` before it, at most ``max_turn_s``),
has it transcribed (Whisper tiny.en by default), adds it to the conversation as a user item, and, when
``turn_detection.create_response`` is on, answers it with the responder (a chat LM by default).

Everything slow runs here, in one worker thread shared by all sessions, never on the event loop: the
ASR call and the chat LM's token loop. One worker, not one per session: on a small CPU two LMs
decoding at once are each slower than one after the other, and the engine's per-frame voice step
needs its share of the cores too.

How the answer is spoken: the LSLM speaks one whole text per ``engine.speak`` (its text is a prefix of
its speech tokens), so the answer cannot be fed to it word by word. ``SpeechChunker`` cuts the streamed
answer into sentences (long ones at a comma or a space, to fit the model's text limit) and the session
speaks them one after the other under the same response. Speaking starts as soon as the first
sentence is written, while the LM writes the next: the user waits for one sentence, not the whole
answer, and the voice model listens (and can be interrupted) all along. An IRQ ends the response and
tells the LM to stop writing.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from realtime.responder import Responder

log = logging.getLogger(__name__)

ASR_RATE = 16000  # what Whisper hears


class Transcriber(Protocol):
    def transcribe(self, audio: np.ndarray) -> str: ...  # 16 kHz mono float32 → text


@dataclass
class DialogueConfig:
    max_turn_s: float = 30.0  # audio kept per user turn (the newest part); Whisper hears 30 s at most
    min_turn_s: float = 0.25  # shorter bursts (a click, a cough) are not turns

    def __post_init__(self) -> None:
        if not 0 < self.min_turn_s < self.max_turn_s:
            raise ValueError("need 0 < min_turn_s < max_turn_s")


class TurnAudio:
    """The audio of the user's current turn, bounded: a pre-roll ring while waiting, then the turn itself.

    The energy detector fires on the first loud chunk; the ``prefix_ms`` before it hold the word's soft
    onset (as ``prefix_padding_ms`` does in the Realtime API). Only the newest ``max_s`` are kept.
    """

    def __init__(self, rate: int, prefix_ms: int, max_s: float) -> None:
        self.rate = rate
        self.prefix = int(rate * prefix_ms / 1000)
        self.limit = int(rate * max_s)
        self._chunks: deque[np.ndarray] = deque()
        self._size = 0
        self.recording = False

    def feed(self, x: np.ndarray) -> None:
        self._chunks.append(x)
        self._size += x.shape[0]
        keep = self.limit if self.recording else self.prefix
        while self._chunks and self._size - self._chunks[0].shape[0] >= keep:
            self._size -= self._chunks.popleft().shape[0]

    def start(self) -> None:
        """The turn began (the chunk just fed was loud): keep what the pre-roll holds and go on recording."""
        self.recording = True

    def take(self) -> np.ndarray:
        """The turn's audio; recording stops and the pre-roll starts afresh."""
        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32)
        if audio.shape[0] > self.limit:
            audio = audio[-self.limit :]
        self._chunks.clear()
        self._size = 0
        self.recording = False
        return audio

    def set_prefix(self, prefix_ms: int) -> None:
        self.prefix = int(self.rate * prefix_ms / 1000)


_SENTENCE = re.compile(r"[.!?]+[\"')\]]*\s+")
_CLAUSE = re.compile(r"[,;:]\s+")


class SpeechChunker:
    """Streamed text → speakable segments: whole sentences, a long one cut to at most ``max_chars`` bytes."""

    def __init__(self, max_chars: int) -> None:
        if max_chars < 8:
            raise ValueError("max_chars must be at least 8")
        self.max_chars = max_chars
        self._buf = ""

    def push(self, piece: str) -> list[str]:
        self._buf += piece
        out = []
        while True:
            m = _SENTENCE.search(self._buf)
            if m is None:
                break
            out += self._fit(self._buf[: m.end()])
            self._buf = self._buf[m.end() :]
        while _nbytes(self._buf) > self.max_chars:  # a run-on sentence: do not wait for its end
            head, self._buf = self._split(self._buf)
            out.append(head)
        return out

    def flush(self) -> list[str]:
        rest, self._buf = self._buf, ""
        return self._fit(rest)

    def _fit(self, text: str) -> list[str]:
        out = []
        while _nbytes(text) > self.max_chars:
            head, text = self._split(text)
            out.append(head)
        return out + ([text.strip()] if text.strip() else [])

    def _split(self, text: str) -> tuple[str, str]:
        """Cut before ``max_chars``: at the last clause mark, else the last space, else anywhere."""
        window = text.encode("utf-8")[: self.max_chars].decode("utf-8", errors="ignore")
        cut = max((m.end() for m in _CLAUSE.finditer(window)), default=0)
        if cut < len(window) // 3:  # a clause mark too early would leave a crumb: prefer a space
            cut = window.rfind(" ") + 1 or len(window)
        return text[:cut].strip(), text[cut:].lstrip()


def _nbytes(text: str) -> int:
    return len(text.strip().encode("utf-8"))


_END = object()


class Dialogue:
    """The ASR and the responder of voice chat, with the one worker thread they run in."""

    def __init__(self, responder: Responder, asr: Transcriber | None = None, cfg: DialogueConfig | None = None) -> None:
        self.responder = responder
        self.asr = asr
        self.cfg = cfg or DialogueConfig()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dialogue")

    @property
    def hears_turns(self) -> bool:
        return self.asr is not None

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    async def transcribe(self, audio: np.ndarray, rate: int) -> str:
        """Audio of one turn at ``rate`` → its transcript (in the worker thread)."""
        if self.asr is None:
            raise RuntimeError("this dialogue has no speech recogniser")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, self._transcribe, audio, rate)

    def _transcribe(self, audio: np.ndarray, rate: int) -> str:
        if rate != ASR_RATE:
            import torch
            import torchaudio

            with torch.inference_mode():
                audio = torchaudio.functional.resample(torch.from_numpy(audio), rate, ASR_RATE).numpy()
        return self.asr.transcribe(audio)

    async def stream(
        self, items: list[dict[str, Any]], instructions: str, stop: threading.Event
    ) -> AsyncIterator[str]:
        """The responder's answer, piece by piece, as the worker thread writes it.

        Leaving the loop early (or ``stop.set()``) makes the worker stop at its next token.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(x: object) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, x)
            except RuntimeError:  # the loop is gone (server shutting down)
                stop.set()

        def work() -> None:
            try:
                for piece in self.responder.stream(items, instructions, stop):
                    if stop.is_set():
                        break
                    put(piece)
            except Exception as e:  # handed to the session, which fails the response with a reason
                put(e)
            finally:
                put(_END)

        loop.run_in_executor(self._worker, work)
        try:
            while (x := await queue.get()) is not _END:
                if isinstance(x, Exception):
                    raise x
                yield x
        finally:
            stop.set()


def build_dialogue(settings: Any, device: str) -> Dialogue:
    """The brain that ``settings.chat_model`` / ``settings.asr_model`` name, loaded now (seconds, not at import)."""
    from realtime.responder import ChatResponder, EchoResponder

    if settings.chat_model == "echo":
        responder: Responder = EchoResponder()
    else:
        from lm.chat import ChatLM

        responder = ChatResponder(ChatLM.load(settings.chat_model, device=device))
    asr = None
    if settings.asr_model != "none":
        from speech.asr import load_asr

        asr = load_asr(settings.asr_model or None, device)
    return Dialogue(responder, asr, DialogueConfig(max_turn_s=settings.max_turn_s))
