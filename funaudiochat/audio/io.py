"""Load audio from a file, raw bytes or an array as mono float32 at one rate, validated; save wav; resample.

`load_audio` reads wav/flac/ogg (and whatever else libsndfile knows) with soundfile; anything soundfile refuses
(mp3, m4a, ...) goes through an `ffmpeg` subprocess. Channels are averaged to mono, then soxr (high quality)
resamples to `sample_rate`.

Every bad input raises `InputError` naming the input (its path, `<bytes>`, `<array>`, or `name=`) and the reason:

- missing path: "no such file"; a folder: "is a folder, not an audio file".
- empty file or empty bytes (0 bytes): "is empty (0 bytes)".
- not audio (text, random bytes): soundfile fails, then ffmpeg fails: "is not a readable audio file". Without
  ffmpeg on the machine the message says soundfile could not read it and to install ffmpeg for other formats.
- truncated wav (the header promises more data than the file holds): what is there is loaded and a warning is
  logged; if nothing is there it is an error ("truncated ... holds no samples"). A truncated flac/ogg is refused
  by soundfile and handed to ffmpeg, which decodes what it can (the loss is logged as a warning) or fails as
  "not a readable audio file".
- zero-length audio (a valid header with 0 samples): "contains no samples".
- NaN or inf samples: "contains NaN or inf samples".
- shorter than `min_seconds` (measured after resampling): "is X s long, shorter than the minimum Y s".
- an array without `source_rate` (or a rate that is not a positive number), an array with more than 2 dimensions
  or more than `MAX_CHANNELS` channels, a non-numeric array, float samples far outside [-1, 1] (int16 values stored
  as float), or a source of another type (not a path, bytes or array): says what to pass.

2-D arrays: the shorter axis is the channel axis, so [channels, samples] and [samples, channels] both work.
"""
from __future__ import annotations

import io
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from funaudiochat.errors import InputError

log = logging.getLogger(__name__)

MAX_CHANNELS = 8     # a 2-D array whose shorter axis is longer than this is not [samples, channels]
MAX_FLOAT_PEAK = 4.0  # float samples are in [-1, 1]; a larger peak means unscaled integer values
_TRUNCATED = re.compile(r"data : (\d+) \(should be (\d+)\)")  # libsndfile's note on a short wav data chunk


def load_audio(source, sample_rate: int = 16000, *, source_rate: int | None = None, min_seconds: float = 0.0,
               name: str | None = None) -> np.ndarray:
    """Return `source` as a 1-D float32 mono waveform at `sample_rate`.

    `source`: a path (str or Path), the raw bytes of an audio file, or a numpy array / torch tensor of samples
    with `source_rate=` (1-D, or 2-D with channels on the shorter axis). `name` labels the input in errors.
    """
    _check_rate(sample_rate, "sample_rate", name or "load_audio")
    if isinstance(source, (np.ndarray, torch.Tensor)):
        label = name or "<array>"
        if source_rate is None:
            raise InputError(f"{label}: an array of samples needs source_rate= (its sample rate in Hz)")
        _check_rate(source_rate, "source_rate", label)
        wav, rate = _from_array(source, label), source_rate
    elif isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        data = bytes(source)
        if not data:
            raise InputError(f"{label}: is empty (0 bytes)")
        wav, rate = _decode(data, label)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = name or str(path)
        if path.is_dir():
            raise InputError(f"{label}: is a folder, not an audio file")
        if not path.is_file():
            raise InputError(f"{label}: no such file")
        if path.stat().st_size == 0:
            raise InputError(f"{label}: is empty (0 bytes)")
        wav, rate = _decode(path, label)
    else:
        raise InputError(f"{name or type(source).__name__}: expected a path, file bytes or an array of samples, "
                         f"got {type(source).__name__}")
    if wav.shape[0] == 0:
        raise InputError(f"{label}: contains no samples (zero-length audio)")
    if not np.isfinite(wav).all():
        raise InputError(f"{label}: contains NaN or inf samples")
    wav = resample(wav.mean(axis=1) if wav.ndim == 2 else wav, rate, sample_rate)
    if wav.shape[0] < min_seconds * sample_rate:
        raise InputError(f"{label}: is {wav.shape[0] / sample_rate:.3f} s long, shorter than the minimum "
                         f"{min_seconds} s")
    return wav


def resample(wav: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample a 1-D waveform (or [samples, channels]) with soxr, high quality; float32 out."""
    wav = np.asarray(wav, dtype=np.float32)
    return wav if from_rate == to_rate else soxr.resample(wav, from_rate, to_rate, quality="HQ").astype(np.float32)


def save_wav(path, wav, sample_rate: int, *, float32: bool = False) -> None:
    """Write a 1-D waveform (array or tensor, values in [-1, 1]) as 16-bit PCM wav, or 32-bit float wav."""
    if isinstance(wav, torch.Tensor):
        wav = wav.detach().float().cpu().numpy()
    sf.write(str(path), np.asarray(wav, dtype=np.float32), sample_rate, subtype="FLOAT" if float32 else "PCM_16")


def _check_rate(rate, what: str, label: str) -> None:
    ok = isinstance(rate, (int, float, np.integer, np.floating)) and not isinstance(rate, bool)
    if not ok or not np.isfinite(rate) or rate <= 0:
        raise InputError(f"{label}: {what} must be a positive sample rate in Hz (e.g. 16000), got {rate!r}")


def _from_array(x, label: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x).numpy()  # numpy has no bf16
    x = np.asarray(x)
    given = x.shape
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise InputError(f"{label}: expected numeric samples (float in [-1, 1] or integer PCM), got dtype {x.dtype}")
    shape = "a 1-D waveform, or 2-D [channels, samples] / [samples, channels]"
    if x.ndim == 0 or x.ndim > 2:
        raise InputError(f"{label}: expected {shape}, got shape {x.shape}")
    if x.ndim == 2:
        if x.shape[0] < x.shape[1]:
            x = x.T  # [channels, samples] -> [samples, channels]: the shorter axis holds the channels
        if x.shape[1] > MAX_CHANNELS:
            raise InputError(f"{label}: expected {shape} with at most {MAX_CHANNELS} channels, got shape {given}")
    if np.issubdtype(x.dtype, np.integer):
        return (x / float(np.iinfo(x.dtype).max + 1)).astype(np.float32)
    x = x.astype(np.float32, copy=False)
    finite = x[np.isfinite(x)]
    peak = float(np.abs(finite).max()) if finite.size else 0.0
    if peak > MAX_FLOAT_PEAK:
        raise InputError(f"{label}: float samples reach {peak:.0f}, far outside [-1, 1]; integer PCM values stored as "
                         f"float? Pass the integer array itself, or divide by 32768 (16-bit)")
    return x


def _decode(src: Path | bytes, label: str) -> tuple[np.ndarray, int]:
    """soundfile first, ffmpeg for what it cannot read. Returns ([samples] or [samples, channels], rate)."""
    try:
        return _read_soundfile(src, label)
    except sf.LibsndfileError as err:
        sf_error = str(err).split(": ", 1)[-1].rstrip(".")
    if shutil.which("ffmpeg") is None:
        raise InputError(f"{label}: soundfile cannot read it ({sf_error}); if it is mp3 or another format that "
                         "libsndfile lacks, install ffmpeg (e.g. `apt install ffmpeg`) and retry")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "decoded.wav"
        cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", "pipe:0" if isinstance(src, bytes) else str(src),
               "-vn", "-c:a", "pcm_f32le", "-y", str(out)]
        proc = subprocess.run(cmd, input=src if isinstance(src, bytes) else None, capture_output=True)
        if proc.returncode != 0 or not out.is_file():
            reason = (proc.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
            raise InputError(f"{label}: is not a readable audio file (soundfile: {sf_error}; ffmpeg: {reason})")
        if proc.stderr.strip():  # decoded, with complaints (e.g. a truncated stream): keep what came out
            log.warning("%s: ffmpeg: %s", label, proc.stderr.decode(errors="replace").strip())
        return _read_soundfile(out, label)


def _read_soundfile(src: Path | bytes, label: str) -> tuple[np.ndarray, int]:
    with sf.SoundFile(io.BytesIO(src) if isinstance(src, bytes) else str(src)) as f:
        short = _TRUNCATED.search(f.extra_info)
        wav = f.read(dtype="float32")
        rate = f.samplerate
    if short:
        if wav.shape[0] == 0:
            raise InputError(f"{label}: is truncated: its header promises {short[1]} bytes of audio but the file "
                             "holds no samples")
        log.warning("%s: truncated file: header promises %s bytes of audio, only %s present; loaded %d samples",
                    label, short[1], short[2], wav.shape[0])
    return wav, rate
