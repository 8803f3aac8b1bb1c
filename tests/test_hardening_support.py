"""Helpers of the hardening tests (no tests here): the real CLI server as a subprocess, with the tiny model.

Why a subprocess: SIGTERM, ``kill -9`` and memory are properties of a process; a server in a thread of
the test process cannot be signalled or weighed on its own. The subprocess runs exactly
``python -m realtime serve`` (flags, drain, record store), except that the voice model is the tiny test
model, so it starts in seconds, and its IRQ and EOS tokens are masked: a response always runs to
``max_output_tokens`` or to the model's limit (~10 s), whatever the random weights sample.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.conftest import free_port, tiny_model

REPO = Path(__file__).resolve().parent.parent

LAUNCHER = """
import sys
import realtime.app
from tests.test_hardening_support import steady_tiny_model
realtime.app.build_voice_model = lambda settings: steady_tiny_model(settings.capacity)
from realtime.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def steady_tiny_model(capacity: int):
    """The tiny test model with IRQ and EOS masked: it never interrupts itself nor ends a response early."""
    model = tiny_model(capacity)
    for token in (model.cfg.lslm.irq_id, model.cfg.lslm.eos_id):
        model.set_logit_bias(token, -1e4)
    return model


class ServerProcess:
    """``python -m realtime serve ARGS`` (tiny voice model, echo answers, no speech recognition)."""

    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.out_path = workdir / f"server-{self.port}.log"
        cmd = [sys.executable, "-c", LAUNCHER, "serve", "--port", str(self.port), "--chat-model", "echo",
               "--asr-model", "none", "--vision-model", "none", "--point-model", "none", "--no-demo",
               "--log-level", "info", *args]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_DATA_HOME": str(workdir / "xdg"), **(env or {})}
        self._out = open(self.out_path, "wb")  # a file, not a pipe: a chatty server never blocks on it
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=self._out, stderr=subprocess.STDOUT)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                return get(f"{self.http_url}/readyz")[1]
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.logs()}")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def logs(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.out_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._out.close()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """GET → (status, JSON body), also for error statuses."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")
