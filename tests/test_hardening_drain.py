"""Graceful drain of the real CLI server (a subprocess) on SIGTERM: finish, refuse, close with 1001, exit."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
import websockets

from tests.conftest import run
from tests.test_hardening_support import ServerProcess, get
from tests.test_server_e2e import Conn, user_text


@pytest.fixture
def spawn(tmp_path):
    procs: list[ServerProcess] = []

    def factory(*args: str, **kw) -> ServerProcess:
        p = ServerProcess(tmp_path, *args, **kw)
        procs.append(p)
        p.wait_ready()
        return p

    yield factory
    for p in procs:
        p.close()


async def closed(conn: Conn, timeout: float = 30.0) -> tuple[list[dict], int]:
    """Read until the server closes: the events seen on the way and the close code."""
    events = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                ev = await conn.next(timeout)
                if isinstance(ev, dict):
                    events.append(ev)
    except websockets.ConnectionClosed as e:
        return events, e.rcvd.code if e.rcvd else 1006
    raise AssertionError("unreachable")


@pytest.mark.slow
def test_sigterm_lets_the_response_in_flight_finish_then_closes_with_1001(spawn, tmp_path):
    db = tmp_path / "records.db"
    srv = spawn("--drain-seconds", "120", "--capacity", "4", "--db", str(db))

    async def scenario():
        speaking = await Conn.open(srv.ws_url)
        idle = await Conn.open(srv.ws_url)
        await speaking.send(user_text("finish this sentence before you go"))
        await speaking.send({"type": "response.create", "response": {"max_output_tokens": 200}})  # 8 s of speech
        await speaking.until("response.output_audio.delta")
        srv.terminate()
        # an idle session is told at once and closed with 1001
        idle_events, idle_code = await closed(idle)
        # while the response is still being spoken: not ready, and new sessions are told why
        ready = get(f"{srv.http_url}/readyz")
        late = await websockets.connect(srv.ws_url)
        late_first = await late.recv()
        with pytest.raises(websockets.ConnectionClosed) as late_close:
            await late.recv()
        # the speaking session hears its whole response, then the same goodbye
        events, code = await closed(speaking, timeout=120)
        return idle_events, idle_code, ready, late_first, late_close.value.rcvd.code, events, code, speaking

    idle_events, idle_code, ready, late_first, late_code, events, code, speaking = run(scenario())
    assert [e["error"]["code"] for e in idle_events if e["type"] == "error"] == ["server_shutting_down"]
    assert idle_code == 1001
    assert ready[0] == 503 and ready[1]["draining"] is True
    assert '"server_shutting_down"' in late_first and late_code == 1001
    done = [e for e in events if e["type"] == "response.done"]
    assert len(done) == 1 and done[0]["response"]["status"] == "incomplete"  # ran to max_output_tokens
    deltas = [e for e in speaking.seen if isinstance(e, dict) and e["type"] == "response.output_audio.delta"]
    assert len(deltas) == 200
    types = [e["type"] for e in events]
    assert types.index("response.done") < types.index("error")
    assert events[types.index("error")]["error"]["code"] == "server_shutting_down"
    assert code == 1001
    assert srv.wait(60) == 0, srv.logs()
    logs = srv.logs()
    assert "Traceback" not in logs and "draining" in logs
    with sqlite3.connect(db) as conn:  # the finished response was recorded before the process went
        rows = conn.execute("SELECT status FROM responses").fetchall()
        ends = conn.execute("SELECT end_reason FROM usage ORDER BY started_at").fetchall()
    assert rows == [("incomplete",)]
    assert sorted(r for (r,) in ends) == ["server_shutting_down", "server_shutting_down"]


@pytest.mark.slow
def test_sigterm_deadline_cancels_what_is_still_speaking(spawn):
    srv = spawn("--drain-seconds", "0.5", "--db", "none")

    async def scenario():
        conn = await Conn.open(srv.ws_url)
        await conn.send(user_text("a long answer"))
        await conn.send({"type": "response.create"})  # ~10 s: the tiny model speaks to its limit
        await conn.until("response.output_audio.delta")
        srv.terminate()
        return await closed(conn)

    events, code = run(scenario())
    done = [e for e in events if e["type"] == "response.done"]
    assert len(done) == 1
    assert done[0]["response"]["status"] == "cancelled"
    assert done[0]["response"]["status_details"]["reason"] == "server_shutting_down"
    assert [e["error"]["code"] for e in events if e["type"] == "error"] == ["server_shutting_down"]
    assert code == 1001
    assert srv.wait(60) == 0, srv.logs()
