"""The command line: the client round-trips a wav through a real server; serve --help documents flags."""

from __future__ import annotations

import subprocess
import sys
import wave

import numpy as np

from realtime.client import read_wav, write_wav


def test_client_cli_round_trips_a_wav(make_server, tmp_path):
    srv = make_server()
    t = np.arange(16000 * 1) / 16000
    mic = (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    src = tmp_path / "mic.wav"
    write_wav(src, mic, rate=16000)  # 16 kHz in: the client resamples to the 24 kHz wire rate
    out = tmp_path / "reply.wav"
    proc = subprocess.run(
        [sys.executable, "-m", "realtime", "client", "--url", srv.ws_url, "--say", "hello from the cli",
         "--listen", str(src), "--output", str(out), "--max-output-tokens", "10"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "response incomplete" in proc.stdout
    with wave.open(str(out)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        assert w.getnframes() == 10 * 960
    assert read_wav(out).shape == (9600,)
    assert srv.engine.metrics.frames._value.get() >= 10


def test_serve_help_lists_the_flags():
    proc = subprocess.run([sys.executable, "-m", "realtime", "serve", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0
    for flag in ("--host", "--port", "--device", "--api-key", "--capacity", "--engine-mode"):
        assert flag in proc.stdout


def test_client_reports_a_refused_connection(tmp_path):
    from tests.conftest import free_port

    proc = subprocess.run(
        [sys.executable, "-m", "realtime", "client", "--url", f"ws://127.0.0.1:{free_port()}/v1/realtime",
         "--say", "x", "--output", str(tmp_path / "o.wav"), "--timeout", "5"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
