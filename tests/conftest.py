"""Shared fixtures: a real server on a free loopback port, running in a thread of the test process."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import uvicorn

from realtime.app import create_app
from realtime.config import Settings
from speech.config import VoiceModelConfig
from speech.duplex import DuplexVoiceModel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    app: object
    port: int
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def engine(self):
        return self.app.state.engine

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def tiny_model(capacity: int, seed: int = 0) -> DuplexVoiceModel:
    return DuplexVoiceModel(VoiceModelConfig.tiny(), capacity=capacity, seed=seed)


def start_server(settings: Settings, model=None, dialogue=None, vision=None) -> RunningServer:
    port = free_port()
    settings.port = port
    app = create_app(settings, model=model, dialogue=dialogue, vision=vision)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, ws="websockets-sansio", ws_max_size=settings.max_message_bytes,
        log_level="warning", lifespan="on",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    return RunningServer(app, port, server, thread)


@pytest.fixture
def make_server() -> Iterator[Callable[..., RunningServer]]:
    started: list[RunningServer] = []

    def factory(model=None, dialogue=None, vision=None, **settings_kw) -> RunningServer:
        settings = Settings(**settings_kw)
        if model is None:
            model = tiny_model(settings.capacity)
        srv = start_server(settings, model, dialogue, vision)
        started.append(srv)
        return srv

    yield factory
    for srv in started:
        srv.stop()


def run(coro):
    """Run a coroutine in a fresh event loop (tests stay plain functions)."""
    return asyncio.run(coro)
