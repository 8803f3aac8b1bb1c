"""One realtime voice session: a websocket, its protocol state, and its place in the engine.

The session validates what the client sends (every mistake becomes an ``error`` event with a code and
the session goes on), streams microphone audio to the engine continuously (full duplex: also while
it speaks), and turns the engine's per-frame results into server events. Outgoing events go through a
bounded queue: a client that stops reading is closed cleanly instead of growing memory.

With a ``Dialogue`` (realtime.dialogue) the session also hears the user: each voice turn is transcribed
and answered, and every response's text is streamed from the responder and spoken sentence by sentence
(realtime.session_dialogue).
Without one, the responder's text is spoken at once (the echo default of tests and ``create_app``).

The server may end a session itself (``_shut``): at ``max_session_seconds`` (``session_expired``, close
1000) or when it drains before shutting down (``server_shutting_down``, close 1001, after the response
in flight; realtime.drain). With a record store, each finished response is written durably before its
``response.done`` goes out (realtime.store).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from realtime import protocol as P
from realtime.audio import ChunkResampler, EnergyVAD, float_to_pcm16, pcm16_to_float
from realtime.auth import ANONYMOUS, Principal
from realtime.config import Settings
from realtime.dialogue import Dialogue, TurnAudio
from realtime.engine import Engine, SessionHandle
from realtime.metrics import Metrics
from realtime.protocol import BinaryKind, CloseCode, ErrorCode, ProtocolError
from realtime.responder import Responder, item_text
from realtime.session_dialogue import WIRE_RATE, DialogueTurns
from realtime.store import RecordStore, SessionLog

if TYPE_CHECKING:
    from realtime.drain import Drain

log = logging.getLogger(__name__)

STORE_WAIT_S = 5.0  # response.done waits this long for its record to be durable, then goes out anyway


@dataclass
class Response:
    id: str
    item_id: str
    text: str
    audio_samples: int = 0  # at the wire rate, sent so far
    max_frames: int | None = None
    # A streamed response (with a Dialogue) is spoken as several texts, one engine.speak each.
    pending: deque[str] = field(default_factory=deque)  # written, not yet spoken
    speaking: bool = False  # a text is with the engine
    generating: bool = False  # the responder is still writing
    stopping: str | None = None  # the status to end with once the engine confirms (e.g. "cancelled")
    stop: threading.Event = field(default_factory=threading.Event)  # tells the responder to stop writing
    created_at: float = field(default_factory=time.time)


@dataclass
class SessionState:
    instructions: str = ""
    voice: str = "default"
    turn_detection: P.TurnDetection | None = field(default_factory=P.TurnDetection)
    binary_audio: bool = False


class TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.last = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class RealtimeSession(DialogueTurns):
    def __init__(
        self, ws: WebSocket, engine: Engine, settings: Settings, metrics: Metrics, responder: Responder,
        beta: bool, model_name: str, dialogue: Dialogue | None = None, principal: Principal | None = None,
        store: RecordStore | None = None, drain: Drain | None = None,
    ) -> None:
        self.ws, self.engine, self.settings, self.metrics = ws, engine, settings, metrics
        self.responder = responder
        self.beta = beta
        self.model_name = model_name
        self.id = P.new_id("sess")
        self.state = SessionState()
        self.items: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        self.response: Response | None = None
        self.handle: SessionHandle | None = None
        self._out: asyncio.Queue = asyncio.Queue(maxsize=settings.send_queue_max)
        self._closing: tuple[int, str] | None = None
        self._bucket = TokenBucket(settings.events_per_second, settings.event_burst)
        self._last_rate_error = 0.0
        self._errors: deque[float] = deque()
        self._in_resampler = ChunkResampler(WIRE_RATE, engine.model.sample_rate)
        self._vad = EnergyVAD()
        self._input_samples = 0  # wire-rate samples received
        self._speech_item: str | None = None
        self._sender: asyncio.Task | None = None
        self._receiver: asyncio.Task | None = None
        self.dialogue = dialogue
        self._turn: TurnAudio | None = None
        if dialogue is not None and dialogue.hears_turns:
            self._turn = TurnAudio(WIRE_RATE, self.state.turn_detection.prefix_padding_ms, dialogue.cfg.max_turn_s)
        self._tasks: set[asyncio.Task] = set()  # transcriptions and streamed answers in flight
        self.principal = principal or Principal(ANONYMOUS)
        self.store, self.drain = store, drain
        self.log: SessionLog | None = None  # the durable record (realtime.store), when the server keeps one
        self._draining = False  # close once the response in flight is done
        self._shutting = False
        self._end_reason = "client_closed"
        self._expiry: asyncio.TimerHandle | None = None
        self._pending_turns = 0  # voice turns waiting for speech recognition

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        """Accept, admit, then serve until the client leaves or is closed."""
        await self.ws.accept(subprotocol=self._subprotocol())
        loop = asyncio.get_running_loop()
        self.handle = self.engine.open(self, loop)
        if self.handle is None:
            self.metrics.refusals.labels("capacity").inc()
            msg = f"the server is at capacity ({self.engine.cfg.capacity} voice sessions); try again later"
            await self.ws.send_json(P.error_event(ProtocolError(ErrorCode.SESSION_LIMIT, msg)))
            await self.ws.close(CloseCode.TRY_AGAIN_LATER, "at capacity")
            return
        self.metrics.sessions_total.inc()
        self.metrics.sessions_active.inc()
        log.info("session %s opened (key %s)", self.id, self.principal.key_hash)
        if self.store is not None:
            self.log = SessionLog(self.store, self.id, self.principal.key_hash)
        if self.settings.max_session_seconds > 0:
            self._expiry = loop.call_later(self.settings.max_session_seconds, self._expire)
        self._sender = asyncio.create_task(self._send_loop())
        self._receiver = asyncio.create_task(self._receive_loop())
        try:
            self._send(P.server_event("session.created", session=self._session_object()))
            if self.drain is not None:
                self.drain.add(self)  # may close at once: the server began draining
            try:
                await self._receiver
            except asyncio.CancelledError:
                if self._closing is None:  # cancelled from outside (server shutdown): propagate
                    raise
        finally:
            if self.drain is not None:
                self.drain.discard(self)
            if self._expiry is not None:
                self._expiry.cancel()
            self._receiver.cancel()
            for task in list(self._tasks):
                task.cancel()
            if self.response is not None:
                self.response.stop.set()
            self.engine.close(self.handle)
            self.metrics.sessions_active.dec()
            if self.log is not None:
                self.log.end(self._input_samples / WIRE_RATE, self._end_reason)
            log.info("session %s closed (%s)", self.id, self._end_reason)
            if self._closing is None:
                self._closing = (CloseCode.NORMAL, "")
            await self._put_sentinel()
            try:
                await asyncio.wait_for(self._sender, timeout=5.0)
            except (TimeoutError, asyncio.CancelledError, Exception):
                self._sender.cancel()

    def _subprotocol(self) -> str | None:
        offered = self.ws.scope.get("subprotocols") or []
        return "realtime" if "realtime" in offered else None

    async def _receive_loop(self) -> None:
        while self._closing is None:
            try:
                msg = await self.ws.receive()
            except WebSocketDisconnect:
                return
            except RuntimeError:  # socket already closed by the sender side
                return
            if msg["type"] == "websocket.disconnect":
                return
            try:
                if msg.get("text") is not None:
                    self._handle_text(msg["text"])
                elif msg.get("bytes") is not None:
                    self._handle_binary(msg["bytes"])
            except ProtocolError as err:
                self._error(err)
            except Exception as e:  # a bug must cost this event, not the session
                log.exception("session %s: unexpected error", self.id)
                self._error(ProtocolError(ErrorCode.SERVER_ERROR, f"internal error: {type(e).__name__}"))

    async def _send_loop(self) -> None:
        ws = self.ws
        try:
            while True:
                item = await self._out.get()
                if item is None:
                    break
                if isinstance(item, asyncio.Future):
                    await self._barrier(item)
                elif isinstance(item, bytes):
                    await ws.send_bytes(item)
                else:
                    await ws.send_json(item)
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass
        finally:
            code, reason = self._closing or (CloseCode.NORMAL, "")
            if ws.application_state == WebSocketState.CONNECTED:
                try:
                    await asyncio.wait_for(ws.close(code, reason), timeout=2.0)
                except Exception:
                    pass

    async def _barrier(self, fut: asyncio.Future) -> None:
        """Hold what follows (``response.done``) until the response's record is committed."""
        try:
            await asyncio.wait_for(asyncio.shield(fut), STORE_WAIT_S)
        except TimeoutError:
            self.metrics.store_errors.labels("late").inc()
            log.warning("session %s: the record store is slow; response.done sent before its record", self.id)
        except Exception:
            pass  # failed or dropped: counted and logged by the store; the client is not held up

    async def _put_sentinel(self) -> None:
        while True:
            try:
                self._out.put_nowait(None)
                return
            except asyncio.QueueFull:
                self._out.get_nowait()  # closing anyway: drop the oldest unsent event

    def _send(self, event: dict | bytes | asyncio.Future) -> None:
        if self._closing is not None:
            return
        if isinstance(event, dict) and self.beta:
            event["type"] = P.BETA_NAMES.get(event["type"], event["type"])
        try:
            self._out.put_nowait(event)
        except asyncio.QueueFull:
            # The client stopped reading: its sender is stuck on the socket. Free everything now; the
            # transport is closed when the app returns. Memory stays bounded by send_queue_max.
            self.metrics.refusals.labels("slow_consumer").inc()
            self._end_reason = "slow_consumer"
            log.warning("session %s: client is not reading; dropping it", self.id)
            self._closing = (CloseCode.TRY_AGAIN_LATER, "send buffer full: the client is not reading")
            for task in (self._sender, self._receiver):
                if task is not None:
                    task.cancel()

    def _close_soon(self, code: int, reason: str) -> None:
        if self._closing is None:
            self._closing = (code, reason)
            # wake the receive loop: the sender closes the socket once its queue drains
            asyncio.get_running_loop().create_task(self._put_sentinel())

    def _error(self, err: ProtocolError) -> None:
        self.metrics.errors.labels(err.code.value).inc()
        self._send(P.error_event(err))
        now = time.monotonic()
        self._errors.append(now)
        while self._errors and now - self._errors[0] > 60:
            self._errors.popleft()
        if len(self._errors) > self.settings.max_errors_per_minute:
            if self._closing is None:
                self._end_reason = "too_many_errors"
            self._close_soon(CloseCode.POLICY, "too many invalid events")

    # ------------------------------------------------------------------ ended by the server
    def _shut(self, code: ErrorCode, message: str, close_code: int, close_reason: str) -> None:
        """End the session from our side: stop the response in flight, say why (an ``error``), close."""
        if self._shutting or self._closing is not None:
            return
        self._shutting = True
        self._end_reason = code.value
        self.metrics.sessions_closed.labels(code.value).inc()
        r = self.response
        if r is not None:
            if r.speaking:
                self.engine.cancel(self.handle, r.id)
            self._finish_response("cancelled", code.value)
        self._error(ProtocolError(code, message))
        self._close_soon(close_code, close_reason)

    def _expire(self) -> None:
        limit = self.settings.max_session_seconds
        self._shut(ErrorCode.SESSION_EXPIRED, f"the session reached its limit of {limit:g} s; open a new session",
                   CloseCode.NORMAL, "session time limit")

    def begin_drain(self) -> None:
        """The server is shutting down: finish the response in flight (if any), then close with 1001."""
        self._draining = True
        if self.response is None:
            self.force_close()

    def force_close(self) -> None:
        self._shut(ErrorCode.SERVER_SHUTTING_DOWN, "the server is shutting down; reconnect to go on",
                   CloseCode.GOING_AWAY, "server shutting down")

    # ------------------------------------------------------------------ client → server
    def _handle_text(self, text: str) -> None:
        if not self._bucket.take():
            self._rate_limited()
            return
        event = P.parse_client_event(text)
        getattr(self, "_on_" + event.type.replace(".", "_"))(event)

    def _handle_binary(self, data: bytes) -> None:
        if not self._bucket.take():
            self._rate_limited()
            return
        if not data:
            raise ProtocolError(ErrorCode.INVALID_EVENT, "empty binary message")
        kind = data[0]
        if kind != BinaryKind.AUDIO:
            raise ProtocolError(ErrorCode.INVALID_EVENT, f"unsupported binary kind {kind}; only 1 (audio) is accepted")
        self._ingest_audio(data[1:], None)

    def _rate_limited(self) -> None:
        now = time.monotonic()
        self.metrics.errors.labels(ErrorCode.RATE_LIMITED.value).inc()
        if now - self._last_rate_error >= 1.0:  # one error per second, not one per dropped event
            self._last_rate_error = now
            self._send(P.error_event(ProtocolError(
                ErrorCode.RATE_LIMITED,
                f"too many events: at most {self.settings.events_per_second:g}/s (burst {self.settings.event_burst});"
                " events beyond that are dropped",
            )))

    def _on_session_update(self, ev: P.SessionUpdate) -> None:
        s = ev.session
        if s.instructions is not None:
            if len(s.instructions) > self.settings.max_text_chars:
                raise ProtocolError(ErrorCode.TEXT_TOO_LONG, "instructions are too long", ev.event_id, "session.instructions")
            self.state.instructions = s.instructions
        if s.voice is not None:
            self.state.voice = s.voice
        td_set = "turn_detection" in s.model_fields_set
        td = s.turn_detection
        if s.audio is not None and s.audio.input is not None and "turn_detection" in s.audio.input.model_fields_set:
            td_set, td = True, s.audio.input.turn_detection
        if s.audio is not None and s.audio.output is not None and s.audio.output.voice:
            self.state.voice = s.audio.output.voice
        if td_set:
            self.state.turn_detection = td
            if td is not None:
                self._vad = EnergyVAD(td.threshold, td.silence_duration_ms)
                if self._turn is not None:
                    self._turn.set_prefix(td.prefix_padding_ms)
        if s.binary_audio is not None:
            self.state.binary_audio = s.binary_audio
        self._send(P.server_event("session.updated", session=self._session_object()))

    def _on_input_audio_buffer_append(self, ev: P.InputAudioBufferAppend) -> None:
        limit_b64 = (self.settings.max_audio_bytes * 4) // 3 + 4
        if len(ev.audio) > limit_b64:
            raise ProtocolError(
                ErrorCode.AUDIO_TOO_LARGE,
                f"audio chunk is over {self.settings.max_audio_bytes} bytes; send smaller chunks (20-100 ms)",
                ev.event_id, "audio",
            )
        try:
            pcm = base64.b64decode(ev.audio, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError(ErrorCode.INVALID_AUDIO, "audio is not valid base64", ev.event_id, "audio") from None
        self._ingest_audio(pcm, ev.event_id)

    def _ingest_audio(self, pcm: bytes, event_id: str | None) -> None:
        if len(pcm) > self.settings.max_audio_bytes:
            raise ProtocolError(
                ErrorCode.AUDIO_TOO_LARGE,
                f"audio chunk is over {self.settings.max_audio_bytes} bytes; send smaller chunks (20-100 ms)",
                event_id, "audio",
            )
        try:
            x = pcm16_to_float(pcm)
        except ProtocolError as e:
            e.event_id = event_id
            raise
        self._input_samples += x.shape[0]
        self.engine.push_audio(self.handle, self._in_resampler(x))
        if self.response is None and self.state.turn_detection is not None:
            turn = self._vad.update(x, 1000.0 * x.shape[0] / WIRE_RATE)
            if self._turn is not None:
                self._turn.feed(x)
            if turn == "started":
                self._speech_item = P.new_id("item")
                self._send(P.server_event(
                    "input_audio_buffer.speech_started", audio_start_ms=self._input_ms(), item_id=self._speech_item
                ))
                if self._turn is not None:
                    self._turn.start()
            elif turn == "stopped":
                self._send(P.server_event(
                    "input_audio_buffer.speech_stopped", audio_end_ms=self._input_ms(), item_id=self._speech_item
                ))
                if self._turn is not None and self._turn.recording:
                    self._voice_turn(self._speech_item, self._turn.take())

    def _input_ms(self) -> int:
        return self._input_samples * 1000 // WIRE_RATE

    def _on_input_audio_buffer_clear(self, ev: P.InputAudioBufferClear) -> None:
        self.engine.clear_audio(self.handle)
        self._in_resampler.reset()
        self._send(P.server_event("input_audio_buffer.cleared"))

    def _on_input_audio_buffer_commit(self, ev: P.InputAudioBufferCommit) -> None:
        item_id = self._speech_item or P.new_id("item")
        self._speech_item = None
        self._send(P.server_event("input_audio_buffer.committed", item_id=item_id, previous_item_id=self._last_item()))

    def _on_conversation_item_create(self, ev: P.ConversationItemCreate) -> None:
        text = "".join(p.text or "" for p in ev.item.content)
        if len(text) > self.settings.max_text_chars:
            raise ProtocolError(
                ErrorCode.TEXT_TOO_LONG, f"item text is {len(text)} characters; the limit is {self.settings.max_text_chars}",
                ev.event_id, "item.content",
            )
        item_id = ev.item.id or P.new_id("item")
        if item_id in self.items:
            raise ProtocolError(ErrorCode.INVALID_EVENT, f"item id {item_id!r} already exists", ev.event_id, "item.id")
        item = {
            "id": item_id, "object": "realtime.item", "type": "message", "status": "completed",
            "role": ev.item.role, "content": [p.model_dump(exclude_none=True) for p in ev.item.content],
        }
        previous = self._last_item()
        self._publish_item(item, previous)

    def _on_response_create(self, ev: P.ResponseCreate) -> None:
        if self.response is not None:
            raise ProtocolError(
                ErrorCode.RESPONSE_ALREADY_ACTIVE, f"response {self.response.id} is still in progress; cancel it first",
                ev.event_id,
            )
        params = ev.response or P.ResponseParams()
        if params.instructions and len(params.instructions) > self.settings.max_text_chars:
            raise ProtocolError(ErrorCode.TEXT_TOO_LONG, f"instructions are over {self.settings.max_text_chars} characters",
                                ev.event_id, "response.instructions")
        instructions = params.instructions or self.state.instructions
        max_frames = params.max_output_tokens if isinstance(params.max_output_tokens, int) else None
        if max_frames is not None and max_frames < 1:
            raise ProtocolError(ErrorCode.INVALID_EVENT, "max_output_tokens must be >= 1", ev.event_id, "response.max_output_tokens")
        if self.dialogue is not None:
            if not instructions.strip() and not any(item_text(self.items[i]) for i in self.order):
                raise ProtocolError(
                    ErrorCode.NOTHING_TO_SAY,
                    "nothing to say: add a user item (text or speech) or give response.instructions", ev.event_id,
                )
            self._start_streamed_response(instructions, max_frames)
            return
        text = self.responder.reply([self.items[i] for i in self.order], instructions)
        if not text:
            raise ProtocolError(
                ErrorCode.NOTHING_TO_SAY,
                "nothing to say: add a user text item (conversation.item.create) or give response.instructions",
                ev.event_id,
            )
        if len(text) > self.settings.max_text_chars:
            raise ProtocolError(ErrorCode.TEXT_TOO_LONG, "the response text is too long", ev.event_id)
        r = self._open_response(text, max_frames)
        self._send(P.server_event(
            "response.output_audio_transcript.delta", response_id=r.id, item_id=r.item_id, output_index=0,
            content_index=0, delta=text,
        ))
        r.speaking = True
        self.engine.speak(self.handle, r.id, text, max_frames)

    def _open_response(self, text: str, max_frames: int | None) -> Response:
        rid, item_id = P.new_id("resp"), P.new_id("item")
        self.response = r = Response(rid, item_id, text, max_frames=max_frames)
        if self._turn is not None:
            self._turn.take()  # the detector pauses while a response runs: its pre-roll would go stale
        item = {"id": item_id, "object": "realtime.item", "type": "message", "status": "in_progress",
                "role": "assistant", "content": [{"type": "output_audio", "transcript": text}]}
        self._add_item(item)
        self._send(P.server_event("response.created", response=self._response_object("in_progress")))
        self._send(P.server_event("response.output_item.added", response_id=rid, output_index=0, item=item))
        return r

    def _on_response_cancel(self, ev: P.ResponseCancel) -> None:
        if self.response is None or (ev.response_id and ev.response_id != self.response.id):
            raise ProtocolError(ErrorCode.NO_ACTIVE_RESPONSE, "there is no active response to cancel", ev.event_id)
        self._cancel_response()

    def _cancel_response(self) -> None:
        r = self.response
        r.stop.set()
        if r.speaking:  # the engine confirms with a "done" event
            r.stopping = "cancelled"
            self.engine.cancel(self.handle, r.id)
        else:  # between two sentences, or still waiting for the first: nothing is with the engine
            self._finish_response("cancelled", None)

    def _on_conversation_item_truncate(self, ev: P.ConversationItemTruncate) -> None:
        item = self.items.get(ev.item_id)
        if item is None:
            raise ProtocolError(ErrorCode.ITEM_NOT_FOUND, f"no item {ev.item_id!r} in this conversation", ev.event_id, "item_id")
        if item["role"] != "assistant":
            raise ProtocolError(ErrorCode.INVALID_EVENT, "only assistant audio items can be truncated", ev.event_id, "item_id")
        running = self.response is not None and self.response.item_id == ev.item_id
        sent_ms = self.response.audio_samples * 1000 // WIRE_RATE if running else item.get("audio_ms", 0)
        if ev.audio_end_ms > sent_ms:  # validate before touching anything
            raise ProtocolError(
                ErrorCode.INVALID_EVENT, f"audio_end_ms {ev.audio_end_ms} is past the {sent_ms} ms of audio sent",
                ev.event_id, "audio_end_ms",
            )
        if running:
            self._cancel_response()
        item["audio_ms"] = ev.audio_end_ms
        item["truncated"] = True
        if self.log is not None:
            self.log.item_changed(item)
        self._send(P.server_event(
            "conversation.item.truncated", item_id=ev.item_id, content_index=ev.content_index,
            audio_end_ms=ev.audio_end_ms,
        ))

    # ------------------------------------------------------------------ engine → client (on the loop)
    def on_engine_event(self, kind: str, response_id: str | None, payload: Any) -> None:
        r = self.response
        if kind == "fatal":
            self._error(ProtocolError(ErrorCode.SERVER_ERROR, str(payload)))
            self._close_soon(CloseCode.INTERNAL, "engine failure")
            return
        if kind == "error":
            self._error(ProtocolError(ErrorCode.SERVER_ERROR, str(payload)))
            return
        if r is None or r.id != response_id:
            return  # a late frame of a response that already ended: never sent
        if kind == "audio":
            pcm = float_to_pcm16(payload)
            r.audio_samples += payload.shape[0]
            if self.state.binary_audio:
                self._send(P.binary_frame(BinaryKind.AUDIO, pcm))
            else:
                self._send(P.audio_delta_event(r.id, r.item_id, base64.b64encode(pcm).decode("ascii")))
        elif kind == "irq":
            # the model heard the user barge in: tell the client to drop what it buffered
            self._speech_item = P.new_id("item")
            self._send(P.server_event(
                "input_audio_buffer.speech_started", audio_start_ms=self._input_ms(), item_id=self._speech_item
            ))
        elif kind == "done":
            status, reason = payload
            r.speaking = False
            if status == "completed" and r.stopping is None and (r.pending or r.generating):
                self._speak_next(r)  # one sentence spoken; the answer goes on
                return
            self._finish_response(r.stopping or status, reason)

    def _finish_response(self, status: str, reason: str | None) -> None:
        r = self.response
        self.response = None
        r.stop.set()  # the responder stops writing (after an IRQ, a cancel, a failure)
        self.metrics.responses.labels(status).inc()  # here, not in the engine: a response may be several texts
        item = self.items[r.item_id]
        item["status"] = "completed" if status == "completed" else "incomplete"
        item["content"][0]["transcript"] = r.text
        item["audio_ms"] = r.audio_samples * 1000 // WIRE_RATE
        common = {"response_id": r.id, "item_id": r.item_id, "output_index": 0, "content_index": 0}
        self._send(P.server_event("response.output_audio.done", **common))
        self._send(P.server_event("response.output_audio_transcript.done", transcript=r.text, **common))
        self._send(P.server_event("response.output_item.done", response_id=r.id, output_index=0, item=item))
        details = None
        if status != "completed":
            why = {"interrupted": "turn_detected", "cancelled": "client_cancelled", "incomplete": "max_output_tokens"}
            details = {"type": status, "reason": reason or why.get(status, status)}
        if self.log is not None:  # response.done waits (in the send loop) until this record is on disk
            self.log.item_changed(item)
            self._send(asyncio.wrap_future(self.log.response_done(
                r.id, r.item_id, status, details and details["reason"], r.created_at, item["audio_ms"],
                self._input_samples / WIRE_RATE,
            )))
        self._send(P.server_event("response.done", response=self._response_object(status, r, details)))
        if self._draining:
            self.force_close()

    # ------------------------------------------------------------------ the dialogue (voice turns, streamed answers)
    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ helpers
    def _add_item(self, item: dict) -> None:
        self.items[item["id"]] = item
        self.order.append(item["id"])
        if self.log is not None:
            self.log.item_changed(item)
        if len(self.order) > 1000:  # bounded history
            del self.items[self.order.pop(0)]

    def _publish_item(self, item: dict, previous: str | None) -> None:
        """Add a completed item to the conversation and tell the client, in the GA or the beta shape."""
        self._add_item(item)
        if self.beta:
            self._send(P.server_event("conversation.item.created", previous_item_id=previous, item=item))
        else:
            self._send(P.server_event("conversation.item.added", previous_item_id=previous, item=item))
            self._send(P.server_event("conversation.item.done", previous_item_id=previous, item=item))

    def _last_item(self) -> str | None:
        return self.order[-1] if self.order else None

    def _response_object(self, status: str, r: Response | None = None, details: dict | None = None) -> dict:
        r = r or self.response
        out: dict[str, Any] = {
            "id": r.id, "object": "realtime.response", "status": status, "status_details": details,
            "output": [self.items[r.item_id]] if r.item_id in self.items else [],
            "conversation_id": self.id,
        }
        if self.beta:
            out["modalities"] = ["audio", "text"]
        else:
            out["output_modalities"] = ["audio"]
            out["audio_duration_ms"] = r.audio_samples * 1000 // WIRE_RATE
        return out

    def _session_object(self) -> dict:
        td = self.state.turn_detection.model_dump() if self.state.turn_detection else None
        common = {
            "id": self.id, "object": "realtime.session", "model": self.model_name,
            "instructions": self.state.instructions, "binary_audio": self.state.binary_audio,
        }
        if self.beta:
            return {**common, "modalities": ["audio", "text"], "voice": self.state.voice,
                    "input_audio_format": "pcm16", "output_audio_format": "pcm16", "turn_detection": td}
        fmt = {"type": "audio/pcm", "rate": WIRE_RATE}
        return {**common, "type": "realtime", "output_modalities": ["audio"],
                "audio": {"input": {"format": fmt, "turn_detection": td},
                          "output": {"format": fmt, "voice": self.state.voice}}}
