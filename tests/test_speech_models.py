"""The voice model's pieces: streaming equals offline, fusion really fuses, batched equals one-by-one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from speech.checkpoints import load_codec, load_lslm, save_codec, save_lslm
from speech.codec import SpeechCodec
from speech.config import LSLMConfig, VoiceModelConfig
from speech.duplex import EV_AUDIO, EV_EOS, EV_IRQ, EV_LISTEN, DuplexVoiceModel, load_voice_model
from speech.lslm import LSLM


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_codec_streaming_equals_offline():
    cfg = VoiceModelConfig.tiny().codec
    codec = SpeechCodec(cfg).eval()
    frames = 7
    wav = torch.randn(3, frames * cfg.frame_size) * 0.1
    with torch.no_grad():
        feats, codes = codec.encode_features(wav), codec.encode(wav)
        recon = codec.decode(codes)
        state = codec.init_state(3)
        f_s, c_s, y_s = [], [], []
        for t in range(frames):
            f, c = codec.encode_step(wav[:, t * cfg.frame_size : (t + 1) * cfg.frame_size], state, with_codes=True)
            f_s.append(f)
            c_s.append(c)
            y_s.append(codec.decode_step(codes[:, t], state))
    torch.testing.assert_close(torch.stack(f_s, 1), feats)
    assert torch.equal(torch.stack(c_s, 1), codes)
    torch.testing.assert_close(torch.cat(y_s, 1), recon, atol=1e-6, rtol=1e-5)
    assert recon.shape == wav.shape


@pytest.mark.parametrize(("kernel", "dilation", "columns"), [(3, 1, 1), (3, 4, 4), (4, 1, 1), (1, 1, 5), (3, 2, 9)])
def test_step_convolutions_as_matmuls_equal_torch_conv(kernel, dilation, columns):
    """The chunk steps' GEMM forms (speech/streaming.py) compute PyTorch's convolutions."""
    from speech.streaming import conv_as_matmul, pointwise

    conv = torch.nn.Conv1d(6, 5, kernel, dilation=dilation)
    full = torch.randn(3, 6, (kernel - 1) * dilation + columns)
    with torch.no_grad():
        torch.testing.assert_close(conv_as_matmul(full, conv.weight, conv.bias, dilation), conv(full))
        one = torch.nn.Conv1d(6, 5, 1)
        torch.testing.assert_close(pointwise(one, full), one(full))


def test_codec_rejects_partial_frames():
    codec = SpeechCodec(VoiceModelConfig.tiny().codec)
    with pytest.raises(ValueError, match="multiple of the frame size"):
        codec.encode(torch.zeros(1, 1000))


@pytest.mark.parametrize("fusion", ["early", "middle", "late", "none"])
def test_lslm_cached_decode_equals_teacher_forcing(fusion):
    cfg = VoiceModelConfig.tiny().lslm
    cfg.fusion = fusion
    model = LSLM(cfg).eval()
    torch.nn.init.normal_(model.listen_proj.weight, std=0.05)  # zero at init: give listening a say
    text = torch.randint(0, 256, (1, 6))
    speech = torch.randint(0, cfg.codebook_size, (1, 5))
    speech[:, 0] = cfg.speech_bos_id
    listen = torch.randn(1, 5, cfg.listen_dim)
    with torch.no_grad():
        ref = model(text, speech, listen)
        k, v = model.init_cache(3, "cpu", torch.float32)
        model.prefill(text[0], k[:, 2], v[:, 2])
        steps = [
            model.decode_step(speech[:, t], torch.tensor([6 + t]), listen[:, t], k[:, 2:3], v[:, 2:3], 6 + t + 1)
            for t in range(5)
        ]
    torch.testing.assert_close(torch.stack(steps, 1), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fusion,listens", [("early", True), ("middle", True), ("late", True), ("none", False)])
def test_fusion_uses_the_listening_channel(fusion, listens):
    cfg = VoiceModelConfig.tiny().lslm
    cfg.fusion = fusion
    model = LSLM(cfg).eval()
    text = torch.randint(0, 256, (1, 4))
    speech = torch.full((1, 3), cfg.speech_bos_id)
    quiet, loud = torch.zeros(1, 3, cfg.listen_dim), 16 * torch.randn(1, 3, cfg.listen_dim)
    with torch.no_grad():
        # a fresh model is a plain TTS: the zero-initialised projection keeps listening out at first
        assert torch.allclose(model(text, speech, quiet), model(text, speech, loud))
        torch.nn.init.normal_(model.listen_proj.weight, std=0.05)
        a, b = model(text, speech, quiet), model(text, speech, loud)
    assert (not torch.allclose(a, b)) == listens


def test_listening_features_are_normalised_and_old_checkpoints_load_raw(tmp_path):
    from dataclasses import asdict

    from safetensors.torch import save_file

    from speech.checkpoints import load_lslm

    cfg = VoiceModelConfig.tiny().lslm
    model = LSLM(cfg)
    torch.nn.init.normal_(model.listen_proj.weight, std=0.05)
    with torch.no_grad():  # the scale of the codec's features (RMS ~16) no longer matters
        feats = torch.randn(2, cfg.listen_dim)
        torch.testing.assert_close(model.listen_proj(model.listen_norm(feats)),
                                   model.listen_proj(model.listen_norm(16 * feats)), atol=1e-4, rtol=1e-4)
    old = LSLM(VoiceModelConfig.tiny().lslm.__class__(**{**asdict(cfg), "listen_norm": False}))
    old_cfg = {k: v for k, v in asdict(old.cfg).items() if k != "listen_norm"}  # as saved before the field
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(tmp_path / "old.safetensors"),
              metadata={"kind": "lslm", "config": json.dumps(old_cfg)})
    loaded_cfg, loaded = load_lslm(tmp_path / "old.safetensors")
    assert loaded_cfg.listen_norm is False and isinstance(loaded.listen_norm, torch.nn.Identity)


def test_lslm_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        LSLMConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="fusion"):
        LSLMConfig(fusion="sideways")


def _speak_all(model: DuplexVoiceModel, n: int) -> None:
    for i in range(n):
        model.start_speaking(i, f"sentence number {i} to say")


def test_batched_step_equals_one_session_at_a_time():
    cfg = VoiceModelConfig.tiny()
    audio = torch.randn(6, 4, cfg.codec.frame_size) * 0.1
    a, b = DuplexVoiceModel(cfg, 4, seed=1), DuplexVoiceModel(cfg, 4, seed=1)
    _speak_all(a, 4)
    _speak_all(b, 4)
    for t in range(6):
        out_a = a.step(0, 4, audio[t])
        outs_b = [b.step(i, i + 1, audio[t, i : i + 1]) for i in range(4)]
        assert np.array_equal(out_a.events, np.concatenate([o.events for o in outs_b]))
        torch.testing.assert_close(out_a.audio, torch.cat([o.audio for o in outs_b]), atol=1e-5, rtol=1e-4)


def test_move_slot_keeps_the_stream():
    cfg = VoiceModelConfig.tiny()
    audio = torch.randn(5, cfg.codec.frame_size) * 0.1
    a, b = DuplexVoiceModel(cfg, 3, seed=2), DuplexVoiceModel(cfg, 3, seed=2)
    a.start_speaking(0, "hello")
    b.start_speaking(2, "hello")
    for t in range(2):
        a.step(0, 1, audio[t : t + 1])
        b.step(2, 3, audio[t : t + 1])
    b.move_slot(2, 0)
    for t in range(2, 5):
        oa, ob = a.step(0, 1, audio[t : t + 1]), b.step(0, 1, audio[t : t + 1])
        torch.testing.assert_close(oa.audio, ob.audio)


def test_events_follow_the_logits():
    cfg = VoiceModelConfig.tiny()
    m = DuplexVoiceModel(cfg, 3)
    silence = torch.zeros(3, cfg.codec.frame_size)
    m.start_speaking(0, "one")
    m.start_speaking(1, "two")
    out = m.step(0, 3, silence)
    assert list(out.events) == [EV_AUDIO, EV_AUDIO, EV_LISTEN]
    m.set_logit_bias(cfg.lslm.irq_id, 1e4)
    out = m.step(0, 3, silence)
    assert list(out.events) == [EV_IRQ, EV_IRQ, EV_LISTEN]
    assert not m.speaking.any()
    m.set_logit_bias(cfg.lslm.irq_id, 0.0)
    m.set_logit_bias(cfg.lslm.eos_id, 1e4)
    m.start_speaking(2, "three")
    assert list(m.step(0, 3, silence).events) == [EV_LISTEN, EV_LISTEN, EV_EOS]


def test_text_over_the_limit_is_refused():
    m = DuplexVoiceModel(VoiceModelConfig.tiny(), 1)
    with pytest.raises(ValueError, match="at most"):
        m.start_speaking(0, "x" * 1000)


def test_checkpoints_round_trip_and_refuse_bad_files(tmp_path):
    cfg = VoiceModelConfig.tiny()
    codec, lslm = SpeechCodec(cfg.codec), LSLM(cfg.lslm)
    save_codec(tmp_path / "codec.safetensors", codec)
    save_lslm(tmp_path / "lslm.safetensors", lslm)
    cfg_c, codec2 = load_codec(tmp_path / "codec.safetensors")
    cfg_l, lslm2 = load_lslm(tmp_path / "lslm.safetensors")
    assert (cfg_c, cfg_l) == (cfg.codec, cfg.lslm)
    for (k, v), (k2, v2) in zip(lslm.state_dict().items(), lslm2.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    assert torch.equal(codec.quantizer.codebook, codec2.quantizer.codebook)
    model = load_voice_model(tmp_path, capacity=2)
    assert model.weights_note == "codec: trained; lslm: trained"
    assert torch.equal(model.codec.quantizer.codebook, codec.quantizer.codebook)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((tmp_path / "codec.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_codec(bad)
    with pytest.raises(ValueError, match="not a lslm checkpoint"):
        load_lslm(tmp_path / "codec.safetensors")
    with pytest.raises(FileNotFoundError):
        load_codec(tmp_path / "missing.safetensors")


def test_an_lslm_trained_on_another_codec_is_refused(tmp_path):
    cfg = VoiceModelConfig.tiny()
    save_codec(tmp_path / "codec.safetensors", SpeechCodec(cfg.codec))
    other = LSLMConfig(**{**cfg.lslm.__dict__, "codebook_size": 32})
    save_lslm(tmp_path / "lslm.safetensors", LSLM(other))
    with pytest.raises(ValueError, match="codebook_size"):
        load_voice_model(tmp_path, capacity=1)


def test_a_checkpoint_shipped_in_float16_loads_as_float32(tmp_path):
    from speech.checkpoints import load_lslm, save_lslm
    from speech.export import export_half

    model = LSLM(VoiceModelConfig.tiny().lslm)
    save_lslm(tmp_path / "run.safetensors", model)
    full, half = export_half(tmp_path / "run.safetensors", tmp_path / "ship.safetensors")
    assert half < 0.6 * full
    cfg, loaded = load_lslm(tmp_path / "ship.safetensors")
    assert cfg == model.cfg
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert b.dtype == a.dtype, name
        torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-3)
