"""Voice activity detection with Silero VAD (the ONNX model packaged in silero-vad), numpy + onnxruntime only.

The model reads 512-sample windows at 16 kHz (32 ms), each preceded by the previous window's last 64 samples,
and carries a recurrent state [2, 1, 128]; both live in `VadState`, owned by the caller.

- `speech_segments(wav, sample_rate)`: the speech spans of a whole clip, in seconds.
- `StreamingVad`: push frames of any size (20-40 ms from a microphone), get `VadEvent`s (speech_start /
  speech_end) with hysteresis: speech starts when the probability reaches `threshold` and stays above
  `threshold - 0.15` for `min_speech_ms`; it ends after `min_silence_ms` below `threshold - 0.15`.
Times: speech starts where the first window at or above `threshold` starts, and ends where the last such window
starts. The model's probability trails the audio by about one window when speech stops: dating the end at the
end of that window put it 65 ms (Piper) / 41 ms (espeak) late on average over 50 sentences each; this way the
mean is about 30 ms and every start and end is within 80 ms (bench/synth.py).
Other sample rates are resampled to 16 kHz (soxr; a streaming resampler for `StreamingVad`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import soxr

from funaudiochat.audio.io import resample
from funaudiochat.errors import InputError

VAD_RATE = 16000
WINDOW = 512  # samples per model step at 16 kHz
CONTEXT = 64  # samples of the previous window the model sees again
FRAME_S = WINDOW / VAD_RATE  # 0.032 s
HYSTERESIS = 0.15  # speech ends below threshold - HYSTERESIS


@dataclass
class VadState:
    """The model's memory between windows."""

    rnn: np.ndarray = field(default_factory=lambda: np.zeros((2, 1, 128), np.float32))  # [2, 1, 128]
    context: np.ndarray = field(default_factory=lambda: np.zeros(CONTEXT, np.float32))  # [64]


class SileroVad:
    """The packaged Silero VAD ONNX model: `probability(window[512], state) -> (p, new state)`."""

    def __init__(self, threads: int = 1):
        import importlib.resources

        import onnxruntime

        path = importlib.resources.files("silero_vad") / "data" / "silero_vad.onnx"
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self._rate = np.array(VAD_RATE, dtype=np.int64)

    def probability(self, window: np.ndarray, state: VadState) -> tuple[float, VadState]:
        x = np.concatenate([state.context, window])[None, :]  # [1, 64 + 512]
        out, rnn = self.session.run(None, {"input": x, "state": state.rnn, "sr": self._rate})
        return float(out[0, 0]), VadState(rnn=rnn, context=window[-CONTEXT:].copy())

    def probabilities(self, wav16k: np.ndarray) -> np.ndarray:
        """Speech probability of each 32 ms window of a 16 kHz clip (the last window zero-padded). [n_windows]"""
        n = -(-wav16k.shape[0] // WINDOW)
        padded = np.zeros(n * WINDOW, np.float32)
        padded[: wav16k.shape[0]] = wav16k
        state, probs = VadState(), np.zeros(n, np.float32)
        for i, window in enumerate(padded.reshape(n, WINDOW)):  # [n, 512]
            probs[i], state = self.probability(window, state)
        return probs


_DEFAULT_MODEL: SileroVad | None = None


def default_model() -> SileroVad:
    global _DEFAULT_MODEL
    if _DEFAULT_MODEL is None:
        _DEFAULT_MODEL = SileroVad()
    return _DEFAULT_MODEL


@dataclass(frozen=True)
class VadEvent:
    kind: str  # "speech_start" or "speech_end"
    time_s: float  # from the start of the stream


class _Hysteresis:
    """Window probabilities -> speech_start / speech_end events (times at window boundaries)."""

    def __init__(self, threshold: float, min_speech_ms: float, min_silence_ms: float):
        if not 0.0 < threshold < 1.0:
            raise InputError(f"VAD threshold must be in (0, 1), got {threshold}")
        self.threshold, self.low = threshold, max(threshold - HYSTERESIS, 0.01)
        self.min_speech = max(1, round(min_speech_ms / 1000 / FRAME_S))  # windows
        self.min_silence = max(1, round(min_silence_ms / 1000 / FRAME_S))
        self.in_speech = False
        self.candidate: int | None = None  # window where possible speech began
        self.silence: int | None = None  # window where possible silence began
        self.last_speech = 0  # latest window at or above threshold while in speech

    def update(self, i: int, p: float) -> VadEvent | None:
        if not self.in_speech:
            if self.candidate is None and p >= self.threshold:
                self.candidate = i
            elif self.candidate is not None and p < self.low:
                self.candidate = None
            if self.candidate is not None and i + 1 - self.candidate >= self.min_speech:
                self.in_speech, self.silence, self.last_speech = True, None, i
                return VadEvent("speech_start", self.candidate * FRAME_S)
            return None
        if p >= self.threshold:
            self.silence, self.last_speech = None, i
        elif p < self.low and self.silence is None:
            self.silence = i
        if self.silence is not None and i + 1 - self.silence >= self.min_silence:
            self.in_speech, self.candidate = False, None
            # the probability trails the audio by about one window at offsets: speech ended as that window began
            return VadEvent("speech_end", self.last_speech * FRAME_S)
        return None


def speech_segments(wav: np.ndarray, sample_rate: int, threshold: float = 0.5, min_silence_ms: float = 100.0,
                    pad_ms: float = 30.0, min_speech_ms: float = 250.0,
                    model: SileroVad | None = None) -> list[tuple[float, float]]:
    """Speech spans [(start_s, end_s)] of a mono clip: pauses shorter than `min_silence_ms` are bridged, bursts
    shorter than `min_speech_ms` dropped, each span widened by `pad_ms` (clipped to the clip, overlaps merged)."""
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    if wav.size == 0:
        return []
    duration = wav.shape[0] / sample_rate
    probs = (model or default_model()).probabilities(resample(wav, sample_rate, VAD_RATE))
    tracker = _Hysteresis(threshold, 0.0, min_silence_ms)  # whole clip: short spans are dropped afterwards instead
    spans, start = [], None
    for i, p in enumerate(probs):
        event = tracker.update(i, float(p))
        if event and event.kind == "speech_start":
            start = event.time_s
        elif event:
            spans.append((start, event.time_s))
    if tracker.in_speech:
        spans.append((start, duration))
    pad = pad_ms / 1000.0
    merged: list[tuple[float, float]] = []
    for s, e in (span for span in spans if span[1] - span[0] >= min_speech_ms / 1000.0):
        s, e = max(0.0, s - pad), min(duration, e + pad)
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], e)
        else:
            merged.append((s, e))
    return merged


class StreamingVad:
    """Frame-by-frame VAD for a live stream: `push(frame) -> [VadEvent]`, `reset()` for a new stream."""

    def __init__(self, sample_rate: int = VAD_RATE, threshold: float = 0.5, min_speech_ms: float = 96.0,
                 min_silence_ms: float = 300.0, model: SileroVad | None = None):
        self.sample_rate = sample_rate
        self.model = model or default_model()
        self._settings = (threshold, min_speech_ms, min_silence_ms)
        self.reset()

    def reset(self) -> None:
        self.state = VadState()
        self.tracker = _Hysteresis(*self._settings)
        self.windows = 0  # model windows consumed so far
        self.probability = 0.0  # of the latest window
        self._pending = np.zeros(0, np.float32)
        self._resampler = (None if self.sample_rate == VAD_RATE
                           else soxr.ResampleStream(self.sample_rate, VAD_RATE, 1, dtype="float32"))

    @property
    def in_speech(self) -> bool:
        return self.tracker.in_speech

    @property
    def pause_end_s(self) -> float | None:
        """While a silence may be ending the speech (in speech, a silence under way): the time the speech_end event
        would give if it lasts (stream seconds); else None."""
        t = self.tracker
        return t.last_speech * FRAME_S if t.in_speech and t.silence is not None else None

    @property
    def heard_s(self) -> float:
        """Stream seconds the model has judged so far."""
        return self.windows * FRAME_S

    def push(self, frame: np.ndarray) -> list[VadEvent]:
        """Feed the next samples (any count, mono float32 at `sample_rate`); returns the events they complete."""
        samples = np.asarray(frame, dtype=np.float32).reshape(-1)
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples)
        self._pending = np.concatenate([self._pending, samples])
        events = []
        while self._pending.shape[0] >= WINDOW:
            window, self._pending = self._pending[:WINDOW], self._pending[WINDOW:]
            self.probability, self.state = self.model.probability(window, self.state)
            event = self.tracker.update(self.windows, self.probability)
            self.windows += 1
            if event:
                events.append(event)
        return events

    def flush(self) -> list[VadEvent]:
        """End of stream: close an open speech span at the current time."""
        if not self.tracker.in_speech:
            return []
        self.tracker.in_speech = False
        return [VadEvent("speech_end", self.windows * FRAME_S)]
