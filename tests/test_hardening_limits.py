"""Limits a client can hit, each with its code and its metric: session length, error floods, huge fields,
voice turns waiting for speech recognition."""

from __future__ import annotations

import json
import threading
import urllib.request

import numpy as np
import pytest
import websockets

from realtime.dialogue import Dialogue
from realtime.responder import EchoResponder
from tests.conftest import run
from tests.test_hardening_support import steady_tiny_model
from tests.test_server_e2e import Conn, append, user_text


def metrics_text(srv) -> str:
    return urllib.request.urlopen(f"{srv.http_url}/metrics").read().decode()


def test_a_session_past_its_time_limit_is_told_and_closed(make_server):
    srv = make_server(model=steady_tiny_model(2), capacity=2, max_session_seconds=3.0)

    async def scenario():
        conn = await Conn.open(srv.ws_url)
        await conn.send(user_text("still talking when the time is up"))
        await conn.send({"type": "response.create"})  # ~10 s of speech: longer than the session may last
        await conn.until("response.output_audio.delta")
        with pytest.raises(websockets.ConnectionClosed) as e:
            while True:
                await conn.next(30)
        return conn, e.value.rcvd.code

    conn, code = run(scenario())
    done = [e for e in conn.seen if isinstance(e, dict) and e["type"] == "response.done"]
    assert done[0]["response"]["status"] == "cancelled"
    assert done[0]["response"]["status_details"]["reason"] == "session_expired"
    errors = [e["error"]["code"] for e in conn.seen if isinstance(e, dict) and e["type"] == "error"]
    assert errors == ["session_expired"] and code == 1000
    text = metrics_text(srv)
    assert 'realtime_sessions_closed_total{reason="session_expired"} 1.0' in text
    assert 'realtime_errors_total{code="session_expired"} 1.0' in text


def test_a_flood_of_bad_events_closes_with_1008(make_server):
    srv = make_server(max_errors_per_minute=5)

    async def scenario():
        conn = await Conn.open(srv.ws_url)
        with pytest.raises(websockets.ConnectionClosed) as e:
            for _ in range(50):
                await conn.send("{broken")
            while True:
                await conn.next(10)
        return e.value.rcvd.code

    assert run(scenario()) == 1008
    assert 'realtime_errors_total{code="invalid_json"}' in metrics_text(srv)


HUGE = "x" * 300_000
HUGE_FIELDS = [  # (event, code, param): each bounded field, far past its bound
    ({"type": "conversation.item.create", "item": {"id": "i" * 65, "role": "user",
                                                    "content": [{"type": "input_text", "text": "a"}]}},
     "invalid_event", "item.id"),
    ({"type": "conversation.item.create", "item": {"role": "user",
                                                    "content": [{"type": "input_text", "text": "a"}] * 17}},
     "invalid_event", "item.content"),
    ({"type": "conversation.item.truncate", "item_id": HUGE, "audio_end_ms": 0}, "invalid_event", "item_id"),
    ({"type": "response.cancel", "response_id": HUGE}, "invalid_event", "response_id"),
    ({"type": "response.create", "response": {"instructions": HUGE}}, "text_too_long", "response.instructions"),
    ({"type": "session.update", "session": {"voice": HUGE}}, "invalid_event", "session.voice"),
    ({"type": "session.update", "session": {"instructions": HUGE}}, "text_too_long", "session.instructions"),
    ({"type": HUGE}, "unknown_event", "type"),
    ({"type": "input_audio_buffer.commit", "event_id": HUGE}, "invalid_event", "event_id"),
]


def test_huge_fields_get_coded_errors_and_are_never_echoed_back(make_server):
    srv = make_server()

    async def scenario():
        conn = await Conn.open(srv.ws_url)
        out = []
        for event, _, _ in HUGE_FIELDS:
            await conn.send(event)
            raw = await conn.ws.recv()
            out.append(raw)
        await conn.send(user_text("fine"))
        await conn.send({"type": "response.create", "response": {"max_output_tokens": 2}})
        done = await conn.until("response.done")
        await conn.ws.close()
        return out, done

    out, done = run(scenario())
    for raw, (_, code, param) in zip(out, HUGE_FIELDS, strict=True):
        assert len(raw) < 2000, raw[:200]  # the error is small: nothing huge comes back
        err = json.loads(raw)["error"]
        assert (err["code"], err["param"]) == (code, param), err
        assert err["event_id"] is None
    assert done["response"]["status"] == "incomplete"


class BlockedTranscriber:
    """Speech recognition that waits until released: voice turns pile up behind it."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def transcribe(self, audio: np.ndarray) -> str:
        self.release.wait(30)
        return "heard"


def test_voice_turns_beyond_the_recognition_queue_are_dropped_with_rate_limited(make_server):
    asr = BlockedTranscriber()
    dialogue = Dialogue(EchoResponder(), asr)
    srv = make_server(dialogue=dialogue, max_pending_turns=2)
    loud, quiet = np.full(960, 0.3, np.float32), np.zeros(960, np.float32)

    async def scenario():
        conn = await Conn.open(srv.ws_url)
        await conn.send({"type": "session.update", "session": {"turn_detection": {
            "type": "server_vad", "create_response": False, "silence_duration_ms": 200}}})
        await conn.until("session.updated")
        for _ in range(3):  # three turns: 0.4 s of voice, 0.4 s of silence each
            for chunk in [loud] * 10 + [quiet] * 10:
                await conn.send(append(chunk))
        err = await conn.error()
        asr.release.set()
        heard = [await conn.until("conversation.item.input_audio_transcription.completed") for _ in range(2)]
        await conn.ws.close()
        return err, heard

    try:
        err, heard = run(scenario())
    finally:
        asr.release.set()
    assert err["code"] == "rate_limited" and "speech recognition" in err["message"]
    assert [h["transcript"] for h in heard] == ["heard", "heard"]
    assert 'realtime_errors_total{code="rate_limited"} 1.0' in metrics_text(srv)


def test_new_error_codes_are_documented():
    from pathlib import Path

    from realtime.protocol import ErrorCode

    doc = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    missing = [c.value for c in ErrorCode if f"`{c.value}`" not in doc]
    assert missing == []
