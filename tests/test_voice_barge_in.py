"""The committed default voice model stops speaking when "Honey" is said over it — through the real socket.

The command word is synthesized here by espeak-ng with a speaker held out from training, streamed in
real time over the microphone channel while the server speaks; the model's own IRQ must end the
response as ``interrupted``. The control session streams the same amount of quiet noise and must
finish its answer: the interruption comes from the word, not from the stream.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from realtime.audio import ChunkResampler
from speech.data.speakers import split_speakers
from speech.data.synth import EspeakSynth
from speech.duplex import DEFAULT_WEIGHTS, load_default_voice_model
from tests.conftest import run
from tests.test_server_e2e import FRAME_WIRE, Conn, append, user_text

pytestmark = pytest.mark.skipif(not (DEFAULT_WEIGHTS / "lslm.safetensors").is_file(),
                                reason="no trained LSLM committed in speech/weights")

ANSWER = "The weather is lovely today, so we could take a long walk along the river after lunch."


def held_out_command(word: str = "Honey") -> np.ndarray:
    """``word`` in a held-out espeak-ng voice, at the wire rate (24 kHz)."""
    variant = split_speakers(0).variants("test")[0]
    clip16 = EspeakSynth(voice="en-us", variant=variant, speed=170, pitch=50).synthesize(word)
    clip16 = clip16 / max(1e-6, float(np.abs(clip16).max())) * 0.5
    return ChunkResampler(16000, 24000)(clip16.astype(np.float32))


async def speak_and_listen(srv, word_audio: np.ndarray | None) -> tuple[Conn, dict]:
    """Ask for a long answer; 0.6 s into its audio, stream ``word_audio`` (or nothing) over quiet noise."""
    conn = await Conn.open(srv.ws_url)
    rng = np.random.default_rng(1)

    async def mic() -> None:
        # paced on an absolute clock a few frames ahead, like a client with a small send buffer: a loaded
        # machine that wakes this task late catches up instead of starving the engine (zero-filled frames)
        loop = asyncio.get_running_loop()
        t0, lead = loop.time(), 4
        sent = 0
        audio = word_audio
        while True:
            frame = (rng.standard_normal(FRAME_WIRE) * 0.003).astype(np.float32)
            if audio is not None and sent >= 15:  # 0.6 s of the answer heard first
                part = audio[:FRAME_WIRE]
                frame[: part.shape[0]] += part
                audio = audio[FRAME_WIRE:] if audio.shape[0] > FRAME_WIRE else None
            await conn.send(append(frame))
            sent += 1
            delay = t0 + (sent - lead) * FRAME_WIRE / 24000 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)

    await conn.send(user_text(ANSWER))
    await conn.send({"type": "response.create"})
    await conn.until("response.output_audio.delta", timeout=30)
    task = asyncio.create_task(mic())
    try:
        done = await conn.until("response.done", timeout=60)
    finally:
        task.cancel()
    await conn.ws.close()
    return conn, done


@pytest.mark.slow
def test_a_spoken_command_interrupts_the_default_model(make_server):
    srv = make_server(model=load_default_voice_model(capacity=2), capacity=2)
    conn, done = run(speak_and_listen(srv, held_out_command()))
    assert done["response"]["status"] == "interrupted", done["response"]
    assert "input_audio_buffer.speech_started" in conn.types()


@pytest.mark.slow
def test_without_the_command_the_default_model_finishes_its_answer(make_server):
    srv = make_server(model=load_default_voice_model(capacity=2), capacity=2)
    conn, done = run(speak_and_listen(srv, None))
    assert done["response"]["status"] == "completed", done["response"]
    assert conn.audio().shape[0] > 24000  # it really spoke, more than a second
