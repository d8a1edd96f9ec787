"""Silero VAD: speech spans of synthesized speech, silence and noise; the streaming interface and its state."""
from __future__ import annotations

import numpy as np
import pytest

from funaudiochat.audio.vad import FRAME_S, SileroVad, StreamingVad, VadState, speech_segments
from funaudiochat.data import synth
from funaudiochat.errors import InputError

RATE = 16000
TEXTS = {"piper": "Could you tell me how to get to the nearest train station?",
         "espeak:en-us": "Please remind me to call my mother at six this evening."}


def _true_span(wav: np.ndarray) -> tuple[float, float]:
    """First and last 10 ms frame within 40 dB of the loudest frame."""
    frames = wav[: wav.shape[0] // 160 * 160].reshape(-1, 160)
    rms = np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1))
    active = np.nonzero(rms > 0.01 * rms.max())[0]
    return active[0] * 0.01, (active[-1] + 1) * 0.01


@pytest.fixture(scope="module")
def padded():
    """Synthesized sentences with 1 s of silence on each side, and their true speech span."""
    out = {}
    for voice, text in TEXTS.items():
        wav = synth.synthesize(synth.make_utterance({"id": "v", "text": text, "voice": voice}), RATE)
        start, end = _true_span(wav)
        silence = np.zeros(RATE, np.float32)
        out[voice] = (np.concatenate([silence, wav, silence]), (1.0 + start, 1.0 + end))
    return out


@pytest.mark.parametrize("voice", list(TEXTS))
def test_speech_span_within_100_ms(padded, voice):
    wav, (start, end) = padded[voice]
    segments = speech_segments(wav, RATE, pad_ms=0)
    assert segments, "no speech found"
    assert abs(segments[0][0] - start) <= 0.1, (segments, start)
    assert abs(segments[-1][1] - end) <= 0.1, (segments, end)
    assert all(s < e for s, e in segments)
    padded_segments = speech_segments(wav, RATE, pad_ms=50)
    assert padded_segments[0][0] == pytest.approx(max(0.0, segments[0][0] - 0.05))


def test_other_sample_rates_give_the_same_span(padded):
    import soxr

    wav, _ = padded["piper"]
    at16 = speech_segments(wav, RATE, pad_ms=0)
    at44 = speech_segments(soxr.resample(wav, RATE, 44100), 44100, pad_ms=0)
    assert len(at16) == len(at44)
    one_frame = FRAME_S + 1e-9  # at most one VAD frame apart (the times are float sums of frame lengths)
    for (s1, e1), (s2, e2) in zip(at16, at44):
        assert abs(s1 - s2) <= one_frame and abs(e1 - e2) <= one_frame


def test_silence_and_noise_have_no_speech():
    rng = np.random.default_rng(0)
    assert speech_segments(np.zeros(3 * RATE, np.float32), RATE) == []
    assert speech_segments((0.1 * rng.standard_normal(3 * RATE)).astype(np.float32), RATE) == []
    assert speech_segments(np.zeros(0, np.float32), RATE) == []


def test_a_long_pause_splits_two_utterances(padded):
    a, _ = padded["piper"]
    b, _ = padded["espeak:en-us"]
    segments = speech_segments(np.concatenate([a, b]), RATE, min_silence_ms=500)
    assert len(segments) == 2
    assert segments[0][1] < a.shape[0] / RATE < segments[1][0]


@pytest.mark.parametrize("frame_ms", [20, 30, 40])
def test_streaming_events_match_the_offline_span(padded, frame_ms):
    wav, (start, end) = padded["espeak:en-us"]
    vad = StreamingVad(RATE, min_silence_ms=300)
    step = RATE * frame_ms // 1000
    events = []
    for i in range(0, wav.shape[0], step):
        events += vad.push(wav[i: i + step])
    assert [e.kind for e in events] == ["speech_start", "speech_end"], events
    assert abs(events[0].time_s - start) <= 0.1 and abs(events[1].time_s - end) <= 0.1
    assert not vad.in_speech and vad.windows == wav.shape[0] // 512


def test_streaming_at_48_khz_and_flush(padded):
    import soxr

    wav, (start, _) = padded["piper"]
    wav48 = soxr.resample(wav[: int(2.0 * RATE)], RATE, 48000)  # cut while speaking
    vad = StreamingVad(48000)
    events = [e for i in range(0, wav48.shape[0], 960) for e in vad.push(wav48[i: i + 960])]
    assert [e.kind for e in events] == ["speech_start"] and abs(events[0].time_s - start) <= 0.1
    assert vad.in_speech
    assert [e.kind for e in vad.flush()] == ["speech_end"]
    vad.reset()
    assert not vad.in_speech and vad.windows == 0


def test_state_is_explicit_and_per_stream(padded):
    """Two interleaved streams on one model give the same probabilities as each stream alone."""
    model = SileroVad()
    a, _ = padded["piper"]
    b, _ = padded["espeak:en-us"]
    windows = 60
    alone_a, alone_b = model.probabilities(a[: windows * 512]), model.probabilities(b[: windows * 512])
    state_a, state_b, inter_a, inter_b = VadState(), VadState(), [], []
    for i in range(windows):
        p, state_a = model.probability(a[i * 512: (i + 1) * 512], state_a)
        inter_a.append(p)
        p, state_b = model.probability(b[i * 512: (i + 1) * 512], state_b)
        inter_b.append(p)
    np.testing.assert_allclose(inter_a, alone_a, atol=1e-6)
    np.testing.assert_allclose(inter_b, alone_b, atol=1e-6)
    assert max(inter_b) > 0.9 and min(inter_b[:20]) < 0.1  # silence first, then speech


def test_bad_threshold_is_an_input_error():
    with pytest.raises(InputError, match="threshold"):
        StreamingVad(RATE, threshold=1.5)


class _ScriptedModel:
    """Stands in for the network to test the segment logic on chosen window probabilities."""

    def __init__(self, probs):
        self.probs = np.asarray(probs, np.float32)

    def probabilities(self, wav16k):
        assert wav16k.shape[0] == self.probs.shape[0] * 512
        return self.probs


def test_segment_logic_on_scripted_probabilities():
    probs = [0.0] * 10 + [0.9] * 5 + [0.3] + [0.9] * 20 + [0.0] * 20 + [0.9] * 3 + [0.0] * 20
    wav = np.zeros(len(probs) * 512, np.float32)
    segments = speech_segments(wav, RATE, pad_ms=0, model=_ScriptedModel(probs))
    # a one-window dip does not move the start; the 3-window burst (96 ms < 250 ms) is dropped
    assert segments == [(pytest.approx(10 * FRAME_S), pytest.approx(35 * FRAME_S))]
    split = speech_segments(wav, RATE, pad_ms=0, min_silence_ms=20, min_speech_ms=100, model=_ScriptedModel(probs))
    assert split == [(pytest.approx(10 * FRAME_S), pytest.approx(14 * FRAME_S)),
                     (pytest.approx(16 * FRAME_S), pytest.approx(35 * FRAME_S))]
