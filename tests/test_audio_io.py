"""load_audio / save_wav / resample: formats, rates, channels, and every documented bad input."""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch

from funaudiochat.audio import io as audio_io
from funaudiochat.audio.io import load_audio, resample, save_wav
from funaudiochat.errors import InputError


def sine(freq: float, rate: int, seconds: float = 1.0, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


def peak_hz(wav: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return float(np.argmax(spectrum)) * rate / len(wav)


def needs_ffmpeg():
    if shutil.which("ffmpeg") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("ffmpeg is not installed, and CI=true forbids skipping the mp3 test")
        pytest.skip("ffmpeg is not installed: mp3 decoding cannot be tested here")


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS")])
def test_formats_load_as_mono_float32(tmp_path, fmt, subtype):
    path = tmp_path / f"a.{fmt.lower()}"
    sf.write(path, sine(440, 16000), 16000, format=fmt, subtype=subtype)
    wav = load_audio(path)
    assert wav.dtype == np.float32 and wav.ndim == 1 and wav.shape[0] == 16000
    assert abs(peak_hz(wav, 16000) - 440) < 2
    if fmt != "OGG":  # lossless: equal up to 16-bit quantisation
        np.testing.assert_allclose(wav, sine(440, 16000), atol=1 / 32768)


@pytest.mark.parametrize("rate", [8000, 44100, 48000])
def test_resampled_to_16k_keeps_duration_and_pitch(tmp_path, rate):
    path = tmp_path / "a.wav"
    sf.write(path, sine(440, rate, seconds=1.5), rate, subtype="FLOAT")
    wav = load_audio(path, 16000)
    assert abs(wav.shape[0] - 24000) <= 1
    assert abs(peak_hz(wav, 16000) - 440) < 2
    assert abs(peak_hz(resample(sine(1000, rate), rate, 16000), 16000) - 1000) < 2


def test_stereo_is_averaged_and_bytes_equal_path(tmp_path):
    left, right = sine(440, 16000), sine(1000, 16000, amp=0.25)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    wav = load_audio(path)
    np.testing.assert_allclose(wav, (left + right) / 2, atol=1e-6)
    np.testing.assert_array_equal(load_audio(path.read_bytes()), wav)


def test_arrays_need_a_rate_and_accept_both_channel_layouts():
    left, right = sine(440, 8000), sine(1000, 8000)
    with pytest.raises(InputError, match="source_rate"):
        load_audio(left)
    channels_first = torch.from_numpy(np.stack([left, right]))  # [2, S]
    wav = load_audio(channels_first, 16000, source_rate=8000)
    np.testing.assert_allclose(wav, resample((left + right) / 2, 8000, 16000), atol=1e-6)
    pcm = (left * 32767).astype(np.int16)
    np.testing.assert_allclose(load_audio(pcm, 8000, source_rate=8000), left, atol=1e-4)
    with pytest.raises(InputError, match="got shape"):
        load_audio(np.zeros((2, 2, 100), np.float32), source_rate=8000)
    with pytest.raises(InputError, match="expected a path, file bytes or an array"):
        load_audio(12345)


def test_mp3_through_ffmpeg(tmp_path):
    needs_ffmpeg()
    path = tmp_path / "a.mp3"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=1",
                    "-ar", "44100", "-y", str(path)], check=True)
    for source in (path, path.read_bytes()):
        wav = load_audio(source)
        assert abs(wav.shape[0] - 16000) < 200  # mp3 frames round the length a little
        assert abs(peak_hz(wav, 16000) - 440) < 2


def test_missing_and_empty(tmp_path):
    with pytest.raises(InputError, match="nope.wav: no such file"):
        load_audio(tmp_path / "nope.wav")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(InputError, match="empty.wav: is empty"):
        load_audio(tmp_path / "empty.wav")
    with pytest.raises(InputError, match="<bytes>: is empty"):
        load_audio(b"")


def test_zero_length_audio(tmp_path):
    path = tmp_path / "zero.wav"
    sf.write(path, np.zeros(0, np.float32), 16000)
    with pytest.raises(InputError, match="contains no samples"):
        load_audio(path)


def test_truncated_wav_loads_what_is_there_with_a_warning(tmp_path, caplog):
    path = tmp_path / "cut.wav"
    sf.write(path, sine(440, 16000), 16000, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: 44 + 2 * 6000])  # 44-byte header, then 6000 of the 16000 samples
    with caplog.at_level("WARNING", logger="funaudiochat.audio.io"):
        wav = load_audio(path)
    assert wav.shape[0] == 6000 and "truncated" in caplog.text
    np.testing.assert_allclose(wav, sine(440, 16000)[:6000], atol=1 / 32768)
    path.write_bytes(data[:44])  # header only
    with pytest.raises(InputError, match="truncated"):
        load_audio(path)


def test_not_audio(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("this is not audio\n" * 50)
    with pytest.raises(InputError, match="notes.txt"):
        load_audio(text)
    with pytest.raises(InputError, match="<bytes>"):
        load_audio(np.random.default_rng(0).bytes(4000))


def test_not_audio_without_ffmpeg_says_to_install_it(monkeypatch):
    monkeypatch.setattr(audio_io.shutil, "which", lambda _: None)
    with pytest.raises(InputError, match="install ffmpeg"):
        load_audio(b"ID3 not really an mp3" * 20, name="clip.mp3")


def test_nan_and_inf(tmp_path):
    wav = sine(440, 16000)
    wav[100] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(path, wav, 16000, subtype="FLOAT")
    with pytest.raises(InputError, match="nan.wav: contains NaN or inf"):
        load_audio(path)
    wav[100] = np.inf
    with pytest.raises(InputError, match="<array>: contains NaN or inf"):
        load_audio(wav, source_rate=16000)


def test_min_seconds(tmp_path):
    path = tmp_path / "short.wav"
    sf.write(path, sine(440, 16000, seconds=0.5), 16000)
    assert load_audio(path, min_seconds=0.5).shape[0] == 8000
    with pytest.raises(InputError, match="shorter than the minimum 1.0 s"):
        load_audio(path, min_seconds=1.0)


@pytest.mark.parametrize("float32", [False, True])
def test_save_wav_round_trip(tmp_path, float32):
    wav = torch.from_numpy(sine(440, 24000))
    save_wav(tmp_path / "out.wav", wav, 24000, float32=float32)
    info = sf.info(tmp_path / "out.wav")
    assert info.samplerate == 24000 and info.subtype == ("FLOAT" if float32 else "PCM_16")
    np.testing.assert_allclose(load_audio(tmp_path / "out.wav", 24000), wav.numpy(), atol=0 if float32 else 1 / 32768)
