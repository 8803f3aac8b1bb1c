"""speech.evaluate: the paper's scoring rules, the Silero-VAD peer on real audio, the free-running loop."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from speech.config import VoiceModelConfig
from speech.duplex import DuplexVoiceModel
from speech.evaluate import Outcome, Trial, interruption_scores, run_model, run_vad

FS = 640  # 40 ms at 16 kHz
MU = 12  # 0.5 s in frames


def trial(t_int: int | None, frames: int = 60, listen: np.ndarray | None = None, text: str = "hello") -> Trial:
    listen = np.zeros(frames * FS, np.float32) if listen is None else listen
    return Trial(text, np.zeros(FS, np.float32), listen, frames, t_int)


def test_a_hit_is_an_irq_within_two_mu_after_the_interruption():
    trials = [trial(10), trial(10), trial(10), trial(None), trial(None)]
    outcomes = [Outcome(stop_frame=10 + 2 * MU),  # last frame of the window: hit
                Outcome(stop_frame=10 + 2 * MU + 1),  # too late: a false stop, and a miss
                Outcome(stop_frame=None),  # missed
                Outcome(stop_frame=5),  # uninterrupted yet stopped: false
                Outcome(stop_frame=None)]
    s = interruption_scores(trials, outcomes, MU, 40.0)
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(1 / 3)
    assert s["f1"] == pytest.approx(1 / 3)
    assert s["false_stop_rate"] == pytest.approx(0.5)
    assert s["reaction_ms"] == pytest.approx((2 * MU + 1) * 40.0)


def test_an_irq_before_the_interruption_is_not_a_hit():
    s = interruption_scores([trial(20)], [Outcome(stop_frame=19)], MU, 40.0)
    assert s["f1"] == 0.0 and s["recall"] == 0.0


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (make installs it)")
def test_the_silero_vad_peer_stops_on_speech_and_not_on_silence():
    from speech.data.synth import EspeakSynth

    word = EspeakSynth().synthesize("hello")
    word = 0.5 * word / np.abs(word).max()
    spoken = np.zeros(60 * FS, np.float32)
    spoken[20 * FS : 20 * FS + word.shape[0]] = word
    trials = [trial(20, listen=spoken), trial(None)]
    out = run_vad(trials, FS, threshold=0.5)
    assert out[1].stop_frame is None
    assert out[0].stop_frame is not None and 20 <= out[0].stop_frame <= 20 + 2 * MU


def test_the_free_running_loop_batches_and_records_stops():
    model = DuplexVoiceModel(VoiceModelConfig.tiny(), capacity=2)
    trials = [trial(None, frames=8) for _ in range(5)]  # more trials than slots
    model.set_logit_bias(model.cfg.lslm.irq_id, 1e4)
    out = run_model(model, trials, "irq")
    assert [o.stop_frame for o in out] == [0] * 5 and all(not o.audio for o in out)
    model.set_logit_bias(model.cfg.lslm.irq_id, -1e4)
    model.set_logit_bias(model.cfg.lslm.eos_id, -1e4)
    out = run_model(model, trials, "speak")
    assert all(o.stop_frame is None and o.eos_frame is None for o in out)
    assert all(len(o.audio) == 8 and o.audio[0].shape == (FS,) for o in out)  # spoke every frame, then cut


def test_ablation_arms_from_separate_runs_join_one_table_and_plot(tmp_path):
    import json

    from speech.ablation import collect, plot, table

    for i, name in enumerate(("late", "early-norm-guided", "middle-norm", "early")):
        arm = {"fusion": name.split("-")[0], "listen_norm": "-norm" in name, "f1": 0.9, "f1_noisy": 0.8,
               "wer": 0.1 * i, "wer_noisy": 0.2, "false_interruption_rate": 0.0,
               "false_interruption_rate_backchannel": 0.05, "reaction_ms": 300.0, "wer_original": 0.02,
               "wer_codec": 0.5, "teacher_forced": {"code_acc": 0.1}}
        (tmp_path / name).mkdir()
        (tmp_path / name / "ablation_eval.json").write_text(json.dumps(arm))
    results = collect(tmp_path)
    assert list(results) == ["early", "late", "middle-norm", "early-norm-guided"]  # table order, not run order
    md = table(results)
    assert md.count("\n| ") == 4 and "| early | 30.0 |" in md and "33.56 / 34.99" in md
    plot(results, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
