"""Load, soak and faults: sessions at the admitted capacity lose no frame while more are refused and memory
stays flat; a client that vanishes, a model step that raises, and a device out of memory each fail only
what they touch.

No assertion here depends on how fast this machine is: the soak counts frames (every frame the server
spoke arrives), refusals and bytes, never latencies.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import urllib.request

import numpy as np
import pytest
import torch
import websockets

from tests.conftest import run
from tests.test_hardening_support import ServerProcess, rss_bytes, steady_tiny_model
from tests.test_server_e2e import FRAME_WIRE, Conn, append, user_text

SOAK_SECONDS = float(os.environ.get("RT_SOAK_SECONDS", "20"))  # raise it for a longer soak by hand


def metric(text: str, name: str) -> float:
    """The value of one sample line of a Prometheus text page (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


async def mic_forever(conn: Conn, stop: asyncio.Event) -> None:
    """Microphone audio in real time (quiet noise), the way a full-duplex client sends it all along."""
    rng = np.random.default_rng(0)
    loop = asyncio.get_running_loop()
    t0, n = loop.time(), 0
    while not stop.is_set():
        await conn.send(append((rng.standard_normal(FRAME_WIRE) * 0.001).astype(np.float32)))
        n += 1
        await asyncio.sleep(max(0.0, t0 + n * 0.04 - loop.time()))


# ------------------------------------------------------------------ load and soak
@pytest.mark.slow
def test_soak_at_capacity_drops_no_frame_refuses_the_rest_and_memory_stays_flat(tmp_path):
    capacity, frames = 6, 25
    srv = ServerProcess(tmp_path, "--capacity", str(capacity), "--db", str(tmp_path / "r.db"))
    try:
        srv.wait_ready()

        async def one(i: int, end: float, stop: asyncio.Event) -> list[tuple[str, int, int]]:
            conn = await Conn.open(srv.ws_url)
            mic = asyncio.create_task(mic_forever(conn, stop))
            out = []
            loop = asyncio.get_running_loop()
            while loop.time() < end:
                await conn.send(user_text(f"session {i} response {len(out)}"))
                await conn.send({"type": "response.create", "response": {"max_output_tokens": frames}})
                done = await conn.until("response.done", timeout=120)
                rid = done["response"]["id"]
                got = sum(1 for e in conn.seen if isinstance(e, dict) and e.get("response_id") == rid
                          and e["type"] == "response.output_audio.delta")
                out.append((done["response"]["status"], got, done["response"]["audio_duration_ms"] // 40))
                conn.seen.clear()
            stop.set()
            await mic
            await conn.ws.close()
            return out

        async def refused() -> tuple[str, int]:
            ws = await websockets.connect(srv.ws_url)
            first = json.loads(await ws.recv())
            with pytest.raises(websockets.ConnectionClosed) as e:
                await ws.recv()
            return first["error"]["code"], e.value.rcvd.code

        async def scenario():
            loop = asyncio.get_running_loop()
            stop = asyncio.Event()
            end = loop.time() + SOAK_SECONDS
            sessions = [asyncio.create_task(one(i, end, stop)) for i in range(capacity)]
            while srv_sessions() < capacity:
                await asyncio.sleep(0.1)
            beyond = [await refused() for _ in range(3)]
            rss = []
            while not all(t.done() for t in sessions):
                rss.append(rss_bytes(srv.pid))
                await asyncio.sleep(1.0)
            return [await t for t in sessions], beyond, rss

        def srv_sessions() -> int:
            with urllib.request.urlopen(f"{srv.http_url}/readyz", timeout=10) as r:
                return json.loads(r.read())["sessions"]

        results, beyond, rss = run(scenario())
        page = urllib.request.urlopen(f"{srv.http_url}/metrics", timeout=10).read().decode()
        stats = json.loads(urllib.request.urlopen(f"{srv.http_url}/v1/engine/stats", timeout=10).read())
    finally:
        srv.terminate()
        srv.wait(60)
        srv.close()

    responses = [r for rs in results for r in rs]
    print(f"\nsoak: {capacity} sessions x {SOAK_SECONDS:g} s, {len(responses)} responses of {frames} frames; "
          f"late engine ticks {stats['dropped_ticks']} of {stats['ticks']}, step p99 {stats['step_ms_p99']:.2f} ms; "
          f"RSS {rss[0] / 2**20:.0f} -> {max(rss) / 2**20:.0f} -> {rss[-1] / 2**20:.0f} MiB")
    assert all(len(rs) >= 2 for rs in results)  # every session was served all along
    assert responses == [("incomplete", frames, frames)] * len(responses)  # every frame spoken arrived
    assert beyond == [("session_limit_reached", 1013)] * 3
    assert metric(page, 'realtime_refusals_total{reason="capacity"}') == 3
    assert metric(page, "realtime_input_overflow_frames_total") == 0  # real-time microphones never overflow
    assert metric(page, 'realtime_responses_total{status="incomplete"}') == len(responses)
    assert metric(page, "realtime_store_commits_total") >= len(responses)
    # memory is flat: after the first seconds of warm-up, no steady growth
    warm = rss[min(3, len(rss) - 1):]
    assert max(warm) - warm[0] < 48 * 2**20, [r // 2**20 for r in rss]
    with sqlite3.connect(tmp_path / "r.db") as db:
        assert db.execute("SELECT count(*) FROM responses").fetchone()[0] == len(responses)


# ------------------------------------------------------------------ faults
def test_a_client_that_vanishes_mid_response_costs_nothing_to_the_others(make_server, tmp_path):
    db = tmp_path / "r.db"
    srv = make_server(model=steady_tiny_model(2), capacity=2, db=str(db))

    async def scenario():
        stays = await Conn.open(srv.ws_url)
        gone = await Conn.open(srv.ws_url)
        await gone.send(user_text("I will vanish"))
        await gone.send({"type": "response.create"})
        await gone.until("response.output_audio.delta")
        await stays.send(user_text("I stay"))
        await stays.send({"type": "response.create", "response": {"max_output_tokens": 40}})
        await stays.until("response.output_audio.delta")
        gone.ws.transport.abort()  # no close handshake, mid-response, while the other speaks
        done = await stays.until("response.done", timeout=60)
        deltas = [e for e in stays.seen if isinstance(e, dict) and e["type"] == "response.output_audio.delta"]
        await stays.ws.close()
        return done, len(deltas)

    done, n = run(scenario())
    assert done["response"]["status"] == "incomplete" and n == 40
    srv.stop()
    with sqlite3.connect(db) as conn:
        ends = sorted(r for (r,) in conn.execute("SELECT end_reason FROM usage"))
        responses = conn.execute("SELECT status FROM responses").fetchall()
    assert ends == ["client_closed", "client_closed"]
    assert responses == [("incomplete",)]  # the vanished one never finished: nothing claims it did


class FlakyStep:
    """Wraps a model's step; ``arm(exc)`` makes the next call raise ``exc`` once (one bad engine tick)."""

    def __init__(self, model) -> None:
        self.model, self.real = model, model.step
        self.exc: BaseException | None = None
        self.raised = 0
        model.step = self

    def arm(self, exc: BaseException) -> None:
        self.exc = exc

    def __call__(self, lo, hi, audio):
        if self.exc is not None:
            exc, self.exc = self.exc, None
            self.raised += 1
            raise exc
        return self.real(lo, hi, audio)


@pytest.mark.parametrize("exc", [
    RuntimeError("simulated kernel failure"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)"),
], ids=["raises", "out_of_memory"])
def test_a_failing_model_step_fails_the_responses_in_it_and_everything_goes_on(make_server, exc):
    model = steady_tiny_model(3)
    flaky = FlakyStep(model)
    srv = make_server(model=model, capacity=3)

    async def scenario():
        speaking = await Conn.open(srv.ws_url)
        listening = await Conn.open(srv.ws_url)
        stop = asyncio.Event()
        mic = asyncio.create_task(mic_forever(listening, stop))  # in the same batched steps, not speaking
        await speaking.send(user_text("this answer meets a failing step"))
        await speaking.send({"type": "response.create"})
        await speaking.until("response.output_audio.delta")
        flaky.arm(exc)
        failed = await speaking.until("response.done", timeout=60)
        # the session that was only listening was not touched, and both go on speaking
        results = []
        for conn in (listening, speaking):
            await conn.send(user_text("and now?"))
            await conn.send({"type": "response.create", "response": {"max_output_tokens": 5}})
            results.append((await conn.until("response.done", timeout=60))["response"]["status"])
        stop.set()
        await mic
        errors = [e for c in (speaking, listening) for e in c.seen if isinstance(e, dict) and e["type"] == "error"]
        for c in (speaking, listening):
            await c.ws.close()
        return failed, results, errors

    failed, results, errors = run(scenario())
    assert flaky.raised == 1
    assert failed["response"]["status"] == "failed"
    assert failed["response"]["status_details"]["reason"] == f"the voice model failed: {type(exc).__name__}"
    assert results == ["incomplete", "incomplete"]
    assert errors == []  # a failed response is reported by its response.done, not as a protocol error
    page = urllib.request.urlopen(f"{srv.http_url}/metrics").read().decode()
    assert metric(page, "realtime_step_failures_total") == 1
    assert metric(page, 'realtime_responses_total{status="failed"}') == 1
    assert json.loads(urllib.request.urlopen(f"{srv.http_url}/readyz").read())["ready"] is True
