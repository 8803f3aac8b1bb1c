"""API keys: the keys file, constant-time checks, per-key session and rate limits, reuse by other routers,
and keys kept out of logs."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from typing import Annotated

import pytest
import websockets
from fastapi import APIRouter, Depends
from fastapi.testclient import TestClient

from realtime.app import create_app
from realtime.auth import (
    ANONYMOUS,
    Authenticator,
    AuthError,
    KeyLimits,
    Principal,
    RedactKeys,
    key_hash,
    load_keys,
    parse_keys_file,
    require_key,
)
from realtime.config import Settings
from realtime.metrics import Metrics
from realtime.protocol import ErrorCode
from tests.conftest import run, tiny_model
from tests.test_hardening_support import get
from tests.test_server_e2e import Conn


# ------------------------------------------------------------------ keys and the authenticator
def test_keys_file_lines_limits_and_errors_that_never_show_the_key():
    keys = parse_keys_file("# team keys\nalpha-key max_sessions=2 rpm=60\n\n  beta-key   # no limits\n")
    assert [(k.key, k.limits) for k in keys] == [("alpha-key", KeyLimits(2, 60)), ("beta-key", KeyLimits())]
    assert "alpha" not in repr(keys[0])
    with pytest.raises(ValueError, match=r"keys:2: unknown option 'burst'") as e:
        parse_keys_file("a\nsecret-xyz burst=3", "keys")
    assert "secret-xyz" not in str(e.value)
    with pytest.raises(ValueError, match="listed twice"):
        parse_keys_file("same\nsame max_sessions=1")


def test_plain_keys_and_the_file_merge_with_default_limits(tmp_path):
    f = tmp_path / "keys"
    f.write_text("filed-key rpm=5\nplain-file-key\n")
    keys = {k.key: k.limits for k in load_keys(["env-key"], f, KeyLimits(max_sessions=3))}
    assert keys == {"env-key": KeyLimits(3, 0), "filed-key": KeyLimits(0, 5), "plain-file-key": KeyLimits(3, 0)}
    with pytest.raises(FileNotFoundError):
        load_keys([], tmp_path / "missing", KeyLimits())


def test_authenticator_checks_counts_and_releases():
    auth = Authenticator(load_keys(["k1"], None, KeyLimits(max_sessions=1, rpm=2)), Metrics())
    with pytest.raises(AuthError) as e:
        auth.authenticate("k2")
    assert (e.value.status, e.value.code) == (401, ErrorCode.INVALID_API_KEY)
    with pytest.raises(AuthError):
        auth.authenticate(None)
    who = auth.admit("k1")
    assert who == Principal(key_hash("k1"), KeyLimits(1, 2))
    auth.admit("k1")
    with pytest.raises(AuthError) as e:
        auth.admit("k1")  # the third request in a minute
    assert (e.value.status, e.value.code) == (429, ErrorCode.KEY_RATE_LIMITED) and e.value.retry_after >= 1
    lease = auth.open_session(who)
    with pytest.raises(AuthError) as e:
        auth.open_session(who)
    assert e.value.code == ErrorCode.KEY_SESSION_LIMIT
    lease.release()
    lease.release()  # idempotent: one release per lease
    assert auth.sessions_of(who.key_hash) == 0
    auth.open_session(who).release()
    assert auth.metrics.refusals.labels("key_rate_limited")._value.get() == 1
    assert auth.metrics.refusals.labels("key_session_limit")._value.get() == 1
    assert Authenticator([]).admit(None) == Principal(ANONYMOUS)  # no keys: open, unlimited


def test_keys_in_log_lines_are_replaced_by_their_hash():
    from uvicorn.logging import AccessFormatter

    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", "/v1/x?api_key=top%2Bsecret&a=1", "1.1", 200), None)
    RedactKeys().filter(record)
    line = AccessFormatter("%(client_addr)s %(request_line)s %(status_code)s", use_colors=False).format(record)
    assert "secret" not in line and f"api_key=sha256:{key_hash('top+secret')}&a=1" in line
    ws = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, '%s - "WebSocket %s" [accepted]',
                           ("127.0.0.1:5", "/v1/realtime?api_key=abc"), None)
    RedactKeys().filter(ws)
    assert "abc" not in ws.getMessage()


# ------------------------------------------------------------------ another router reuses the same keys and limits
def test_require_key_guards_any_router_and_shares_the_per_key_allowance():
    app = create_app(Settings(api_keys=["k-router"], key_rpm=3, capacity=1), model=tiny_model(1))
    router = APIRouter()

    @router.get("/v1/whoami")
    async def whoami(who: Annotated[Principal, Depends(require_key)]) -> dict:
        return {"key": who.key_hash}

    app.include_router(router)
    client = TestClient(app)  # no lifespan: the HTTP path only
    r = client.get("/v1/whoami")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/whoami", headers={"Authorization": "Bearer k-router"}).json() == {
        "key": key_hash("k-router")}
    assert client.get("/v1/whoami", headers={"x-api-key": "k-router"}).status_code == 200
    assert client.get("/v1/engine/stats?api_key=k-router").status_code == 200  # the same allowance: 3 a minute
    r = client.get("/v1/whoami", headers={"x-api-key": "k-router"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "key_rate_limited"
    assert int(r.headers["retry-after"]) >= 1
    app.state.auth.draining = True
    r = client.get("/v1/whoami", headers={"x-api-key": "k-router"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down"


# ------------------------------------------------------------------ per-key limits on the websocket
def test_per_key_sessions_and_rate_are_refused_before_the_upgrade(make_server, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("one-session max_sessions=1\ntwo-per-minute rpm=2\n")
    srv = make_server(api_keys_file=str(keys), capacity=4)

    async def scenario():
        first = await Conn.open(srv.ws_url, additional_headers={"Authorization": "Bearer one-session"})
        with pytest.raises(websockets.InvalidStatus) as full:
            await websockets.connect(srv.ws_url, additional_headers={"Authorization": "Bearer one-session"})
        await first.ws.close()
        for _ in range(200):  # the server frees the key's session when it has closed its side
            if srv.app.state.auth.sessions_of(key_hash("one-session")) == 0:
                break
            await asyncio.sleep(0.05)
        again = await Conn.open(srv.ws_url, subprotocols=["realtime", "openai-insecure-api-key.one-session"])
        await again.ws.close()
        a = await Conn.open(srv.ws_url + "?api_key=two-per-minute")
        b = await Conn.open(srv.ws_url + "?api_key=two-per-minute")
        with pytest.raises(websockets.InvalidStatus) as fast:
            await websockets.connect(srv.ws_url + "?api_key=two-per-minute")
        await a.ws.close()
        await b.ws.close()
        return full.value.response, fast.value.response

    full, fast = run(scenario())
    assert full.status_code == 429 and json.loads(full.body)["error"]["code"] == "key_session_limit_reached"
    assert fast.status_code == 429 and json.loads(fast.body)["error"]["code"] == "key_rate_limited"
    assert int(fast.headers["Retry-After"]) >= 1
    status, body = get(f"{srv.http_url}/v1/engine/stats", {"x-api-key": "nope"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    metrics = urllib.request.urlopen(f"{srv.http_url}/metrics").read().decode()
    for reason in ("key_session_limit", "key_rate_limited", "unauthorized"):
        assert f'realtime_refusals_total{{reason="{reason}"}} 1.0' in metrics
