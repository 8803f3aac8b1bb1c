"""What the duplex benchmark calls real time."""

from bench.duplex import is_realtime


def test_a_point_with_no_audio_is_not_real_time():
    assert is_realtime(30.0, 40.0, dropped=0, frames_received=200)
    assert not is_realtime(30.0, 40.0, dropped=0, frames_received=0)  # the first audio came after the window
    assert not is_realtime(30.0, 40.0, dropped=1, frames_received=200)
    assert not is_realtime(41.0, 40.0, dropped=0, frames_received=200)
