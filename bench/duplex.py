"""Full-duplex sessions at real time: the batched engine vs a one-session-at-a-time engine, in one run.

For each engine mode a real server runs in a subprocess; for each session count N, N real websocket
clients on loopback stream microphone audio in real time (40 ms chunks) while the server speaks to all
of them. Reported per (mode, N):

* step time p50 / p99 (one engine tick, all sessions) and the real-time factor (mean step / frame);
* dropped frames: audio frames that reached the client after their playout deadline (a 3-frame jitter
  buffer anchored at the response's first frame), plus ticks the server skipped because it overran;
* real time = audio reached the clients, p99 step under one frame period and no dropped frames (a
  point where no frame arrived within the window, because the first audio came later, is not real time).

The baseline ("sequential") steps every session with its own model call, as a server that handles one
conversation at a time must; the batched engine runs one call for all.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import websockets

FRAME_MS = 40.0
WIRE_RATE = 24000
CHUNK = WIRE_RATE * 40 // 1000
JITTER_FRAMES = 3
LONG_TEXT = ("The quick brown fox jumps over the lazy dog while the server keeps listening to every word "
             "you say, and it stops talking the moment you interrupt it.")


@dataclass
class Row:
    mode: str
    sessions: int
    step_ms_p50: float
    step_ms_p99: float
    rtf: float
    batch_mean: float
    frames_received: int
    dropped_frames: int
    realtime: bool


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


class ServerProcess:
    def __init__(self, mode: str, capacity: int, device: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "realtime", "serve", "--port", str(self.port), "--capacity", str(capacity),
               "--engine-mode", mode, "--device", device, "--log-level", "warning",
               # the voice alone: no vision or 3D models, no demos (they would only slow the start), and the
               # bench's text spoken as it is: the default chat LM would write the answer first (its first
               # sentence can take a whole window on a busy CPU) and the ASR would transcribe the mic noise
               "--vision-model", "none", "--point-model", "none", "--no-demo", "--db", "none",
               "--chat-model", "echo", "--asr-model", "none"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if _get(f"{self.url}/readyz")["ready"]:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become ready")
            time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def _session(ws_url: str, seconds: float, seed: int, stop_at: float) -> tuple[int, int]:
    """One client: speak-to-me requests back to back, mic streaming all along. Returns (frames, late)."""
    rng = np.random.default_rng(seed)
    received = late = 0
    anchor: float | None = None
    k = 0
    async with websockets.connect(ws_url, max_size=8 * 1024 * 1024) as ws:
        first = json.loads(await ws.recv())
        if first["type"] != "session.created":
            raise RuntimeError(f"session refused: {first}")

        async def ask() -> None:
            await ws.send(json.dumps({"type": "response.create", "response": {"instructions": LONG_TEXT}}))

        async def mic() -> None:
            start = time.monotonic()
            i = 0
            while time.monotonic() < stop_at:
                x = (rng.standard_normal(CHUNK) * 300).astype("<i2").tobytes()
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(x).decode()}))
                i += 1
                await asyncio.sleep(max(0.0, start + i * FRAME_MS / 1000 - time.monotonic()))

        await ask()
        mic_task = asyncio.create_task(mic())
        try:
            while True:
                remaining = stop_at - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    raw = await asyncio.wait_for(ws.recv(), remaining)
                except TimeoutError:
                    break
                ev = json.loads(raw)
                t = ev["type"]
                if t == "response.output_audio.delta":
                    now = time.monotonic()
                    if anchor is None:
                        anchor, k = now + JITTER_FRAMES * FRAME_MS / 1000, 0
                    elif now > anchor + k * FRAME_MS / 1000:
                        late += 1
                    k += 1
                    received += 1
                elif t == "response.done":
                    if ev["response"]["status"] == "failed":
                        raise RuntimeError(f"the server failed a response: {ev['response']['status_details']}")
                    anchor = None
                    await ask()
        finally:
            mic_task.cancel()
    return received, late


async def _run_clients(ws_url: str, n: int, seconds: float) -> tuple[int, int]:
    stop_at = time.monotonic() + seconds
    results = await asyncio.gather(*(_session(ws_url, seconds, i, stop_at) for i in range(n)))
    return sum(r[0] for r in results), sum(r[1] for r in results)


def _wait_idle(url: str, timeout: float = 60.0) -> None:
    """Wait until the previous point's sessions have left (an overloaded engine frees slots late)."""
    deadline = time.monotonic() + timeout
    while _get(f"{url}/readyz")["sessions"] and time.monotonic() < deadline:
        time.sleep(0.1)


def is_realtime(step_ms_p99: float, frame_ms: float, dropped: int, frames_received: int) -> bool:
    return frames_received > 0 and dropped == 0 and step_ms_p99 < frame_ms


def run_mode(mode: str, counts: list[int], seconds: float, device: str) -> list[Row]:
    server = ServerProcess(mode, max(counts), device)
    rows = []
    try:
        for n in counts:
            _wait_idle(server.url)
            asyncio.run(_run_clients(f"ws://127.0.0.1:{server.port}/v1/realtime", n, min(2.0, seconds)))  # warm-up
            _wait_idle(server.url)
            _get(f"{server.url}/v1/engine/stats?reset=1")
            frames, late = asyncio.run(_run_clients(f"ws://127.0.0.1:{server.port}/v1/realtime", n, seconds))
            s = _get(f"{server.url}/v1/engine/stats")
            dropped = late + s["dropped_ticks"] * n
            rows.append(Row(
                mode=mode, sessions=n, step_ms_p50=s["step_ms_p50"], step_ms_p99=s["step_ms_p99"],
                rtf=s["step_ms_mean"] / s["frame_ms"], batch_mean=s["batch_mean"], frames_received=frames,
                dropped_frames=dropped, realtime=is_realtime(s["step_ms_p99"], s["frame_ms"], dropped, frames),
            ))
            print(_fmt(rows[-1]), flush=True)
    finally:
        server.close()
    return rows


HEADER = f"{'engine':<11}{'sessions':>9}{'p50 ms':>9}{'p99 ms':>9}{'RTF':>7}{'batch':>7}{'frames':>8}{'dropped':>9}  real time"


def _fmt(r: Row) -> str:
    return (f"{r.mode:<11}{r.sessions:>9}{r.step_ms_p50:>9.2f}{r.step_ms_p99:>9.2f}{r.rtf:>7.2f}{r.batch_mean:>7.1f}"
            f"{r.frames_received:>8}{r.dropped_frames:>9}  {'yes' if r.realtime else 'no'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench duplex", description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", default="1,4,16,64", help="comma-separated session counts")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per session count")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--modes", default="batched,sequential")
    p.add_argument("--quick", action="store_true", help="sessions 1,4 for 3 s each (under a minute on a CPU)")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--plot", type=Path, help="draw the figures as a PNG here")
    args = p.parse_args(argv)
    counts = [1, 4] if args.quick else [int(x) for x in args.sessions.split(",")]
    seconds = 3.0 if args.quick else args.seconds
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"duplex benchmark on {device_name}: {seconds:g} s per point, frame {FRAME_MS:g} ms\n{HEADER}", flush=True)
    rows: list[Row] = []
    for mode in args.modes.split(","):
        rows += run_mode(mode, counts, seconds, device)
    best = {m: max([r.sessions for r in rows if r.mode == m and r.realtime], default=0) for m in args.modes.split(",")}
    print("\nlargest real-time session count: " + ", ".join(f"{m} {n}" for m, n in best.items()))
    ratios = {}
    if "batched" in best and "sequential" in best:
        for n in counts:
            b = next(r for r in rows if r.mode == "batched" and r.sessions == n)
            s = next(r for r in rows if r.mode == "sequential" and r.sessions == n)
            ratios[n] = s.step_ms_p50 / b.step_ms_p50 if b.step_ms_p50 else float("nan")
        print("step-time ratio sequential/batched (p50): " + ", ".join(f"{n}: {v:.2f}x" for n, v in ratios.items()))
        if best["sequential"]:
            print(f"real-time sessions ratio batched/sequential: {best['batched'] / best['sequential']:.2f}x")
    figures = {
        "device": device_name, "frame_ms": FRAME_MS, "seconds": seconds,
        "rows": [asdict(r) for r in rows], "max_realtime_sessions": best,
        "step_ratio_sequential_over_batched": ratios,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        from bench.plots import plot_duplex

        plot_duplex(figures, args.plot)
        print(f"wrote {args.plot}")
    return 0
