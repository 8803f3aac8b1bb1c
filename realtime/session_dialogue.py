"""The dialogue half of a realtime session: voice turns transcribed and answered, answers streamed and spoken.

A mixin of :class:`realtime.session.RealtimeSession`, kept apart because it is the one part that runs
background tasks (speech recognition, the responder's stream) against the session's state; everything
it touches (``items``, ``response``, ``engine``, ``_send``, ...) belongs to the session.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any

from realtime import protocol as P
from realtime.dialogue import SpeechChunker
from realtime.protocol import ErrorCode, ProtocolError

log = logging.getLogger("realtime.session")

WIRE_RATE = 24000
MAX_CONTEXT_ITEMS = 64  # conversation items handed to the responder per answer


class DialogueTurns:
    """Voice turn → committed user item → transcript → streamed answer → sentences queued to the voice."""

    # (attributes and the methods _send, _error, _spawn, _publish_item, _last_item, _open_response and
    # _finish_response are the session's)
    response: Any
    items: dict[str, dict]
    order: list[str]

    def _voice_turn(self, item_id: str, audio: Any) -> None:
        """A user turn ended: commit it as a user item now, transcribe (and answer) it in the background."""
        if audio.shape[0] < self.dialogue.cfg.min_turn_s * WIRE_RATE:
            return
        if self._pending_turns >= self.settings.max_pending_turns:  # bounded queue of the one ASR worker
            self._error(ProtocolError(
                ErrorCode.RATE_LIMITED, f"{self.settings.max_pending_turns} voice turns are already waiting for "
                "speech recognition; this turn was dropped (pause between turns)",
            ))
            return
        previous = self._last_item()
        self._send(P.server_event("input_audio_buffer.committed", item_id=item_id, previous_item_id=previous))
        item = {"id": item_id, "object": "realtime.item", "type": "message", "status": "completed",
                "role": "user", "content": [{"type": "input_audio", "transcript": None}]}
        self._publish_item(item, previous)
        self._pending_turns += 1  # back down when its transcription ends
        self._spawn(self._transcribe_and_answer(item, audio))

    async def _transcribe_and_answer(self, item: dict, audio: Any) -> None:
        common = {"item_id": item["id"], "content_index": 0}
        try:
            text = await self.dialogue.transcribe(audio, WIRE_RATE)
        except Exception as e:
            log.exception("session %s: transcription failed", self.id)
            self._send(P.server_event(
                "conversation.item.input_audio_transcription.failed", **common,
                error={"type": "server_error", "code": ErrorCode.SERVER_ERROR.value,
                       "message": f"transcription failed: {type(e).__name__}"},
            ))
            return
        finally:
            self._pending_turns -= 1
        item["content"][0]["transcript"] = text
        if self.log is not None:
            self.log.item_changed(item)
        self._send(P.server_event("conversation.item.input_audio_transcription.completed", transcript=text, **common))
        td = self.state.turn_detection
        # answer unless told not to, already answering, or the user has started speaking again
        if (text and td is not None and td.create_response and self.response is None and not self._vad.active
                and self._closing is None and not self._draining):
            self._start_streamed_response(self.state.instructions, None)

    def _start_streamed_response(self, instructions: str, max_frames: int | None) -> None:
        r = self._open_response("", max_frames)
        r.generating = True
        # a copy of the newest items (the chat LM keeps what fits its prompt): the worker thread reads it
        items = copy.deepcopy([self.items[i] for i in self.order[-MAX_CONTEXT_ITEMS - 1 : -1]])
        self._spawn(self._write_answer(r, items, instructions))

    async def _write_answer(self, r: Any, items: list[dict], instructions: str) -> None:
        """Stream the responder's text: each piece goes out as a transcript delta, each sentence to the voice."""
        chunker = SpeechChunker(min(self.engine.model.max_text_chars, self.settings.max_text_chars))
        common = {"response_id": r.id, "item_id": r.item_id, "output_index": 0, "content_index": 0}
        failure = None
        try:
            async with contextlib.aclosing(self.dialogue.stream(items, instructions, r.stop)) as pieces:
                async for piece in pieces:
                    if self.response is not r:
                        break
                    r.text += piece
                    self._send(P.server_event("response.output_audio_transcript.delta", delta=piece, **common))
                    for text in chunker.push(piece):
                        self._queue_speech(r, text)
            if self.response is r:
                for text in chunker.flush():
                    self._queue_speech(r, text)
        except Exception as e:
            log.exception("session %s: the responder failed", self.id)
            failure = f"the responder failed: {type(e).__name__}"
        finally:
            r.generating = False
        if self.response is not r or r.speaking or r.pending:
            return  # ended already, or the voice finishes the last sentences and then ends it
        if failure is None and not r.text.strip():
            failure = "the responder gave no answer"
        self._finish_response("failed" if failure else "completed", failure)

    def _queue_speech(self, r: Any, text: str) -> None:
        r.pending.append(text)
        if not r.speaking:
            self._speak_next(r)

    def _speak_next(self, r: Any) -> None:
        """Hand the next written sentence to the engine, within what is left of ``max_output_tokens``."""
        if not r.pending:
            return  # the responder is still writing it
        left = None
        if r.max_frames is not None:
            left = r.max_frames - r.audio_samples // self.engine.wire_frame
            if left <= 0:
                self._finish_response("incomplete", None)
                return
        r.speaking = True
        self.engine.speak(self.handle, r.id, r.pending.popleft(), left)
