"""Graceful drain: on SIGTERM stop taking new work, let live sessions finish, close the rest at a deadline.

Why not in the app's lifespan: uvicorn runs the lifespan shutdown only *after* it has closed every
websocket (with 1012, mid-sentence). So the drain runs first, from the server's own loop:
``DrainingServer`` turns the first SIGTERM/SIGINT into ``Drain.run`` and tells uvicorn to exit only once
the sessions are gone (a second signal exits at once). Embedders that run the app another way
(Ray Serve, a test) call ``await app.state.drain.run(seconds)`` themselves before stopping the server.

While draining: ``/readyz`` answers 503 (load balancers stop sending), a new websocket gets an
``error`` event ``server_shutting_down`` and close 1001, HTTP routes behind ``require_key`` answer 503,
and each live session finishes the response it is speaking, then gets the same error and close 1001.
Sessions still busy at the deadline have their response cancelled (reason ``server_shutting_down``)
and are closed the same way.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType
from typing import Protocol

import uvicorn

from realtime.auth import Authenticator
from realtime.metrics import Metrics

log = logging.getLogger(__name__)


class Drainable(Protocol):
    def begin_drain(self) -> None: ...  # close after the response in flight (now if none)
    def force_close(self) -> None: ...  # close now


class Drain:
    """The live sessions, and the one-way switch to draining."""

    def __init__(self, auth: Authenticator, metrics: Metrics) -> None:
        self.auth, self.metrics = auth, metrics
        self.sessions: set[Drainable] = set()
        self._task: asyncio.Task | None = None

    @property
    def draining(self) -> bool:
        return self.auth.draining

    def add(self, session: Drainable) -> None:
        self.sessions.add(session)
        if self.draining:  # admitted in the instant the drain began
            session.begin_drain()

    def discard(self, session: Drainable) -> None:
        self.sessions.discard(session)

    async def run(self, seconds: float) -> None:
        """Drain within ``seconds``; returns once every session is closed (a few seconds' grace after)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(seconds))
        await asyncio.shield(self._task)

    async def _run(self, seconds: float) -> None:
        self.auth.draining = True
        self.metrics.draining.set(1)
        log.info("draining: %d live sessions, deadline %.1f s", len(self.sessions), seconds)
        for s in list(self.sessions):
            s.begin_drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self.sessions and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.sessions:
            log.info("drain deadline: closing %d sessions that are still speaking", len(self.sessions))
            for s in list(self.sessions):
                s.force_close()
        grace = loop.time() + 5.0  # their close handshakes
        while self.sessions and loop.time() < grace:
            await asyncio.sleep(0.05)
        log.info("drained")


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose first SIGTERM/SIGINT drains the app before the usual shutdown."""

    def __init__(self, config: uvicorn.Config, drain: Drain, seconds: float) -> None:
        super().__init__(config)
        self.drain, self.drain_seconds = drain, seconds
        self._drain_requested: str | None = None  # the signal's name
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_requested:  # a second signal: the usual (immediate) shutdown
            super().handle_exit(sig, frame)
            return
        self._drain_requested = signal.Signals(sig).name  # a signal handler: only a flag; on_tick acts

    async def on_tick(self, counter: int) -> bool:
        if self._drain_requested and self._drain_task is None:
            log.info("%s: draining for up to %.1f s (signal again to stop now)",
                     self._drain_requested, self.drain_seconds)
            self._drain_task = asyncio.get_running_loop().create_task(self.drain.run(self.drain_seconds))
        if self._drain_task is not None and self._drain_task.done():
            self.should_exit = True
        return await super().on_tick(counter)
