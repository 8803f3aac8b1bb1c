"""Fuzz the live server over real sockets: random, malformed and huge realtime events, binary frames of
every kind, and the HTTP API (schemathesis from /openapi.json, plus raw random requests).

What must hold for every input: a bad event gets an ``error`` event with a documented code (the code
the parser itself gives, when the parser rejects it), never ``server_error``; the session answers the
next event; another session and the HTTP endpoints keep working; no HTTP request gets a 5xx.
"""

from __future__ import annotations

import base64
import copy
import json
import urllib.error
import urllib.request
from collections import Counter
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

from realtime.protocol import (
    CLIENT_EVENT_TYPES,
    ErrorCode,
    ProtocolError,
    parse_client_event,
    parse_server_event,
)
from tests.conftest import run
from tests.test_server_e2e import Conn, user_text

try:
    import schemathesis  # the API fuzz below; the realtime fuzz needs only hypothesis
except ImportError:  # pragma: no cover
    schemathesis = None

CODES = {c.value for c in ErrorCode}
MAX_AUDIO = 512 * 1024
FUZZ_SETTINGS = settings(max_examples=250, deadline=None, database=None, derandomize=False,
                         suppress_health_check=list(HealthCheck))

# ------------------------------------------------------------------ strategies
json_leaf = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
             | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30))
json_value = st.recursive(
    json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=10,
)
FRAME_LIMIT = 2 * 1024 * 1024  # Settings.max_message_bytes: a larger frame closes the socket (1009), by design
huge_text = st.integers(5_000, 900_000).map(lambda n: "A" * n)  # one of them stays under the frame limit
pcm_b64 = st.binary(max_size=4000).map(lambda b: base64.b64encode(b).decode())
field_value = json_value | huge_text | pcm_b64 | st.sampled_from(
    ["", "pcm16", "realtime", "user", "assistant", "system", "inf", "server_vad", "audio/pcm", "input_text", -1, 0,
     24000, 2**31, 1e300])

PCM = base64.b64encode(bytes(1920)).decode()
TEMPLATES = [
    {"type": "session.update", "event_id": "e1", "session": {
        "type": "realtime", "instructions": "be brief", "voice": "v", "output_modalities": ["audio"],
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                            "turn_detection": {"type": "server_vad", "threshold": 0.5, "silence_duration_ms": 500}},
                  "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy"}},
        "binary_audio": False}},
    {"type": "session.update", "session": {"modalities": ["audio", "text"], "input_audio_format": "pcm16",
                                           "turn_detection": None}},
    {"type": "input_audio_buffer.append", "audio": PCM},
    {"type": "input_audio_buffer.clear"},
    {"type": "input_audio_buffer.commit"},
    {"type": "conversation.item.create", "previous_item_id": None, "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]}},
    {"type": "response.create", "response": {"instructions": "say hi", "max_output_tokens": 2,
                                             "output_modalities": ["audio"]}},
    {"type": "response.cancel", "response_id": "resp_x"},
    {"type": "conversation.item.truncate", "item_id": "item_x", "content_index": 0, "audio_end_ms": 0},
]


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated_event(draw) -> str:
    """A valid event with one field replaced by anything, deleted, or wrapped in a list."""
    event = copy.deepcopy(draw(st.sampled_from(TEMPLATES)))
    path = draw(st.sampled_from([p for p in _paths(event) if p]))
    parent = event
    for key in path[:-1]:
        parent = parent[key]
    op = draw(st.sampled_from(["replace", "delete", "wrap"]))
    if op == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif op == "wrap":
        parent[path[-1]] = [parent[path[-1]]]
    else:
        parent[path[-1]] = draw(field_value)
    return json.dumps(event)


random_event = st.fixed_dictionaries(
    {"type": st.sampled_from(sorted(CLIENT_EVENT_TYPES)) | st.text(max_size=40)},
    optional={k: field_value for k in ("event_id", "session", "audio", "item", "response", "response_id",
                                       "item_id", "audio_end_ms", "content_index", "previous_item_id")},
).map(json.dumps).filter(lambda s: len(s.encode()) < FRAME_LIMIT)  # several huge fields can add up past it
text_frame = st.text(max_size=200) | json_value.map(json.dumps) | mutated_event() | random_event
odd_audio = st.binary(max_size=4000).map(lambda b: b"\x01" + b + bytes((len(b) + 1) % 2))  # half a sample: invalid_audio
binary_frame = st.binary(max_size=64) | st.tuples(st.integers(0, 255), st.binary(max_size=4000)).map(
    lambda t: bytes([t[0]]) + t[1]) | odd_audio | st.integers(MAX_AUDIO // 2, MAX_AUDIO).map(
    lambda n: b"\x01" + bytes(2 * n + 1))
any_frame = text_frame | binary_frame


def expected_code(frame: str | bytes) -> str | None:
    """What the server must answer at least, by the parser's own rules (None: the event may be fine)."""
    if isinstance(frame, bytes):
        if not frame or frame[0] != 1:
            return "invalid_event"
        if len(frame) - 1 > MAX_AUDIO:
            return "audio_too_large"
        return "invalid_audio" if (len(frame) - 1) % 2 else None
    try:
        parse_client_event(frame)
    except ProtocolError as e:
        return e.code.value
    return None


# ------------------------------------------------------------------ the realtime protocol
def test_protocol_fuzz_over_a_live_socket(make_server):
    srv = make_server(capacity=3, events_per_second=1e6, event_burst=1_000_000, max_errors_per_minute=1_000_000)
    stats = {"examples": 0, "errors": 0}
    seen_codes: Counter[str] = Counter()
    with connect(srv.ws_url, max_size=None) as ws, connect(srv.ws_url) as other:
        assert json.loads(ws.recv(10))["type"] == "session.created"
        assert json.loads(other.recv(10))["type"] == "session.created"

        @FUZZ_SETTINGS
        @given(message=any_frame)
        def check(message):
            n = stats["examples"] = stats["examples"] + 1
            ws.send(message)
            probe = f"probe{n}"  # answered in order after the message: the session is still serving
            ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "id": probe, "role": "system", "content": [{"type": "input_text", "text": "."}]}}))
            codes = []
            while True:
                raw = ws.recv(30)
                if isinstance(raw, bytes):
                    continue  # binary audio of a response the fuzz started
                ev = json.loads(raw)
                parse_server_event(ev)  # every event the server sends follows the documented schema
                if ev["type"] == "error":
                    codes.append(ev["error"]["code"])
                elif ev["type"] == "conversation.item.added" and ev["item"]["id"] == probe:
                    break
            stats["errors"] += len(codes)
            seen_codes.update(codes)
            assert all(c in CODES and c != "server_error" for c in codes), codes
            want = expected_code(message)
            if want is not None:
                assert want in codes, (want, codes)

        check()
        print(f"\nprotocol fuzz: {stats}, codes {dict(seen_codes)}")
        assert stats["errors"] > stats["examples"] // 3  # the fuzz mostly hit the validators, as meant
        assert len(seen_codes) >= 5

    async def still_serving():
        for _ in range(2):
            conn = await Conn.open(srv.ws_url)
            await conn.send(user_text("after the fuzz"))
            await conn.send({"type": "response.create", "response": {"max_output_tokens": 2}})
            done = await conn.until("response.done")
            await conn.ws.close()
            assert done["response"]["status"] == "incomplete"

    run(still_serving())
    metrics = urllib.request.urlopen(f"{srv.http_url}/metrics").read().decode()
    assert 'code="server_error"' not in metrics


# ------------------------------------------------------------------ the HTTP API
def test_http_api_conforms_to_its_openapi_document(make_server):
    """schemathesis cases of every documented operation (valid and invalid inputs), with no key, a wrong one
    and the right one: no 5xx, statuses, content types and bodies as documented. (Its pytest plugin is not
    used: it does not run under pytest 9; its strategies are plain hypothesis.)"""
    if schemathesis is None:
        pytest.skip("schemathesis is not installed")
    srv = make_server(api_keys=["fuzz-key"], capacity=2)
    schema = schemathesis.openapi.from_url(f"{srv.http_url}/openapi.json")
    cases = schema.as_strategy() | schema.as_strategy(schemathesis.GenerationMode.NEGATIVE)
    operations: set[str] = set()

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=cases, key=st.sampled_from([None, "wrong", "fuzz-key"]))
    def check(case, key):
        operations.add(case.operation.label)
        case.call_and_validate(headers={"Authorization": f"Bearer {key}"} if key else None)

    check()
    assert {"GET /healthz", "GET /readyz", "GET /metrics", "GET /v1/engine/stats"} <= operations


methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
paths = st.sampled_from(["/", "/healthz", "/readyz", "/metrics", "/v1/engine/stats", "/v1/realtime", "/static/",
                         "/openapi.json", "/docs", "/v1/"]) | st.text(
    alphabet=st.characters(codec="ascii", exclude_characters="\r\n #?"), max_size=40).map(lambda p: "/" + p)
suffixes = st.sampled_from(["", "index.html", "..%2f..%2fetc%2fpasswd", "../pyproject.toml", "%00", "a" * 300])


def test_raw_http_fuzz_never_gets_a_5xx(make_server):
    srv = make_server(api_keys=["fuzz-key"], capacity=2)
    seen: set[int] = set()

    @FUZZ_SETTINGS
    @given(method=methods, path=paths, suffix=suffixes,
           query=st.dictionaries(st.sampled_from(["api_key", "reset", "beta", "x"]), st.text(max_size=20), max_size=3),
           key=st.sampled_from([None, "fuzz-key", "wrong", ""]), body=st.binary(max_size=2000))
    def check(method, path, suffix, query, key, body):
        url = srv.http_url + quote(path + suffix, safe="/%.") + ("?" + urlencode(query) if query else "")
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        req = urllib.request.Request(url, data=body if method not in ("GET", "HEAD") else None, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                status = r.status
        except urllib.error.HTTPError as e:
            status = e.code
        seen.add(status)
        assert status < 500, (method, url, status)

    check()
    assert 200 in seen and 404 in seen
    with urllib.request.urlopen(f"{srv.http_url}/healthz", timeout=10) as r:
        assert r.status == 200
