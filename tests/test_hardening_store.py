"""Nothing lost: transcripts and usage in SQLite, durable per finished response, surviving ``kill -9``."""

from __future__ import annotations

import sqlite3

import pytest

from realtime.metrics import Metrics
from realtime.store import RecordStore, SessionLog, open_db
from tests.conftest import run
from tests.test_hardening_support import ServerProcess, get
from tests.test_server_e2e import Conn, user_text


def rows(db, sql: str, *params) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


# ------------------------------------------------------------------ the store alone
def test_store_commits_each_transaction_in_order_and_reopens(tmp_path):
    db = tmp_path / "sub" / "r.db"  # folders are created
    store = RecordStore(db, Metrics())
    store.start()
    log = SessionLog(store, "sess_1", "abc123")
    user = {"id": "item_u", "role": "user", "status": "completed", "content": [{"type": "input_text", "text": "hi"}]}
    bot = {"id": "item_a", "role": "assistant", "status": "completed",
           "content": [{"type": "output_audio", "transcript": "hello"}], "audio_ms": 480}
    log.item_changed(user)
    log.item_changed(bot)
    log.response_done("resp_1", "item_a", "completed", None, 1.0, 480, 2.5).result(10)
    user["content"][0]["text"] = "hi again"  # a later change of a written item is an update, order kept
    log.item_changed(user)
    log.end(3.0, "client_closed").result(10)
    store.close()
    assert rows(db, "PRAGMA journal_mode") == [("wal",)]
    assert rows(db, "SELECT item_id, seq, role, kind, text, response_id FROM items ORDER BY seq") == [
        ("item_u", 0, "user", "text", "hi again", None), ("item_a", 1, "assistant", "audio", "hello", "resp_1")]
    assert rows(db, "SELECT key_hash, responses, audio_in_s, audio_out_s, end_reason FROM usage") == [
        ("abc123", 1, 3.0, 0.48, "client_closed")]
    open_db(db).close()  # reopening an existing file is fine


def test_a_failing_transaction_fails_only_its_own_future_and_leaves_nothing(tmp_path):
    store = RecordStore(tmp_path / "r.db")
    store.start()
    store.write([("CREATE TABLE t (x)", ())]).result(10)
    ok = store.write([("INSERT INTO t VALUES (?)", ("first",))])
    bad = store.write([("INSERT INTO t VALUES (1)", ()), ("INSERT INTO nowhere VALUES (1)", ())])
    again = store.write([("INSERT INTO t VALUES (2)", ())])
    ok.result(10)
    with pytest.raises(sqlite3.Error):
        bad.result(10)
    again.result(10)
    store.close()
    seen = [x for (x,) in rows(tmp_path / "r.db", "SELECT x FROM t")]
    assert seen == ["first", 2]  # the failed transaction left nothing behind
    assert store.metrics.store_errors.labels("failed")._value.get() == 1


def test_an_unusable_path_fails_at_startup(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        RecordStore(tmp_path / "file" / "r.db").start()


# ------------------------------------------------------------------ through the server
def test_sessions_are_recorded_through_the_app(make_server, tmp_path):
    db = tmp_path / "r.db"
    srv = make_server(db=str(db), api_keys=["k-one"])

    async def scenario():
        conn = await Conn.open(srv.ws_url, additional_headers={"Authorization": "Bearer k-one"})
        await conn.send(user_text("first words"))
        await conn.send({"type": "response.create", "response": {"max_output_tokens": 2}})
        done = await conn.until("response.done")
        # response.done is sent after its record is committed: it is readable now, not "eventually"
        recorded = rows(db, "SELECT response_id, status, audio_out_ms FROM responses")
        await conn.ws.close()
        return done, recorded

    done, recorded = run(scenario())
    assert recorded == [(done["response"]["id"], "incomplete", 80)]
    srv.stop()  # the lifespan flushes the store: the session's end is there too
    from realtime.auth import key_hash

    assert rows(db, "SELECT key_hash, responses, end_reason FROM usage") == [(key_hash("k-one"), 1, "client_closed")]
    assert [r[0] for r in rows(db, "SELECT role FROM items ORDER BY seq")] == ["user", "assistant"]


# ------------------------------------------------------------------ kill -9 in the middle of a response
@pytest.mark.slow
def test_kill_9_mid_response_loses_nothing_that_was_done(tmp_path):
    db = tmp_path / "records.db"
    key = "kill-nine-key-0123456789"
    srv = ServerProcess(tmp_path, "--db", str(db), "--api-key", key)
    try:
        srv.wait_ready()

        async def scenario():
            conn = await Conn.open(f"{srv.ws_url}?api_key={key}")  # the browser way: the key in the URL
            session_id = None
            done_ids = []
            for i in range(3):
                await conn.send(user_text(f"turn {i}"))
                await conn.send({"type": "response.create", "response": {"max_output_tokens": 3}})
                done = await conn.until("response.done")
                done_ids.append(done["response"]["id"])
                session_id = done["response"]["conversation_id"]
            await conn.send(user_text("this answer is cut short"))
            await conn.send({"type": "response.create"})
            await conn.until("response.output_audio.delta")
            srv.kill9()  # mid-response
            return session_id, done_ids

        session_id, done_ids = run(scenario())
        assert srv.wait(30) == -9
    finally:
        srv.close()
    logs = srv.logs()
    assert key not in logs and "api_key=sha256:" in logs  # uvicorn's websocket log line, redacted

    assert rows(db, "PRAGMA integrity_check") == [("ok",)]
    assert rows(db, "SELECT response_id, status FROM responses ORDER BY done_at") == [
        (rid, "incomplete") for rid in done_ids]
    items = rows(db, "SELECT role, text FROM items WHERE session_id = ? ORDER BY seq", session_id)
    assert items == [("user", "turn 0"), ("assistant", "turn 0"), ("user", "turn 1"), ("assistant", "turn 1"),
                     ("user", "turn 2"), ("assistant", "turn 2")]
    assert rows(db, "SELECT responses, ended_at FROM usage WHERE session_id = ?", session_id) == [(3, None)]

    # the restarted server opens the same file and appends to it
    again = ServerProcess(tmp_path, "--db", str(db), "--api-key", key)
    try:
        again.wait_ready()

        async def after():
            conn = await Conn.open(again.ws_url, additional_headers={"x-api-key": key})
            await conn.send(user_text("after the crash"))
            await conn.send({"type": "response.create", "response": {"max_output_tokens": 2}})
            await conn.until("response.done")
            await conn.ws.close()

        run(after())
        assert get(f"{again.http_url}/healthz")[0] == 200
        again.terminate()
        assert again.wait(60) == 0
    finally:
        again.close()
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]
    assert rows(db, "SELECT count(*) FROM responses") == [(4,)]
    assert rows(db, "SELECT count(*), sum(responses) FROM usage") == [(2, 4)]
