"""What the voice says: the conversation → the text of the next spoken response.

The speaking channel (the LSLM) turns text into speech while it listens; a responder decides that
text. ``EchoResponder`` speaks the latest user text (or the response's instructions) and is the
default until a dialogue LM is plugged in behind the same interface.
"""

from __future__ import annotations

from typing import Any, Protocol


class Responder(Protocol):
    name: str

    def reply(self, items: list[dict[str, Any]], instructions: str) -> str: ...


class EchoResponder:
    """Says back the newest user text item; with none, says the instructions."""

    name = "echo"

    def reply(self, items: list[dict[str, Any]], instructions: str) -> str:
        for item in reversed(items):
            if item.get("role") == "user":
                text = " ".join(p.get("text", "") for p in item.get("content", []) if p.get("text"))
                if text.strip():
                    return text.strip()
        return instructions.strip()
