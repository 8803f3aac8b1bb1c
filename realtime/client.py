"""Python client of ``/v1/realtime`` on the ``websockets`` package.

``RealtimeClient`` is a thin async wrapper (connect, send events, iterate server events).
``converse`` is what the CLI does: ask the server to say a text while a wav file streams in real time
as the microphone, and collect what the server said.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import websockets

from realtime.audio import float_to_pcm16, pcm16_to_float
from realtime.protocol import BinaryKind

WIRE_RATE = 24000


class RealtimeClient:
    def __init__(self, url: str, api_key: str | None = None, beta: bool = False) -> None:
        self.url, self.api_key, self.beta = url, api_key, beta
        self.ws: Any = None

    async def __aenter__(self) -> RealtimeClient:
        headers = {}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if self.beta:
            headers["OpenAI-Beta"] = "realtime=v1"
        self.ws = await websockets.connect(self.url, additional_headers=headers, max_size=4 * 1024 * 1024)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.ws.close()

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(event))

    async def append_audio(self, samples: np.ndarray) -> None:
        await self.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(float_to_pcm16(samples)).decode()})

    async def say(self, text: str, max_output_tokens: int | None = None) -> None:
        await self.send({"type": "conversation.item.create",
                         "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
        resp: dict[str, Any] = {"type": "response.create"}
        if max_output_tokens:
            resp["response"] = {"max_output_tokens": max_output_tokens}
        await self.send(resp)

    async def recv(self, timeout: float | None = None) -> dict[str, Any] | bytes:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        return raw if isinstance(raw, bytes) else json.loads(raw)

    async def events(self):
        async for raw in self.ws:
            yield raw if isinstance(raw, bytes) else json.loads(raw)


@dataclass
class ConversationResult:
    audio: np.ndarray  # what the server said, float32 at 24 kHz
    status: str | None
    events: list[str] = field(default_factory=list)
    interrupted_at_ms: int | None = None


def read_wav(path: str | Path) -> np.ndarray:
    """Mono float32 at 24 kHz from a PCM16 wav (resampled with torchaudio when needed)."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM wav files are supported")
        rate, channels = w.getframerate(), w.getnchannels()
        x = pcm16_to_float(w.readframes(w.getnframes()))
    if channels > 1:
        x = x.reshape(-1, channels).mean(1)
    if rate != WIRE_RATE:
        import torch
        import torchaudio

        x = torchaudio.functional.resample(torch.from_numpy(x), rate, WIRE_RATE).numpy()
    return x.astype(np.float32)


def write_wav(path: str | Path, x: np.ndarray, rate: int = WIRE_RATE) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(float_to_pcm16(x))


async def converse(
    url: str, text: str, listen: np.ndarray | None = None, api_key: str | None = None,
    chunk_ms: int = 40, timeout: float = 120.0, max_output_tokens: int | None = None,
) -> ConversationResult:
    """Say ``text`` while streaming ``listen`` in real time as the microphone (then silence)."""
    chunk = WIRE_RATE * chunk_ms // 1000
    audio: list[np.ndarray] = []
    names: list[str] = []
    status: str | None = None
    irq_ms: int | None = None
    done = asyncio.Event()
    async with RealtimeClient(url, api_key) as client:
        first = await client.recv(timeout=10)
        if not isinstance(first, dict) or first.get("type") != "session.created":
            raise RuntimeError(f"server refused the session: {first}")
        await client.say(text, max_output_tokens)

        async def mic() -> None:
            start = time.monotonic()
            i = 0
            src = listen if listen is not None else np.zeros(0, dtype=np.float32)
            while not done.is_set():
                piece = src[i * chunk : (i + 1) * chunk]
                if piece.shape[0] < chunk:
                    piece = np.concatenate([piece, np.zeros(chunk - piece.shape[0], dtype=np.float32)])
                await client.append_audio(piece)
                i += 1
                await asyncio.sleep(max(0.0, start + i * chunk_ms / 1000 - time.monotonic()))

        mic_task = asyncio.create_task(mic())
        try:
            async with asyncio.timeout(timeout):
                async for ev in client.events():
                    if isinstance(ev, bytes):
                        if ev[:1] == bytes([BinaryKind.AUDIO]):
                            audio.append(pcm16_to_float(ev[1:]))
                        continue
                    names.append(ev["type"])
                    if ev["type"] in ("response.output_audio.delta", "response.audio.delta"):
                        audio.append(pcm16_to_float(base64.b64decode(ev["delta"])))
                    elif ev["type"] == "input_audio_buffer.speech_started" and status is None and audio:
                        irq_ms = sum(a.shape[0] for a in audio) * 1000 // WIRE_RATE
                    elif ev["type"] == "error":
                        raise RuntimeError(f"server error: {ev['error']}")
                    elif ev["type"] == "response.done":
                        status = ev["response"]["status"]
                        break
        finally:
            done.set()
            mic_task.cancel()
    out = np.concatenate(audio) if audio else np.zeros(0, dtype=np.float32)
    return ConversationResult(out, status, names, irq_ms)
