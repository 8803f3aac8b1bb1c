"""What the voice says: the conversation → the text of the next spoken response.

The speaking channel (the LSLM) turns text into speech while it listens; a responder decides that
text. ``EchoResponder`` speaks the latest user text (or the response's instructions): the default of
``create_app`` and of the tests. ``ChatResponder`` answers with a chat LM (``lm.chat.ChatLM``, SmolLM2 by
default): the default of ``python -m realtime serve``.

``reply`` gives the whole text at once; ``stream`` gives it piece by piece, may take seconds, and is run
by ``realtime.dialogue`` in a worker thread, never on the event loop. ``stop`` asks it to end early.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, Protocol


class Responder(Protocol):
    name: str

    def reply(self, items: list[dict[str, Any]], instructions: str) -> str: ...

    def stream(
        self, items: list[dict[str, Any]], instructions: str, stop: threading.Event | None = None
    ) -> Iterator[str]: ...


def item_text(item: dict[str, Any]) -> str:
    """The words of a conversation item: typed text, or the transcript of its audio."""
    parts = [p.get("text") or p.get("transcript") or "" for p in item.get("content", [])]
    return " ".join(p.strip() for p in parts if p and p.strip())


class EchoResponder:
    """Says back the newest user text item; with none, says the instructions."""

    name = "echo"

    def reply(self, items: list[dict[str, Any]], instructions: str) -> str:
        for item in reversed(items):
            if item.get("role") == "user":
                text = item_text(item)
                if text:
                    return text
        return instructions.strip()

    def stream(
        self, items: list[dict[str, Any]], instructions: str, stop: threading.Event | None = None
    ) -> Iterator[str]:
        text = self.reply(items, instructions)
        if text:
            yield text


class ChatLMLike(Protocol):
    name: str

    def stream(
        self, messages: list[dict[str, str]], instructions: str = "", stop: threading.Event | None = None
    ) -> Iterator[str]: ...


class ChatResponder:
    """Answers the conversation with a chat LM (``lm.chat.ChatLM``): user and assistant items become its turns."""

    def __init__(self, chat: ChatLMLike) -> None:
        self.chat = chat
        self.name = chat.name

    @staticmethod
    def messages(items: list[dict[str, Any]]) -> list[dict[str, str]]:
        out = []
        for item in items:
            text = item_text(item)
            if item.get("role") in ("user", "assistant") and text:
                out.append({"role": item["role"], "content": text})
        return out

    def reply(self, items: list[dict[str, Any]], instructions: str) -> str:
        return "".join(self.stream(items, instructions))

    def stream(
        self, items: list[dict[str, Any]], instructions: str, stop: threading.Event | None = None
    ) -> Iterator[str]:
        messages = self.messages(items)
        if not any(m["role"] == "user" for m in messages):
            if not instructions.strip():
                return
            messages.append({"role": "user", "content": instructions.strip()})  # "say something about X"
            instructions = ""
        yield from self.chat.stream(messages, instructions, stop)
