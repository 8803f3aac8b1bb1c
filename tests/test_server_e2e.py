"""The real app on a real loopback socket: whole sessions, concurrency, bad input, refusals, barge-in."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import websockets

from realtime.audio import float_to_pcm16, pcm16_to_float
from realtime.protocol import parse_server_event
from tests.conftest import run, tiny_model

FRAME_WIRE = 960  # 40 ms at 24 kHz


class Conn:
    """A raw websocket client with an event buffer, so tests see exactly what the server sent."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.seen: list[dict | bytes] = []

    @classmethod
    async def open(cls, url: str, **kw) -> Conn:
        ws = await websockets.connect(url, max_size=8 * 1024 * 1024, **kw)
        conn = cls(ws)
        first = await conn.next()
        assert first["type"] == "session.created", first
        return conn

    async def send(self, event: dict | str | bytes) -> None:
        await self.ws.send(event if isinstance(event, (str, bytes)) else json.dumps(event))

    async def next(self, timeout: float = 10.0):
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        ev = raw if isinstance(raw, bytes) else json.loads(raw)
        if isinstance(ev, dict):
            parse_server_event(ev)  # every event the server sends must follow the documented schema
        self.seen.append(ev)
        return ev

    async def until(self, type_: str, timeout: float = 20.0) -> dict:
        async with asyncio.timeout(timeout):
            while True:
                ev = await self.next(timeout)
                if isinstance(ev, dict) and ev["type"] == type_:
                    return ev

    async def error(self) -> dict:
        return (await self.until("error"))["error"]

    def types(self) -> list[str]:
        return [e["type"] if isinstance(e, dict) else "<binary>" for e in self.seen]

    def audio(self) -> np.ndarray:
        parts = []
        for e in self.seen:
            if isinstance(e, bytes):
                parts.append(pcm16_to_float(e[1:]))
            elif e["type"] in ("response.output_audio.delta", "response.audio.delta"):
                parts.append(pcm16_to_float(base64.b64decode(e["delta"])))
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def user_text(text: str) -> dict:
    return {"type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}


def append(samples: np.ndarray) -> dict:
    return {"type": "input_audio_buffer.append", "audio": base64.b64encode(float_to_pcm16(samples)).decode()}


async def stream_mic(conn: Conn, seconds: float, level: float = 0.0, chunk: int = FRAME_WIRE) -> None:
    rng = np.random.default_rng(0)
    for _ in range(int(seconds * 24000 / chunk)):
        await conn.send(append((rng.standard_normal(chunk) * level).astype(np.float32)))
        await asyncio.sleep(chunk / 24000)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


# ------------------------------------------------------------------ whole sessions
def test_whole_voice_session(make_server):
    srv = make_server(capacity=2)

    async def scenario():
        conn = await Conn.open(srv.ws_url)
        await conn.send({"type": "session.update", "session": {"type": "realtime", "instructions": "be brief"}})
        updated = await conn.until("session.updated")
        assert updated["session"]["instructions"] == "be brief"
        assert updated["session"]["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}
        mic = asyncio.create_task(stream_mic(conn, 3.0, level=0.01))  # full duplex: mic stays open
        await conn.send(user_text("hello there"))
        await conn.until("conversation.item.added")
        await conn.send({"type": "response.create", "response": {"max_output_tokens": 12}})
        created = await conn.until("response.created")
        done = await conn.until("response.done")
        mic.cancel()
        await conn.ws.close()
        return conn, created, done

    conn, created, done = run(scenario())
    types = conn.types()
    assert created["response"]["status"] == "in_progress"
    assert done["response"]["status"] == "incomplete"  # an untrained model stops at max_output_tokens
    assert done["response"]["id"] == created["response"]["id"]
    deltas = [e for e in conn.seen if isinstance(e, dict) and e["type"] == "response.output_audio.delta"]
    assert len(deltas) == 12
    assert conn.audio().shape[0] == 12 * FRAME_WIRE
    assert "response.output_audio_transcript.delta" in types
    assert types.index("response.output_audio.done") < types.index("response.done")
    assert done["response"]["audio_duration_ms"] == 480


def test_beta_clients_get_beta_names_and_binary_audio_works(make_server):
    srv = make_server()

    async def scenario():
        conn = await Conn.open(srv.ws_url, additional_headers={"OpenAI-Beta": "realtime=v1"})
        await conn.send(user_text("beta"))
        await conn.until("conversation.item.created")
        await conn.send({"type": "response.create", "response": {"max_output_tokens": 3}})
        await conn.until("response.done")
        beta_types = conn.types()
        await conn.send({"type": "session.update", "session": {"binary_audio": True}})
        await conn.until("session.updated")
        await conn.ws.send(bytes([1]) + float_to_pcm16(np.zeros(FRAME_WIRE, np.float32)))  # binary mic frame
        await conn.send({"type": "response.create", "response": {"max_output_tokens": 3}})
        await conn.until("response.done")
        await conn.ws.close()
        return beta_types, conn

    beta_types, conn = run(scenario())
    assert "response.audio.delta" in beta_types and "response.output_audio.delta" not in beta_types
    assert "response.audio_transcript.delta" in beta_types
    binaries = [e for e in conn.seen if isinstance(e, bytes)]
    assert len(binaries) == 3 and all(b[0] == 1 and len(b) == 1 + 2 * FRAME_WIRE for b in binaries)


def test_many_sessions_share_batched_steps(make_server):
    srv = make_server(capacity=10)
    n = 8

    async def one(i: int):
        conn = await Conn.open(srv.ws_url)
        mic = asyncio.create_task(stream_mic(conn, 2.0))
        await conn.send(user_text(f"session {i}"))
        await conn.send({"type": "response.create", "response": {"max_output_tokens": 25}})
        done = await conn.until("response.done", timeout=30)
        mic.cancel()
        await conn.ws.close()
        return done["response"]["status"], conn.audio().shape[0]

    async def scenario():
        return await asyncio.gather(*(one(i) for i in range(n)))

    results = run(scenario())
    assert results == [("incomplete", 25 * FRAME_WIRE)] * n
    assert srv.engine.stats.max_batch > 1
    assert srv.engine.stats.max_batch <= 10


# ------------------------------------------------------------------ barge-in
def test_irq_interrupts_the_response_and_no_audio_follows(make_server):
    model = tiny_model(2)
    srv = make_server(model=model, capacity=2)

    async def scenario():
        conn = await Conn.open(srv.ws_url)
        mic = asyncio.create_task(stream_mic(conn, 5.0, level=0.05))
        await conn.send(user_text("a long answer that the user will interrupt"))
        await conn.send({"type": "response.create"})
        for _ in range(3):
            await conn.until("response.output_audio.delta")
        model.set_logit_bias(model.cfg.lslm.irq_id, 1e4)  # the model hears the user barge in
        started = await conn.until("input_audio_buffer.speech_started")
        done = await conn.until("response.done")
        model.set_logit_bias(model.cfg.lslm.irq_id, 0.0)
        # nothing of that response may come after; the session keeps listening and serving
        await conn.send(user_text("again"))
        await conn.send({"type": "response.create", "response": {"max_output_tokens": 2}})
        done2 = await conn.until("response.done")
        mic.cancel()
        await conn.ws.close()
        return conn, started, done, done2

    conn, started, done, done2 = run(scenario())
    assert done["response"]["status"] == "interrupted"
    assert done["response"]["status_details"]["reason"] == "turn_detected"
    types = conn.types()
    i_started, i_done = types.index("input_audio_buffer.speech_started"), types.index("response.done")
    rid = done["response"]["id"]
    after = [e for e in conn.seen[i_started:] if isinstance(e, dict) and e.get("response_id") == rid
             and e["type"] == "response.output_audio.delta"]
    assert after == [] and i_started < i_done
    assert done2["response"]["status"] == "incomplete"


def test_cancel_and_truncate(make_server):
    srv = make_server()

    async def scenario():
        conn = await Conn.open(srv.ws_url)
        await conn.send(user_text("to be cancelled"))
        await conn.send({"type": "response.create"})
        created = await conn.until("response.created")
        await conn.until("response.output_audio.delta")
        await conn.until("response.output_audio.delta")
        item_id = created["response"]["output"][0]["id"]
        # past what was sent: an error, and the response keeps going
        await conn.send({"type": "conversation.item.truncate", "item_id": item_id, "audio_end_ms": 600_000})
        assert (await conn.error())["param"] == "audio_end_ms"
        await conn.until("response.output_audio.delta")
        await conn.send({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                         "audio_end_ms": 40})
        truncated = await conn.until("conversation.item.truncated")
        done = await conn.until("response.done")
        await conn.send({"type": "response.create", "response": {"instructions": "say this instead"}})
        await conn.until("response.created")
        await conn.send({"type": "response.cancel"})
        done2 = await conn.until("response.done")
        await conn.ws.close()
        return truncated, done, done2

    truncated, done, done2 = run(scenario())
    assert truncated["audio_end_ms"] == 40
    assert done["response"]["status"] == "cancelled"
    assert done2["response"]["status"] == "cancelled"


# ------------------------------------------------------------------ bad input: an error each, the session goes on
BAD_INPUTS = [
    ("{oops", "invalid_json"),
    ('"just a string"', "invalid_event"),
    ({"type": "do.magic"}, "unknown_event"),
    ({"type": "input_audio_buffer.append"}, "invalid_event"),
    ({"type": "input_audio_buffer.append", "audio": 12}, "invalid_event"),
    ({"type": "input_audio_buffer.append", "audio": "!!!not base64!!!"}, "invalid_audio"),
    ({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\x01\x02\x03").decode()}, "invalid_audio"),
    ({"type": "input_audio_buffer.append", "audio": base64.b64encode(bytes(600_000)).decode()}, "audio_too_large"),
    (user_text("x" * 5000), "text_too_long"),
    ({"type": "response.cancel"}, "response_cancel_not_active"),
    ({"type": "conversation.item.truncate", "item_id": "nope", "audio_end_ms": 5}, "item_not_found"),
    ({"type": "response.create"}, "nothing_to_say"),
    (bytes([9, 1, 2]), "invalid_event"),
    ({"type": "session.update", "session": {"turn_detection": {"threshold": 7}}}, "invalid_event"),
]


def test_every_bad_input_gets_a_coded_error_and_the_session_goes_on(make_server):
    srv = make_server()

    async def scenario():
        conn = await Conn.open(srv.ws_url)
        codes = []
        for payload, _ in BAD_INPUTS:
            await conn.send(payload)
            codes.append((await conn.error())["code"])
        # a second response.create while one runs is refused too
        await conn.send(user_text("fine"))
        await conn.send({"type": "response.create", "response": {"max_output_tokens": 50}})
        await conn.until("response.created")
        await conn.send({"type": "response.create"})
        codes.append((await conn.error())["code"])
        await conn.send({"type": "response.cancel"})
        await conn.until("response.done")
        # and the session still works
        await conn.send({"type": "response.create", "response": {"max_output_tokens": 2}})
        done = await conn.until("response.done")
        await conn.ws.close()
        return codes, done

    codes, done = run(scenario())
    assert codes == [c for _, c in BAD_INPUTS] + ["conversation_already_has_active_response"]
    assert done["response"]["status"] == "incomplete"


def test_event_flood_is_rate_limited(make_server):
    srv = make_server(events_per_second=50, event_burst=20)

    async def scenario():
        conn = await Conn.open(srv.ws_url)
        for _ in range(200):
            await conn.send({"type": "input_audio_buffer.clear"})
        err = await conn.error()
        await asyncio.sleep(1.0)  # the bucket refills; the session goes on
        await conn.send({"type": "input_audio_buffer.clear"})
        await conn.until("input_audio_buffer.cleared")
        await conn.ws.close()
        return err

    assert run(scenario())["code"] == "rate_limited"


def test_oversized_frame_closes_only_that_connection(make_server):
    srv = make_server(max_message_bytes=64 * 1024)

    async def scenario():
        other = await Conn.open(srv.ws_url)
        conn = await Conn.open(srv.ws_url)
        await conn.send("x" * (200 * 1024))
        with pytest.raises(websockets.ConnectionClosed) as e:
            await conn.until("never")
        await other.send(user_text("still here"))
        await other.send({"type": "response.create", "response": {"max_output_tokens": 2}})
        done = await other.until("response.done")
        await other.ws.close()
        return e.value.rcvd.code, done

    code, done = run(scenario())
    assert code == 1009
    assert done["response"]["status"] == "incomplete"


# ------------------------------------------------------------------ admission, disconnects, auth, health
def test_refusal_beyond_capacity(make_server):
    srv = make_server(capacity=2)

    async def scenario():
        a, b = await Conn.open(srv.ws_url), await Conn.open(srv.ws_url)
        ws = await websockets.connect(srv.ws_url)
        first = json.loads(await ws.recv())
        with pytest.raises(websockets.ConnectionClosed) as e:
            await ws.recv()
        await a.ws.close()
        await asyncio.sleep(0.2)
        c = await Conn.open(srv.ws_url)  # a freed slot admits the next one
        await b.ws.close()
        await c.ws.close()
        return first, e.value.rcvd.code

    first, code = run(scenario())
    assert first["type"] == "error" and first["error"]["code"] == "session_limit_reached"
    assert code == 1013
    metrics = urllib.request.urlopen(f"{srv.http_url}/metrics").read().decode()
    assert 'realtime_refusals_total{reason="capacity"} 1.0' in metrics


def test_disconnect_mid_response_frees_the_slot(make_server):
    srv = make_server(capacity=1)

    async def scenario():
        conn = await Conn.open(srv.ws_url)
        await conn.send(user_text("speaking when the client vanishes"))
        await conn.send({"type": "response.create"})
        await conn.until("response.output_audio.delta")
        conn.ws.transport.abort()  # vanish without a close handshake
        for _ in range(100):
            if get_json(f"{srv.http_url}/readyz")["sessions"] == 0:
                break
            await asyncio.sleep(0.05)
        again = await Conn.open(srv.ws_url)  # capacity 1: only works if the slot was freed
        await again.send(user_text("next"))
        await again.send({"type": "response.create", "response": {"max_output_tokens": 2}})
        done = await again.until("response.done")
        await again.ws.close()
        return done

    assert run(scenario())["response"]["status"] == "incomplete"


def test_api_key_required_before_upgrade(make_server):
    srv = make_server(api_keys=["s3cret"])

    async def scenario():
        with pytest.raises(websockets.InvalidStatus) as e:
            await websockets.connect(srv.ws_url)
        with pytest.raises(websockets.InvalidStatus) as e2:
            await websockets.connect(srv.ws_url, additional_headers={"Authorization": "Bearer wrong"})
        ok = await Conn.open(srv.ws_url, additional_headers={"Authorization": "Bearer s3cret"})
        await ok.ws.close()
        ok2 = await Conn.open(srv.ws_url + "?api_key=s3cret")
        await ok2.ws.close()
        return e.value.response.status_code, e2.value.response.status_code

    assert run(scenario()) == (401, 401)


def test_health_ready_metrics(make_server):
    srv = make_server()
    assert get_json(f"{srv.http_url}/healthz") == {"status": "ok"}
    ready = get_json(f"{srv.http_url}/readyz")
    assert ready["ready"] is True and ready["capacity"] == 16
    text = urllib.request.urlopen(f"{srv.http_url}/metrics").read().decode()
    for name in ("realtime_sessions_active", "realtime_frames_total", "realtime_step_seconds_bucket",
                 "realtime_refusals_total", "realtime_errors_total"):
        assert name in text
    srv.engine.stop()
    with pytest.raises(urllib.error.HTTPError) as e:
        get_json(f"{srv.http_url}/readyz")
    assert e.value.code == 503


def test_the_embedded_default_model_serves(make_server):
    """The default-size model (what `make serve` runs) loads and speaks through the real socket."""
    from speech.duplex import load_default_voice_model

    model = load_default_voice_model(capacity=2)
    srv = make_server(model=model, capacity=2)

    async def scenario():
        conn = await Conn.open(srv.ws_url)
        await conn.send(user_text("the default model speaks"))
        await conn.send({"type": "response.create", "response": {"max_output_tokens": 5}})
        done = await conn.until("response.done", timeout=30)
        await conn.ws.close()
        return conn, done

    conn, done = run(scenario())
    assert done["response"]["status"] in ("completed", "incomplete", "interrupted")
    assert conn.audio().shape[0] % FRAME_WIRE == 0


def test_a_client_that_stops_reading_is_dropped_and_others_go_on(make_server):
    import socket
    import time

    srv = make_server(send_queue_max=8, capacity=3, events_per_second=1e6, event_burst=1_000_000)

    async def scenario():
        other = await Conn.open(srv.ws_url)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a reader that never reads
        sock.connect(("127.0.0.1", srv.port))
        slow = await websockets.connect(srv.ws_url, sock=sock, max_size=None)
        # each update is echoed back in full (~4 KB): megabytes of replies pile up unread
        big = json.dumps({"type": "session.update", "session": {"instructions": "x" * 3900}})
        for _ in range(4000):
            try:
                await asyncio.wait_for(slow.send(big), 1.0)
            except (TimeoutError, websockets.ConnectionClosed):
                break
        deadline = time.monotonic() + 30
        while get_json(f"{srv.http_url}/readyz")["sessions"] > 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await other.send(user_text("I am still served"))
        await other.send({"type": "response.create", "response": {"max_output_tokens": 3}})
        done = await other.until("response.done")
        await other.ws.close()
        slow.transport.abort()
        return done

    done = run(scenario())
    assert done["response"]["status"] == "incomplete"
    metrics = urllib.request.urlopen(f"{srv.http_url}/metrics").read().decode()
    assert 'realtime_refusals_total{reason="slow_consumer"} 1.0' in metrics
