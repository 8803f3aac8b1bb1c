"""Units of realtime/: audio conversion and resampling, the protocol parser, settings, the engine loop."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch
import torchaudio

from realtime.audio import ChunkResampler, EnergyVAD, StreamingResampler, float_to_pcm16, pcm16_to_float
from realtime.config import Settings
from realtime.engine import Engine, EngineConfig, InputRing
from realtime.protocol import ErrorCode, ProtocolError, parse_client_event
from tests.conftest import tiny_model


@pytest.mark.parametrize("orig,new", [(24000, 16000), (16000, 24000), (16000, 16000)])
def test_streaming_resampler_equals_offline(orig, new):
    x = torch.randn(2, orig // 25 * 8)
    r = StreamingResampler(orig, new, rows=2)
    frame = orig // 25
    y = torch.cat([r.process(x[:, i * frame : (i + 1) * frame]) for i in range(8)], 1)
    full = x if orig == new else torchaudio.functional.resample(x, orig, new)
    lat = 0 if orig == new else r.latency_samples
    torch.testing.assert_close(y[:, lat:], full[:, : y.shape[1] - lat], atol=2e-6, rtol=1e-5)


def test_chunk_resampler_any_chunk_sizes():
    x = np.random.default_rng(0).standard_normal(24000).astype(np.float32) * 0.1
    c = ChunkResampler(24000, 16000)
    out, i = [], 0
    for size in [1, 2, 333, 960, 7, 5000, 17697]:
        out.append(c(x[i : i + size]))
        i += size
    y = np.concatenate(out)
    ref = torchaudio.functional.resample(torch.from_numpy(x), 24000, 16000).numpy()
    lat = c._r.latency_samples
    np.testing.assert_allclose(y[lat:], ref[: y.shape[0] - lat], atol=2e-6)


def test_pcm16_round_trip_and_odd_bytes():
    x = np.linspace(-1, 1, 101, dtype=np.float32)
    np.testing.assert_allclose(pcm16_to_float(float_to_pcm16(x)), x, atol=1 / 16000)
    with pytest.raises(ProtocolError) as e:
        pcm16_to_float(b"\x00\x01\x02")
    assert e.value.code == ErrorCode.INVALID_AUDIO


def test_energy_vad_hysteresis():
    vad = EnergyVAD(threshold=0.5, silence_ms=200)
    quiet, loud = np.zeros(960, np.float32), np.full(960, 0.3, np.float32)
    assert vad.update(quiet, 40) is None
    assert vad.update(loud, 40) == "started"
    assert vad.update(loud, 40) is None
    assert [vad.update(quiet, 40) for _ in range(5)] == [None, None, None, None, "stopped"]


def test_input_ring_wraps_and_drops_oldest():
    ring = InputRing(10)
    assert ring.push(np.arange(6, dtype=np.float32)) == 0
    out = np.zeros(4, np.float32)
    assert ring.pop_into(out) and list(out) == [0, 1, 2, 3]
    assert ring.push(np.arange(6, 14, dtype=np.float32)) == 0  # wraps around the end
    assert ring.push(np.arange(14, 16, dtype=np.float32)) == 2  # full: the two oldest go
    assert ring.pop_into(out) and list(out) == [6, 7, 8, 9]
    assert not InputRing(10).pop_into(out)


@pytest.mark.parametrize(
    "raw,code",
    [
        ("{not json", ErrorCode.INVALID_JSON),
        ("[1, 2]", ErrorCode.INVALID_EVENT),
        ('{"no_type": 1}', ErrorCode.INVALID_EVENT),
        ('{"type": "dance.start"}', ErrorCode.UNKNOWN_EVENT),
        ('{"type": "input_audio_buffer.append"}', ErrorCode.INVALID_EVENT),
        ('{"type": "input_audio_buffer.append", "audio": 5}', ErrorCode.INVALID_EVENT),
        ('{"type": "conversation.item.truncate", "item_id": "x", "audio_end_ms": -1}', ErrorCode.INVALID_EVENT),
        ('{"type": "conversation.item.create", "item": {"role": "robot", "content": []}}', ErrorCode.INVALID_EVENT),
    ],
)
def test_parser_rejects_with_codes(raw, code):
    with pytest.raises(ProtocolError) as e:
        parse_client_event(raw)
    assert e.value.code == code


def test_parser_accepts_ga_and_beta_session_shapes():
    ga = parse_client_event(json.dumps({"type": "session.update", "event_id": "e1", "session": {
        "type": "realtime", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                                               "turn_detection": {"type": "server_vad", "threshold": 0.6}}}}}))
    assert ga.session.audio.input.turn_detection.threshold == 0.6 and ga.event_id == "e1"
    beta = parse_client_event(json.dumps({"type": "session.update", "session": {
        "modalities": ["audio", "text"], "input_audio_format": "pcm16", "turn_detection": None}}))
    assert beta.session.turn_detection is None and "turn_detection" in beta.session.model_fields_set


def test_settings_from_env_and_overrides():
    s = Settings.load({"port": 9000}, environ={"RT_CAPACITY": "5", "RT_API_KEYS": "a, b", "RT_PORT": "1"})
    assert (s.capacity, s.api_keys, s.port) == (5, ["a", "b"], 9000)
    with pytest.raises(ValueError, match="RT_CAPACITY"):
        Settings.load(environ={"RT_CAPACITY": "many"})
    with pytest.raises(ValueError, match="device"):
        Settings(device="tpu")


class Recorder:
    """An engine sink that records what the engine hands to a session."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str | None, object]] = []

    def on_engine_event(self, kind, response_id, payload) -> None:
        self.events.append((kind, response_id, payload))


async def _drive(engine: Engine, n_sessions: int, seconds: float, setup) -> list[Recorder]:
    loop = asyncio.get_running_loop()
    sinks = [Recorder() for _ in range(n_sessions)]
    handles = [engine.open(s, loop) for s in sinks]
    setup(engine, handles)
    await asyncio.sleep(seconds)
    for h in handles:
        engine.close(h)
    return sinks


def test_engine_batches_and_refuses_beyond_capacity():
    model = tiny_model(4)
    engine = Engine(model, EngineConfig(capacity=4))
    engine.start()
    try:
        def setup(eng, handles):
            assert all(handles)
            assert eng.open(Recorder(), asyncio.get_running_loop()) is None  # the fifth is refused
            for i, h in enumerate(handles):
                eng.speak(h, f"r{i}", "some words", max_frames=5)

        sinks = asyncio.run(_drive(engine, 4, 0.6, setup))
    finally:
        engine.stop()
    assert engine.stats.max_batch == 4
    for s in sinks:
        kinds = [k for k, _, _ in s.events]
        assert kinds == ["audio"] * 5 + ["done"]
        assert s.events[-1][2] == ("incomplete", None)
        assert all(p.shape == (960,) for k, _, p in s.events if k == "audio")


def test_engine_irq_stops_within_the_frame_and_eos_completes():
    model = tiny_model(2)
    engine = Engine(model, EngineConfig(capacity=2))
    irq = model.cfg.lslm.irq_id
    engine.start()
    try:
        async def scenario():
            loop = asyncio.get_running_loop()
            a, b = Recorder(), Recorder()
            ha, hb = engine.open(a, loop), engine.open(b, loop)
            engine.speak(ha, "ra", "talking", None)
            while sum(k == "audio" for k, _, _ in a.events) < 3:
                await asyncio.sleep(0.01)
            model.set_logit_bias(irq, 1e4)  # the model now hears a barge-in
            await asyncio.sleep(0.3)
            model.set_logit_bias(irq, 0.0)
            model.set_logit_bias(model.cfg.lslm.eos_id, 1e4)
            engine.speak(hb, "rb", "more", None)
            await asyncio.sleep(0.3)
            return a, b

        a, b = asyncio.run(scenario())
    finally:
        engine.stop()
    kinds = [k for k, _, _ in a.events]
    i = kinds.index("irq")
    assert kinds[i + 1 :] == ["done"] and a.events[-1][2][0] == "interrupted"
    assert [k for k, _, _ in b.events] == ["done"] and b.events[-1][2][0] == "completed"


def test_a_failing_step_fails_the_responses_and_the_engine_goes_on():
    model = tiny_model(2)
    engine = Engine(model, EngineConfig(capacity=2))
    real_step = model.step
    calls = {"n": 0}

    def flaky_step(lo, hi, audio):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated device failure")
        return real_step(lo, hi, audio)

    model.step = flaky_step
    engine.start()
    try:
        async def scenario():
            loop = asyncio.get_running_loop()
            a = Recorder()
            h = engine.open(a, loop)
            engine.speak(h, "r1", "words", None)
            await asyncio.sleep(0.4)
            engine.speak(h, "r2", "more words", 3)
            await asyncio.sleep(0.4)
            engine.close(h)
            return a

        a = asyncio.run(scenario())
    finally:
        engine.stop()
    dones = [(rid, p[0]) for k, rid, p in a.events if k == "done"]
    assert dones[0] == ("r1", "failed")
    assert dones[1] == ("r2", "incomplete")  # the loop survived and served the next response
    assert engine.metrics.step_failures._value.get() == 1
