"""Robustness augmentations for synthetic speech, in numpy: additive noise at an SNR, reverberation, telephone band.

All functions take and return a 1-D float32 waveform; randomness comes from a `numpy.random.Generator` passed
by the caller, so an utterance re-synthesised with the same seed gets the same augmentation.
"""
from __future__ import annotations

import numpy as np

from funaudiochat.audio.io import resample
from funaudiochat.errors import InputError

NOISE_COLORS = ("white", "pink")
TELEPHONE_RATE = 8000
TELEPHONE_BAND = (300.0, 3400.0)  # Hz, the classic POTS voice band
MU = 255.0  # G.711 mu-law


def noise(n: int, color: str, rng: np.random.Generator) -> np.ndarray:
    """`n` samples of unit-RMS noise: "white" (flat spectrum) or "pink" (power falling as 1/f)."""
    if color not in NOISE_COLORS:
        raise InputError(f"noise color {color!r} is unknown; use one of {', '.join(NOISE_COLORS)}")
    white = rng.standard_normal(n)
    if color == "pink":
        spectrum = np.fft.rfft(white)
        f = np.arange(spectrum.shape[0], dtype=np.float64)
        f[0] = 1.0  # leave DC as is instead of dividing by zero
        white = np.fft.irfft(spectrum / np.sqrt(f), n)
    return (white / np.sqrt(np.mean(white**2))).astype(np.float32)


def add_noise(wav: np.ndarray, snr_db: float, rng: np.random.Generator, color: str = "white") -> np.ndarray:
    """Add noise so that 10·log10(signal power / noise power) = `snr_db`, powers averaged over the whole clip."""
    signal_power = float(np.mean(np.asarray(wav, dtype=np.float64) ** 2))
    if signal_power == 0.0:
        raise InputError("cannot add noise at an SNR to a silent waveform (its power is 0)")
    scale = np.sqrt(signal_power / 10.0 ** (snr_db / 10.0))
    return (wav + scale * noise(wav.shape[0], color, rng)).astype(np.float32)


def room_impulse_response(rt60: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """A synthetic impulse response: a unit direct path, then noise decaying by 60 dB over `rt60` seconds."""
    if not 0.0 < rt60 <= 5.0:
        raise InputError(f"reverb time (RT60) must be in (0, 5] seconds, got {rt60}")
    t = np.arange(int(rt60 * sample_rate)) / sample_rate
    tail = rng.standard_normal(t.shape[0]) * np.exp(-np.log(1000.0) * t / rt60)  # 1000x = 60 dB in amplitude
    tail *= 0.3 / np.sqrt(np.sum(tail**2) + 1e-12)  # tail energy relative to the direct path: a mid-sized room
    tail[0] = 1.0
    return tail


def add_reverb(wav: np.ndarray, sample_rate: int, rt60: float, rng: np.random.Generator) -> np.ndarray:
    """Convolve with a synthetic room response. The output keeps the reverb tail (longer by ~rt60) and the input's
    RMS level."""
    ir = room_impulse_response(rt60, sample_rate, rng)
    n = wav.shape[0] + ir.shape[0] - 1
    size = 1 << (n - 1).bit_length()
    wet = np.fft.irfft(np.fft.rfft(wav, size) * np.fft.rfft(ir, size), size)[:n]
    rms_in, rms_out = np.sqrt(np.mean(wav.astype(np.float64) ** 2)), np.sqrt(np.mean(wet**2))
    return (wet * (rms_in / rms_out if rms_out > 0 else 1.0)).astype(np.float32)


def band_pass(wav: np.ndarray, sample_rate: int, low_hz: float, high_hz: float) -> np.ndarray:
    """Zero every frequency outside [low_hz, high_hz] (an ideal FFT-domain filter over the whole clip)."""
    spectrum = np.fft.rfft(wav)
    freqs = np.fft.rfftfreq(wav.shape[0], 1.0 / sample_rate)
    spectrum[(freqs < low_hz) | (freqs > high_hz)] = 0.0
    return np.fft.irfft(spectrum, wav.shape[0]).astype(np.float32)


def telephone(wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """A narrow-band phone line: down to 8 kHz, G.711 mu-law 8-bit round trip, 300-3400 Hz band, back up.

    The band-pass is applied again at the output rate so nothing above 3.4 kHz survives resampling.
    """
    narrow = resample(wav, sample_rate, TELEPHONE_RATE)
    companded = np.sign(narrow) * np.log1p(MU * np.minimum(np.abs(narrow), 1.0)) / np.log1p(MU)
    quantised = np.round(companded * 127.0) / 127.0
    narrow = np.sign(quantised) * np.expm1(np.abs(quantised) * np.log1p(MU)) / MU
    narrow = band_pass(narrow, TELEPHONE_RATE, *TELEPHONE_BAND)
    wide = resample(narrow, TELEPHONE_RATE, sample_rate)[: wav.shape[0]]
    wide = np.pad(wide, (0, wav.shape[0] - wide.shape[0]))  # resampling may drop a sample or two
    return band_pass(wide, sample_rate, *TELEPHONE_BAND)
