"""The wire protocol of ``/v1/realtime``: OpenAI-Realtime-shaped JSON events and a binary frame mode.

Client events are validated here, once, with pydantic; everything downstream gets typed objects.
Server events are plain dicts built by the helpers at the bottom (they are many and flat).
See docs/protocol.md for the documentation and an example session.
"""

from __future__ import annotations

import enum
import json
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError


class ErrorCode(enum.StrEnum):
    """Stable codes of every error a client can cause (the ``error.code`` field)."""

    INVALID_JSON = "invalid_json"
    UNKNOWN_EVENT = "unknown_event"
    INVALID_EVENT = "invalid_event"
    INVALID_AUDIO = "invalid_audio"
    AUDIO_TOO_LARGE = "audio_too_large"
    MESSAGE_TOO_LARGE = "message_too_large"
    TEXT_TOO_LONG = "text_too_long"
    RATE_LIMITED = "rate_limited"
    RESPONSE_ALREADY_ACTIVE = "conversation_already_has_active_response"
    NO_ACTIVE_RESPONSE = "response_cancel_not_active"
    NOTHING_TO_SAY = "nothing_to_say"
    ITEM_NOT_FOUND = "item_not_found"
    UNSUPPORTED = "unsupported_value"
    SESSION_LIMIT = "session_limit_reached"
    SESSION_EXPIRED = "session_expired"  # the session reached max_session_seconds
    SERVER_SHUTTING_DOWN = "server_shutting_down"  # the server drains: finish up and reconnect elsewhere
    INVALID_API_KEY = "invalid_api_key"
    KEY_RATE_LIMITED = "key_rate_limited"  # the key's requests per minute
    KEY_SESSION_LIMIT = "key_session_limit_reached"  # the key's concurrent sessions
    SLOW_CONSUMER = "slow_consumer"
    SERVER_ERROR = "server_error"


class BinaryKind(enum.IntEnum):
    """First byte of a binary websocket message (as Moshi does); the rest is the payload."""

    AUDIO = 1  # PCM16 little-endian mono at the session's wire rate
    TEXT = 2  # UTF-8 text (transcript deltas)
    CONTROL = 3  # UTF-8 JSON control event
    ERROR = 5  # UTF-8 error message


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001  # the server is shutting down
    POLICY = 1008  # abuse: flood of errors
    TOO_BIG = 1009
    INTERNAL = 1011
    TRY_AGAIN_LATER = 1013  # at capacity, or a slow reader we had to drop


# ------------------------------------------------------------------ client events
MAX_ID_CHARS = 64  # item, response and voice ids (OpenAI's are 32); longer ones are invalid_event
MAX_EVENT_ID_CHARS = 128  # a longer client event_id is not echoed back


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore")
    event_id: str | None = Field(None, max_length=MAX_EVENT_ID_CHARS)


class TurnDetection(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["server_vad", "semantic_vad"] = "server_vad"
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    silence_duration_ms: int = Field(500, ge=0, le=10_000)
    prefix_padding_ms: int = Field(300, ge=0, le=10_000)
    create_response: bool = True
    interrupt_response: bool = True


class AudioFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["audio/pcm"] = "audio/pcm"
    rate: Literal[24000] = 24000


class AudioInputConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: AudioFormat | None = None
    turn_detection: TurnDetection | None = None


class AudioOutputConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: AudioFormat | None = None
    voice: str | None = Field(None, max_length=MAX_ID_CHARS)


class AudioConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: AudioInputConfig | None = None
    output: AudioOutputConfig | None = None


class SessionConfig(BaseModel):
    """Accepts both the GA shape (``audio.input...``) and the beta shape (``input_audio_format`` ...)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["realtime"] | None = None
    instructions: str | None = None
    voice: str | None = Field(None, max_length=MAX_ID_CHARS)
    output_modalities: list[Literal["audio", "text"]] | None = Field(None, max_length=2)
    modalities: list[Literal["audio", "text"]] | None = Field(None, max_length=2)  # beta name
    audio: AudioConfig | None = None
    input_audio_format: Literal["pcm16"] | None = None  # beta
    output_audio_format: Literal["pcm16"] | None = None  # beta
    turn_detection: TurnDetection | None = None  # beta place
    binary_audio: bool | None = None  # extension: audio deltas as binary frames (BinaryKind.AUDIO)


class SessionUpdate(_Event):
    type: Literal["session.update"]
    session: SessionConfig


class InputAudioBufferAppend(_Event):
    type: Literal["input_audio_buffer.append"]
    audio: str


class InputAudioBufferClear(_Event):
    type: Literal["input_audio_buffer.clear"]


class InputAudioBufferCommit(_Event):
    type: Literal["input_audio_buffer.commit"]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["input_text", "text", "output_text", "input_audio"]
    text: str | None = None


class ConversationItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = Field(None, max_length=MAX_ID_CHARS)
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system"]
    content: list[ContentPart] = Field(min_length=1, max_length=16)


class ConversationItemCreate(_Event):
    type: Literal["conversation.item.create"]
    previous_item_id: str | None = Field(None, max_length=MAX_ID_CHARS)
    item: ConversationItem


class ResponseParams(BaseModel):
    model_config = ConfigDict(extra="ignore")
    instructions: str | None = None
    output_modalities: list[Literal["audio", "text"]] | None = Field(None, max_length=2)
    modalities: list[Literal["audio", "text"]] | None = Field(None, max_length=2)
    max_output_tokens: int | Literal["inf"] | None = None


class ResponseCreate(_Event):
    type: Literal["response.create"]
    response: ResponseParams | None = None


class ResponseCancel(_Event):
    type: Literal["response.cancel"]
    response_id: str | None = Field(None, max_length=MAX_ID_CHARS)


class ConversationItemTruncate(_Event):
    type: Literal["conversation.item.truncate"]
    item_id: str = Field(max_length=MAX_ID_CHARS)
    content_index: int = Field(0, ge=0)
    audio_end_ms: int = Field(ge=0)


ClientEvent = Annotated[
    SessionUpdate
    | InputAudioBufferAppend
    | InputAudioBufferClear
    | InputAudioBufferCommit
    | ConversationItemCreate
    | ResponseCreate
    | ResponseCancel
    | ConversationItemTruncate,
    Field(discriminator="type"),
]
CLIENT_EVENT_TYPES = frozenset(
    {
        "session.update", "input_audio_buffer.append", "input_audio_buffer.clear", "input_audio_buffer.commit",
        "conversation.item.create", "response.create", "response.cancel", "conversation.item.truncate",
    }
)
_client_event = TypeAdapter(ClientEvent)


class ProtocolError(Exception):
    """A client mistake: becomes an ``error`` event; the session goes on."""

    def __init__(self, code: ErrorCode, message: str, event_id: str | None = None, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.event_id, self.param = code, message, event_id, param


def parse_client_event(raw: str | bytes) -> _Event:
    """Text frame → a validated client event, or ``ProtocolError`` with a precise code."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(ErrorCode.INVALID_JSON, f"message is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.INVALID_EVENT, "an event must be a JSON object")
    event_id = data.get("event_id")
    if not isinstance(event_id, str) or len(event_id) > MAX_EVENT_ID_CHARS:
        event_id = None  # errors echo the client's event_id: never a huge one
    etype = data.get("type")
    if not isinstance(etype, str):
        raise ProtocolError(ErrorCode.INVALID_EVENT, "missing string field 'type'", event_id, "type")
    if etype not in CLIENT_EVENT_TYPES:
        shown = etype if len(etype) <= 64 else etype[:64] + "..."
        raise ProtocolError(
            ErrorCode.UNKNOWN_EVENT, f"unknown event type {shown!r}; known: {sorted(CLIENT_EVENT_TYPES)}", event_id,
            "type",
        )
    try:
        return _client_event.validate_python(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"][1:]) or None
        raise ProtocolError(
            ErrorCode.INVALID_EVENT, f"invalid {etype}: {loc or 'event'}: {first['msg']}", event_id, loc
        ) from None


# ------------------------------------------------------------------ server events
def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class _ServerEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")
    event_id: str = Field(default_factory=lambda: new_id("event"))


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["invalid_request_error", "server_error"]
    code: ErrorCode
    message: str
    param: str | None = None
    event_id: str | None = None


class ErrorEvent(_ServerEvent):
    type: Literal["error"]
    error: ErrorDetail


class SessionEvent(_ServerEvent):
    type: Literal["session.created", "session.updated"]
    session: dict[str, Any]


ResponseStatus = Literal["in_progress", "completed", "interrupted", "cancelled", "incomplete", "failed"]


class ResponseObject(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    object: Literal["realtime.response"] = "realtime.response"
    status: ResponseStatus
    status_details: dict[str, Any] | None = None
    output: list[dict[str, Any]]
    conversation_id: str
    output_modalities: list[str] | None = None
    modalities: list[str] | None = None  # beta
    audio_duration_ms: int | None = None


class ResponseEvent(_ServerEvent):
    type: Literal["response.created", "response.done"]
    response: ResponseObject


class _ContentRef(_ServerEvent):
    response_id: str
    item_id: str
    output_index: int = 0
    content_index: int = 0


class AudioDelta(_ContentRef):
    """Built on the hot path by ``audio_delta_event``; the model is its schema."""

    type: Literal["response.output_audio.delta", "response.audio.delta"]
    delta: str  # base64 PCM16


class TranscriptDelta(_ContentRef):
    type: Literal["response.output_audio_transcript.delta", "response.audio_transcript.delta"]
    delta: str


class AudioDone(_ContentRef):
    type: Literal["response.output_audio.done", "response.audio.done"]


class TranscriptDone(_ContentRef):
    type: Literal["response.output_audio_transcript.done", "response.audio_transcript.done"]
    transcript: str


class OutputItemEvent(_ServerEvent):
    type: Literal["response.output_item.added", "response.output_item.done"]
    response_id: str
    output_index: int = 0
    item: dict[str, Any]


class ItemEvent(_ServerEvent):
    type: Literal["conversation.item.added", "conversation.item.done", "conversation.item.created"]
    previous_item_id: str | None = None
    item: dict[str, Any]


class ItemTruncated(_ServerEvent):
    type: Literal["conversation.item.truncated"]
    item_id: str
    content_index: int
    audio_end_ms: int


class SpeechStarted(_ServerEvent):
    type: Literal["input_audio_buffer.speech_started"]
    audio_start_ms: int
    item_id: str


class SpeechStopped(_ServerEvent):
    type: Literal["input_audio_buffer.speech_stopped"]
    audio_end_ms: int
    item_id: str | None


class BufferCleared(_ServerEvent):
    type: Literal["input_audio_buffer.cleared"]


class BufferCommitted(_ServerEvent):
    type: Literal["input_audio_buffer.committed"]
    item_id: str
    previous_item_id: str | None = None


class TranscriptionCompleted(_ServerEvent):
    """What the user said in a voice turn (sessions with the dialogue brain)."""

    type: Literal["conversation.item.input_audio_transcription.completed"]
    item_id: str
    content_index: int = 0
    transcript: str


class TranscriptionFailed(_ServerEvent):
    type: Literal["conversation.item.input_audio_transcription.failed"]
    item_id: str
    content_index: int = 0
    error: ErrorDetail


ServerEvent = Annotated[
    ErrorEvent | SessionEvent | ResponseEvent | AudioDelta | TranscriptDelta | AudioDone | TranscriptDone
    | OutputItemEvent | ItemEvent | ItemTruncated | SpeechStarted | SpeechStopped | BufferCleared | BufferCommitted
    | TranscriptionCompleted | TranscriptionFailed,
    Field(discriminator="type"),
]
_server_event = TypeAdapter(ServerEvent)


def server_event(type_: str, **fields: Any) -> dict[str, Any]:
    """Build a server event through its schema (a wrong field is a bug and raises here, not at the client)."""
    return _server_event.validate_python({"type": type_, **fields}).model_dump(mode="json", exclude_none=False)


def parse_server_event(data: dict[str, Any]) -> BaseModel:
    """Validate an event a client received (tests check every event the server sends with this)."""
    return _server_event.validate_python(data)


def audio_delta_event(response_id: str, item_id: str, pcm_b64: str) -> dict[str, Any]:
    """The hot-path event (25 per second per session): a plain dict of the ``AudioDelta`` schema."""
    return {"type": "response.output_audio.delta", "event_id": new_id("event"), "response_id": response_id,
            "item_id": item_id, "output_index": 0, "content_index": 0, "delta": pcm_b64}


def error_event(err: ProtocolError) -> dict[str, Any]:
    return server_event(
        "error",
        error={
            "type": "invalid_request_error" if err.code != ErrorCode.SERVER_ERROR else "server_error",
            "code": err.code.value,
            "message": err.message,
            "param": err.param,
            "event_id": err.event_id,
        },
    )


# GA name → beta name, for clients that send ``OpenAI-Beta: realtime=v1``.
BETA_NAMES = {
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
}


def binary_frame(kind: BinaryKind, payload: bytes) -> bytes:
    return bytes([kind]) + payload
