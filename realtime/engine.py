"""The engine loop: the one owner of the voice model and the device.

A dedicated thread ticks once per codec frame (40 ms). Each tick it
1. applies the commands sessions queued (open, close, speak, cancel),
2. gathers every live session's newest microphone frame into one preallocated batch,
3. runs ONE batched model step for all live sessions (``batched=False`` steps them one at a time, the
   way a one-conversation server does, as the benchmark's baseline),
4. resamples the spoken frames to the wire rate in one batched call and hands the results to the
   asyncio loop with one ``call_soon_threadsafe``.

Sessions never touch the model: they talk to the engine through thread-safe methods. Live sessions
occupy slots ``[0, n)``; a closing session's slot is filled by the last one, so each step works on views.
Admission is decided at ``open`` from a reserved count, so a session beyond capacity is refused at
once and never slows the others.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from realtime.audio import StreamingResampler
from realtime.metrics import Metrics

log = logging.getLogger(__name__)

# model step events (the model's contract, see realtime.model_api)
EV_LISTEN, EV_AUDIO, EV_EOS, EV_IRQ, EV_LIMIT = 0, 1, 2, 3, 4


class VoiceModel(Protocol):
    """The narrow step interface ``realtime`` needs from a full-duplex voice model (speech.duplex)."""

    capacity: int
    sample_rate: int
    frame_size: int
    device: torch.device
    weights_note: str
    max_text_chars: int  # the longest text one start_speaking takes (UTF-8 bytes)

    def reset_slot(self, slot: int) -> None: ...
    def move_slot(self, src: int, dst: int) -> None: ...
    def start_speaking(self, slot: int, text: str) -> None: ...
    def stop_speaking(self, slot: int) -> None: ...
    def max_speech_frames(self, slot: int) -> int: ...
    def step(self, lo: int, hi: int, audio_in: torch.Tensor) -> Any: ...


class EngineSink(Protocol):
    """What a session offers the engine; called on the session's asyncio loop."""

    def on_engine_event(self, kind: str, response_id: str | None, payload: Any) -> None: ...


@dataclass
class EngineConfig:
    capacity: int = 16
    batched: bool = True
    wire_rate: int = 24000
    max_input_backlog_s: float = 2.0

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError("capacity must be >= 1")
        if self.wire_rate <= 0:
            raise ValueError("wire_rate must be positive")


class InputRing:
    """Microphone samples of one session at the model rate: written by asyncio, read by the engine."""

    def __init__(self, capacity: int) -> None:
        self._buf = np.zeros(capacity, dtype=np.float32)
        self._start = 0
        self._size = 0
        self._lock = threading.Lock()

    def push(self, x: np.ndarray) -> int:
        """Append samples; returns how many old samples were dropped to make room."""
        with self._lock:
            cap = self._buf.shape[0]
            if x.shape[0] >= cap:
                dropped = self._size + x.shape[0] - cap
                self._buf[:] = x[-cap:]
                self._start, self._size = 0, cap
                return dropped
            dropped = max(0, self._size + x.shape[0] - cap)
            if dropped:
                self._start = (self._start + dropped) % cap
                self._size -= dropped
            end = (self._start + self._size) % cap
            first = min(x.shape[0], cap - end)
            self._buf[end : end + first] = x[:first]
            self._buf[: x.shape[0] - first] = x[first:]
            self._size += x.shape[0]
            return dropped

    def pop_into(self, out: np.ndarray) -> bool:
        """Fill ``out`` with the oldest samples if a whole frame is there; else leave it and say False."""
        n = out.shape[0]
        with self._lock:
            if self._size < n:
                return False
            cap = self._buf.shape[0]
            first = min(n, cap - self._start)
            out[:first] = self._buf[self._start : self._start + first]
            out[first:] = self._buf[: n - first]
            self._start = (self._start + n) % cap
            self._size -= n
            return True

    def clear(self) -> None:
        with self._lock:
            self._start = self._size = 0

    @property
    def size(self) -> int:
        return self._size


@dataclass(eq=False)
class SessionHandle:
    """The engine's view of one session. ``slot`` changes when slots are packed."""

    sink: EngineSink
    loop: asyncio.AbstractEventLoop
    input: InputRing
    slot: int = -1
    response_id: str | None = None
    frames_left: int = 0
    closed: bool = False
    opened: bool = False
    frames_stepped: int = 0


@dataclass
class EngineStats:
    step_ms: deque = field(default_factory=lambda: deque(maxlen=8192))
    batch: deque = field(default_factory=lambda: deque(maxlen=8192))
    ticks: int = 0
    dropped_ticks: int = 0
    max_batch: int = 0

    def summary(self) -> dict[str, float]:
        steps = np.asarray(self.step_ms, dtype=np.float64)
        batches = np.asarray(self.batch, dtype=np.float64)
        pct = (lambda q: float(np.percentile(steps, q))) if steps.size else (lambda q: 0.0)
        return {
            "ticks": self.ticks,
            "dropped_ticks": self.dropped_ticks,
            "step_ms_p50": pct(50),
            "step_ms_p99": pct(99),
            "step_ms_mean": float(steps.mean()) if steps.size else 0.0,
            "batch_mean": float(batches.mean()) if batches.size else 0.0,
            "max_batch": self.max_batch,
        }


class Engine:
    def __init__(self, model: VoiceModel, cfg: EngineConfig, metrics: Metrics | None = None) -> None:
        if cfg.capacity > model.capacity:
            raise ValueError(f"engine capacity {cfg.capacity} exceeds the model's slots ({model.capacity})")
        self.model = model
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.frame_size = model.frame_size
        self.frame_period = model.frame_size / model.sample_rate
        self.stats = EngineStats()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._live: list[SessionHandle] = []
        self._reserved = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._running = threading.Event()
        self._wake = threading.Event()
        self._error: BaseException | None = None
        dev = model.device
        self._audio_host = torch.zeros(cfg.capacity, self.frame_size, pin_memory=dev.type == "cuda")
        self._audio_np = self._audio_host.numpy()
        self._audio_dev = torch.zeros(cfg.capacity, self.frame_size, device=dev)
        self.out_resampler = StreamingResampler(model.sample_rate, cfg.wire_rate, cfg.capacity, dev)
        self.wire_frame = self.frame_size * cfg.wire_rate // model.sample_rate
        backlog = int(cfg.max_input_backlog_s * model.sample_rate) // self.frame_size * self.frame_size
        self._input_capacity = max(backlog, 2 * self.frame_size)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._running.set()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._running.clear()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def reset_stats(self) -> None:
        """Start a fresh measurement window (benchmarks); the engine thread appends to the new one."""
        self.stats = EngineStats()

    @property
    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    @property
    def live_sessions(self) -> int:
        with self._lock:
            return self._reserved

    # ------------------------------------------------------------------ session API (any thread)
    def open(self, sink: EngineSink, loop: asyncio.AbstractEventLoop) -> SessionHandle | None:
        """Reserve a slot, or return None when the engine is full (the caller refuses the session)."""
        with self._lock:
            if self._reserved >= self.cfg.capacity:
                return None
            self._reserved += 1
        handle = SessionHandle(sink=sink, loop=loop, input=InputRing(self._input_capacity))
        self._post("open", handle)
        return handle

    def close(self, handle: SessionHandle) -> None:
        if handle.closed:
            return
        handle.closed = True
        self._post("close", handle)

    def push_audio(self, handle: SessionHandle, samples: np.ndarray) -> None:
        """Microphone samples at the model rate (float32)."""
        dropped = handle.input.push(samples)
        if dropped:
            self.metrics.input_overflows.inc(dropped // self.frame_size or 1)

    def clear_audio(self, handle: SessionHandle) -> None:
        handle.input.clear()

    def speak(self, handle: SessionHandle, response_id: str, text: str, max_frames: int | None) -> None:
        self._post("speak", handle, response_id, text, max_frames)

    def cancel(self, handle: SessionHandle, response_id: str) -> None:
        self._post("cancel", handle, response_id)

    def _post(self, *cmd: Any) -> None:
        self._commands.put(cmd)
        self._wake.set()

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        deadline = time.perf_counter()
        try:
            while self._running.is_set():
                self._apply_commands()
                if not self._live:
                    self._wake.wait(0.5)
                    self._wake.clear()
                    deadline = time.perf_counter()
                    continue
                t0 = time.perf_counter()
                self._tick()
                dt = time.perf_counter() - t0
                self.stats.step_ms.append(dt * 1e3)
                self.metrics.step_seconds.observe(dt)
                deadline += self.frame_period
                now = time.perf_counter()
                if now > deadline + self.frame_period:
                    # overran: the frames we could not step in time are dropped, not queued up
                    missed = int((now - deadline) / self.frame_period)
                    self.stats.dropped_ticks += missed
                    self.metrics.frames_dropped.inc(missed * len(self._live))
                    deadline = now
                elif deadline > now:
                    self._wake.wait(deadline - now)
                    self._wake.clear()
        except BaseException as e:  # the loop must never die silently
            self._error = e
            log.exception("engine loop crashed")
            for h in list(self._live):
                self._emit([(h, "fatal", None, f"engine failure: {e}")])
            raise

    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            kind, handle, *args = cmd
            try:
                getattr(self, f"_cmd_{kind}")(handle, *args)
            except Exception as e:
                log.exception("engine command %s failed", kind)
                self._emit([(handle, "error", args[0] if args else None, str(e))])

    def _cmd_open(self, h: SessionHandle) -> None:
        if h.closed:  # closed before it was ever placed
            with self._lock:
                self._reserved -= 1
            return
        h.slot = len(self._live)
        self._live.append(h)
        self.model.reset_slot(h.slot)
        self.out_resampler.reset(h.slot)
        h.opened = True

    def _cmd_close(self, h: SessionHandle) -> None:
        if not h.opened:
            return  # the open command will see it closed
        last = self._live[-1]
        if last is not h:
            self.model.move_slot(last.slot, h.slot)
            self.out_resampler.move(last.slot, h.slot)
            self._live[h.slot] = last
            last.slot = h.slot
        self._live.pop()
        self.model.reset_slot(len(self._live))
        h.opened = False
        with self._lock:
            self._reserved -= 1

    def _cmd_speak(self, h: SessionHandle, response_id: str, text: str, max_frames: int | None) -> None:
        if not h.opened:
            return
        if h.response_id is not None:
            self._finish(h, "cancelled")
        try:
            self.model.start_speaking(h.slot, text)
        except ValueError as e:
            self._emit([(h, "done", response_id, ("failed", str(e)))])
            return
        self.out_resampler.reset(h.slot)
        h.response_id = response_id
        limit = self.model.max_speech_frames(h.slot)
        h.frames_left = limit if max_frames is None else min(limit, max_frames)

    def _cmd_cancel(self, h: SessionHandle, response_id: str) -> None:
        if h.opened and h.response_id == response_id:
            self._finish(h, "cancelled")

    def _finish(self, h: SessionHandle, status: str, out: list | None = None) -> None:
        self.model.stop_speaking(h.slot)
        item = (h, "done", h.response_id, (status, None))
        h.response_id = None
        if out is None:
            self._emit([item])
        else:
            out.append(item)

    def _tick(self) -> None:
        live = self._live
        n = len(live)
        underruns = 0
        for i, h in enumerate(live):
            if not h.input.pop_into(self._audio_np[i]):
                self._audio_np[i] = 0.0
                underruns += 1
        if underruns:
            self.metrics.input_underruns.inc(underruns)
        self._audio_dev[:n].copy_(self._audio_host[:n], non_blocking=True)
        try:
            if self.cfg.batched:
                results = [(0, self.model.step(0, n, self._audio_dev[:n]))]
            else:
                results = [(i, self.model.step(i, i + 1, self._audio_dev[i : i + 1])) for i in range(n)]
        except Exception as e:  # e.g. device out of memory: fail what was running, keep serving
            self._step_failed(e)
            return
        self.stats.ticks += 1
        self.stats.batch.append(n)
        self.stats.max_batch = max(self.stats.max_batch, n)
        self.metrics.frames.inc(n)
        self.metrics.batch_size.observe(n)
        out: list = []
        for lo, res in results:
            events = res.events
            if not (events != EV_LISTEN).any():
                continue
            wire = self.out_resampler.process(res.audio, lo).cpu().numpy()
            for j, ev in enumerate(events):
                if ev == EV_LISTEN:
                    continue
                h = live[lo + j]
                if h.response_id is None:
                    continue
                if ev == EV_AUDIO or ev == EV_LIMIT:
                    out.append((h, "audio", h.response_id, wire[j]))
                    h.frames_left -= 1
                    if ev == EV_LIMIT or h.frames_left <= 0:
                        self._finish(h, "incomplete", out)
                elif ev == EV_EOS:
                    self._finish(h, "completed", out)
                elif ev == EV_IRQ:
                    self.metrics.interruptions.inc()
                    out.append((h, "irq", h.response_id, None))
                    self._finish(h, "interrupted", out)
        for h in live:
            h.frames_stepped += 1
        if out:
            self._emit(out)

    def _step_failed(self, err: Exception) -> None:
        log.exception("model step failed; failing the running responses")
        self.metrics.step_failures.inc()
        if isinstance(err, torch.OutOfMemoryError) and self.model.device.type == "cuda":
            torch.cuda.empty_cache()
        out: list = []
        for h in self._live:
            if h.response_id is not None:
                rid = h.response_id
                self.model.stop_speaking(h.slot)
                h.response_id = None
                out.append((h, "done", rid, ("failed", f"the voice model failed: {type(err).__name__}")))
        if out:
            self._emit(out)

    def _emit(self, items: list) -> None:
        """Hand results to the sessions' loops: one callback per loop per tick."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for item in items:
            by_loop.setdefault(item[0].loop, []).append(item)
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_dispatch, batch)
            except RuntimeError:  # loop closed: its sessions are gone
                pass


def _dispatch(batch: list) -> None:
    for h, kind, rid, payload in batch:
        if not h.closed:
            h.sink.on_engine_event(kind, rid, payload)
