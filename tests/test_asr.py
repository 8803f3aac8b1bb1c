"""The intelligibility judge: Whisper tiny.en loads offline and transcribes the target voice."""

from __future__ import annotations

import pytest

from speech.asr import WhisperASR, normalize, word_errors


def test_word_errors_and_normalisation():
    assert normalize("Hello, World!  It's twenty-five.") == "hello world it's twenty five"
    assert word_errors(["the cat sat", "a dog"], ["the cat sat", "a dog"]) == (0, 5)
    assert word_errors(["the cat sat"], ["the bat"]) == (2, 3)  # one substitution, one deletion
    assert word_errors(["one two"], [""]) == (2, 2)


def test_whisper_transcribes_the_target_voice_offline():
    from speech.data import PiperSynth

    text = "The weather is lovely in the garden this morning."
    audio = PiperSynth().synthesize(text)
    hyp = WhisperASR().transcribe(audio)
    errors, words = word_errors([text], [hyp])
    assert errors / words <= 0.2, hyp
    errors, _ = word_errors([text], [WhisperASR().transcribe(audio * 0.0)])
    assert errors >= words - 1  # silence is not that sentence: the judge can fail


def test_a_missing_asr_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no download"):
        WhisperASR(tmp_path / "nope")
