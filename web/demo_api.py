"""What the Gradio demo asks the server, through its public API only: HTTP for chat, websocket for voice.

``/v1/models`` and ``/v1/chat/completions`` (server-sent events) with ``httpx``; ``/v1/realtime`` with the
project's client SDK (``realtime.client.converse``). Every failure becomes an ``ApiError`` whose message
is the server's own (OpenAI's error shape) or says what to do, so the UI never shows a traceback.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

CONNECT_TIMEOUT_S = 10.0
ANSWER_TIMEOUT_S = 300.0  # a long answer on a busy CPU; the stream itself shows progress


class ApiError(Exception):
    """A refused or failed call: HTTP status (0: no answer), the server's error code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def __str__(self) -> str:
        where = f"HTTP {self.status}" if self.status else "no answer"
        return f"{self.message} ({where}, {self.code})"


@dataclass
class Answer:
    """A chat answer as it streams: the text so far; ``usage`` and ``finish_reason`` once it ends."""

    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key.strip()}"} if api_key and api_key.strip() else {}


def _error_of(status: int, body: bytes) -> ApiError:
    """OpenAI's ``{"error": {message, code}}``, FastAPI's ``{"detail": ...}``, or the raw text."""
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        err = doc["error"]
        return ApiError(status, str(err.get("code") or err.get("type") or "error"), str(err.get("message", "")))
    if isinstance(doc, dict) and "detail" in doc:
        return ApiError(status, "not_found" if status == 404 else "error", str(doc["detail"]))
    return ApiError(status, "error", body.decode("utf-8", "replace")[:300] or f"HTTP {status}")


def _client(base_url: str, api_key: str | None, read_timeout: float) -> httpx.AsyncClient:
    timeout = httpx.Timeout(read_timeout, connect=CONNECT_TIMEOUT_S)
    return httpx.AsyncClient(base_url=base_url, headers=_headers(api_key), timeout=timeout, trust_env=False)


async def list_models(base_url: str, api_key: str | None) -> list[dict[str, Any]]:
    """``GET /v1/models``: the base model first, then every adapter."""
    try:
        async with _client(base_url, api_key, 30.0) as http:
            r = await http.get("/v1/models")
    except httpx.HTTPError as e:
        raise ApiError(0, "unreachable", f"cannot reach the server at {base_url}: {e}") from None
    if r.status_code != 200:
        raise _error_of(r.status_code, r.content)
    return list(r.json().get("data", []))


async def stream_chat(base_url: str, api_key: str | None, model: str, content: list[dict[str, Any]],
                      max_tokens: int, temperature: float = 0.0) -> AsyncIterator[Answer]:
    """``POST /v1/chat/completions`` with ``stream: true``; yields the growing answer after every chunk."""
    body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": True,
            "max_tokens": int(max_tokens), "temperature": float(temperature),
            "stream_options": {"include_usage": True}}
    answer = Answer()
    try:
        async with _client(base_url, api_key, ANSWER_TIMEOUT_S) as http, \
                http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise _error_of(r.status_code, await r.aread())
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if isinstance(chunk.get("error"), dict):  # the model failed mid-answer
                    raise _error_of(500, data.encode())
                if chunk.get("usage"):
                    answer.usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    answer.text += (choice.get("delta") or {}).get("content") or ""
                    answer.finish_reason = choice.get("finish_reason") or answer.finish_reason
                yield answer
    except httpx.HTTPError as e:
        raise ApiError(0, "unreachable", f"the connection to {base_url} failed: {e}") from None


async def frame_ms(base_url: str, api_key: str | None) -> float:
    """The voice model's frame period (``/v1/engine/stats``), to turn seconds into ``max_output_tokens``."""
    try:
        async with _client(base_url, api_key, 10.0) as http:
            r = await http.get("/v1/engine/stats")
        if r.status_code == 200:
            return float(r.json().get("frame_ms") or 40.0)
    except (httpx.HTTPError, ValueError):
        pass
    return 40.0  # the refusal, if any, comes again (and is shown) on the websocket


@dataclass
class Spoken:
    audio: np.ndarray  # float32, 24 kHz
    status: str | None  # completed | incomplete | interrupted | cancelled
    interrupted_at_ms: int | None


async def speak(ws_url: str, api_key: str | None, text: str, listen: np.ndarray | None, max_frames: int,
                timeout: float = 120.0) -> Spoken:
    """One voice turn over ``/v1/realtime``: the server answers ``text`` by voice while ``listen`` streams in
    real time as the microphone (a barge-in there can interrupt it)."""
    from websockets.exceptions import InvalidStatus, WebSocketException

    from realtime.client import converse

    try:
        r = await converse(ws_url, text, listen, api_key or None, timeout=timeout, max_output_tokens=max_frames)
    except InvalidStatus as e:
        status, body = e.response.status_code, bytes(e.response.body or b"")
        refusal = _error_of(status, body) if body else ApiError(status, "refused", "the server refused the session")
        raise refusal from None
    except TimeoutError:
        raise ApiError(0, "timeout", f"no end of the answer within {timeout:.0f} s") from None
    except (OSError, WebSocketException) as e:
        raise ApiError(0, "unreachable", f"the voice connection failed: {e}") from None
    except RuntimeError as e:  # converse's "server refused the session" / "server error: {...}"
        raise ApiError(0, "refused", str(e)) from None
    return Spoken(r.audio, r.status, r.interrupted_at_ms)
