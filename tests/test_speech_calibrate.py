"""The IRQ decision: a margin held for several frames, fitted on validation, stored with the checkpoint."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from speech.calibrate import choose, score_policy, stop_frame
from speech.checkpoints import load_irq_policy, save_codec, save_lslm, write_irq_policy
from speech.config import VoiceModelConfig
from speech.duplex import DuplexVoiceModel, load_voice_model
from speech.evaluate import Outcome, Trial, run_model

FS = 640


def noisy_trials(n: int, frames: int, seed: int = 0) -> list[Trial]:
    rng = np.random.default_rng(seed)
    words = ["hello", "there", "a", "quiet", "morning", "in", "the", "city", "of", "rain"]
    # a random model's zero-initialised listening projection hears nothing: the texts make trials differ
    return [Trial(" ".join(rng.choice(words, 4)), np.zeros(FS, np.float32),
                  (rng.standard_normal(frames * FS) * rng.uniform(0.01, 0.5)).astype(np.float32), frames, None)
            for _ in range(n)]


def test_stop_frame_needs_the_lead_on_consecutive_frames():
    leads = [0.5, 2.0, -1.0, 2.0, 2.5, 3.0, 0.0]
    assert stop_frame(leads, 0.0, 1) == 0
    assert stop_frame(leads, 1.0, 1) == 1
    assert stop_frame(leads, 1.0, 2) == 4  # frames 3 and 4; frame 1 alone does not count
    assert stop_frame(leads, 1.0, 3) == 5
    assert stop_frame(leads, 1.0, 4) is None
    assert stop_frame(leads, 9.0, 1) is None


def test_one_never_firing_run_predicts_every_policy_exactly():
    """Speech tokens are chosen without IRQ whatever the policy, so a policy's run equals the
    never-firing run up to the frame it stops at: the stops scored offline are the real ones."""
    model = DuplexVoiceModel(VoiceModelConfig.tiny(), capacity=3, seed=0)
    trials = noisy_trials(7, frames=30)
    base_cfg = model.cfg
    model.cfg = dataclasses.replace(base_cfg, irq_margin=float("inf"), irq_frames=1)
    free = run_model(model, trials, "free")
    assert all(o.stop_frame is None for o in free) and all(len(o.irq_leads) > 10 for o in free)
    checked_mixed = 0
    for frames in (1, 2, 3):
        # the margin at which about half of the trials would stop: the median of each trial's best
        # lead held for ``frames`` frames
        held = [max(min(o.irq_leads[i : i + frames]) for i in range(len(o.irq_leads) - frames + 1)) for o in free]
        # (midway between two trials' values: rows that stop change the batch's attention length, which
        # moves the others' logits by float rounding, so a margin equal to a lead could go either way)
        h = sorted(held)
        margin = float(h[len(h) // 2] + h[len(h) // 2 - 1]) / 2
        model.cfg = dataclasses.replace(base_cfg, irq_margin=margin, irq_frames=frames)
        real = run_model(model, trials, "policy")
        predicted = [stop_frame(o.irq_leads, margin, frames) for o in free]
        assert [o.stop_frame for o in real] == predicted
        for r, f in zip(real, free, strict=True):  # identical speech up to the stop
            assert len(r.audio) <= len(f.audio)
            assert all(np.array_equal(a, b) for a, b in zip(r.audio, f.audio, strict=False))
        stopped = sum(p is not None for p in predicted)
        checked_mixed += 0 < stopped < len(trials)
    assert checked_mixed  # some policy stopped some trials and not others: the comparison had teeth


def test_scoring_and_choice_respect_the_false_interruption_budget():
    mu = 12

    def scene(t_ints, leads_list):
        trials = [Trial("x", np.zeros(FS, np.float32), np.zeros(60 * FS, np.float32), 60, t) for t in t_ints]
        return trials, [Outcome(irq_leads=lds) for lds in leads_list]

    quiet, spike, late = [0.0] * 40, [0.0] * 5 + [3.0] + [0.0] * 34, [0.0] * 20 + [4.0] * 20
    scenes = {"clean": scene([15, None], [late, quiet]), "noisy": scene([15, None], [late, spike]),
              "noise": scene([None, None], [spike, quiet]), "backchannel": scene([None], [quiet])}
    argmax_like = score_policy(scenes, 1.0, 1, mu, 40.0)
    held = score_policy(scenes, 1.0, 2, mu, 40.0)
    assert argmax_like["false_noise"] == 0.5 and held["false_noise"] == 0.0  # the one-frame spike
    assert held["f1_clean"] == 1.0 and held["f1_noisy"] == 1.0
    assert held["reaction_ms_clean"] == (21 + 1 - 15) * 40.0
    assert choose([argmax_like, held], max_false=0.02) is held
    assert choose([argmax_like], max_false=0.02) is argmax_like  # nothing fits: the fewest false stops
    # a negative margin fires while IRQ only trails the top output: left out unless asked for
    trailing = score_policy(scenes, -1.0, 2, mu, 40.0)
    assert choose([trailing, held], max_false=1.0) is held
    assert choose([trailing], max_false=1.0, min_margin=-1.0) is trailing
    with pytest.raises(ValueError, match="margin"):
        choose([trailing], max_false=1.0)
    # a one-frame policy is left out when at least two frames are asked for, whatever it scores
    assert choose([argmax_like, held], max_false=1.0, min_frames=2) is held
    with pytest.raises(ValueError, match="2 frames"):
        choose([argmax_like], max_false=1.0, min_frames=2)


def test_the_fitted_policy_travels_with_the_checkpoint(tmp_path):
    src = DuplexVoiceModel(VoiceModelConfig.tiny(), capacity=1)
    save_codec(tmp_path / "codec.safetensors", src.codec)
    save_lslm(tmp_path / "lslm.safetensors", src.lslm)
    assert load_irq_policy(tmp_path / "lslm.safetensors") == {}
    assert load_voice_model(tmp_path, capacity=1).cfg.irq_frames == 1
    write_irq_policy(tmp_path / "lslm.safetensors", 2.5, 3, "a test")
    loaded = load_voice_model(tmp_path, capacity=1)
    assert (loaded.cfg.irq_margin, loaded.cfg.irq_frames) == (2.5, 3)
    with pytest.raises(ValueError, match="not an lslm"):
        write_irq_policy(tmp_path / "codec.safetensors", 1.0, 1, "wrong file")
    with pytest.raises(ValueError, match="irq_frames"):
        dataclasses.replace(loaded.cfg, irq_frames=0)


def test_long_answers_over_noise_join_the_false_interruption_budget():
    """A policy that never stops a single sentence on noise but stops long answers near their end
    (IRQ's lead drifts up there) is over budget; a higher margin is chosen without being asked."""
    mu = 12

    def scene(t_ints, leads_list):
        trials = [Trial("x", np.zeros(FS, np.float32), np.zeros(60 * FS, np.float32), 60, t) for t in t_ints]
        return trials, [Outcome(irq_leads=lds) for lds in leads_list]

    quiet, late, drift = [0.0] * 40, [0.0] * 20 + [4.0] * 20, [0.0] * 30 + [2.0, 2.0] + [0.0] * 8
    scenes = {"clean": scene([15, None], [late, quiet]), "noisy": scene([15, None], [late, quiet]),
              "noise": scene([None], [quiet]), "backchannel": scene([None], [quiet]),
              "long": scene([None, None], [drift, quiet])}
    low, high = score_policy(scenes, 1.0, 2, mu, 40.0), score_policy(scenes, 2.5, 2, mu, 40.0)
    assert low["false_noise"] == 0.0 and low["false_long"] == 0.5 and high["false_long"] == 0.0
    assert low["f1_mean"] == high["f1_mean"] == 1.0
    assert choose([low, high], max_false=0.02) is high


def test_the_long_scene_says_two_sentences_over_noise(tmp_path):
    from speech.corpus import Corpus
    from speech.evaluate import EvalConfig, SceneMaker
    from tests.test_train_codec import make_corpus
    from tests.test_train_lslm import add_text_and_kinds

    root = add_text_and_kinds(make_corpus(tmp_path / "c"))
    corpus = Corpus(root)
    maker = SceneMaker(corpus, EvalConfig(data=str(root), split="train"), FS, 25.0)
    singles, longs = maker.trials("noise", 4), maker.trials("long", 4)
    for i, (one, two) in enumerate(zip(singles, longs, strict=True)):
        nxt = maker.sentences[(i + 1) % len(maker.sentences)]
        assert two.text == f"{one.text} {nxt['text']}" and two.t_int is None
        assert two.ref_audio.shape[0] == one.ref_audio.shape[0] + corpus.audio("speech", nxt).shape[0]
        assert two.listen.shape[0] > one.listen.shape[0] and np.abs(two.listen).max() > 0  # noise throughout
