"""Whisper log-mel front-end: `log_mel` (openai-whisper / s3tokenizer) and `WhisperFrontend` (transformers).

Both compute, at 16 kHz: a centred STFT (n_fft 400, hop 160, periodic Hann, reflect padding) without its last
frame, power spectrum, Slaney mel filters (80 or 128 bins, 0-8 kHz), log10(max(mel, 1e-10)), a floor at the
item's maximum - 8, then (x + 4) / 4. They run on the input's device, in float32: on AVX-512 / AVX2 CPUs the
C++ kernel of mel_kernel.py computes the log mel and the floor, elsewhere torch's FFT and products.

Shapes: B batch, S samples, T frames (S // 160), M mel bins.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from funaudiochat.audio import mel_kernel
from funaudiochat.errors import InputError

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
_FRAME_BLOCK = 1024  # frames per FFT call: keeps the working set small (cache-resident, no huge allocations)
_FILTER_BLOCKS = 8  # row blocks of the banded mel filter bank (see _constants)
_LOG_SILENCE = math.log10(1e-10)  # the log-mel of a frame of exact zeros


def _hz_to_mel(f):
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    return np.where(f < 1000.0, 3.0 * f / 200.0, 15.0 + np.log(np.maximum(f, 1e-12) / 1000.0) * 27.0 / np.log(6.4))


def _mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    return np.where(m < 15.0, 200.0 * m / 3.0, 1000.0 * np.exp((m - 15.0) * np.log(6.4) / 27.0))


def mel_filters(n_mels: int) -> np.ndarray:
    """Slaney-normalised triangular mel filters over the rfft bins, [n_mels, N_FFT // 2 + 1] float32."""
    fft_hz = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), n_mels + 2))  # [M + 2]
    rise = (fft_hz[None, :] - edges[:-2, None]) / np.diff(edges)[:-1, None]  # [M, F]
    fall = (edges[2:, None] - fft_hz[None, :]) / np.diff(edges)[1:, None]
    weights = np.maximum(0.0, np.minimum(rise, fall)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _constants(n_mels: int, device: torch.device) -> tuple[list, torch.Tensor, tuple]:
    """The filter bank's blocks, the Hann window and the filter bank in the C++ kernel's sparse form, built once per
    device. The blocks are applied to the squared real view of the rfft
    ([t, 2F]: re², im² of each bin side by side), so each filter column appears twice: the power re² + im² is summed
    by the projection itself, with no separate pass over the spectrum. The bank is banded: it is cut into row blocks,
    each with the span of columns it touches, so a few small matmuls over their spans skip most of its zeros."""
    bank = mel_filters(n_mels)  # [M, F]
    filters = np.repeat(bank, 2, axis=1)  # [M, 2F]
    blocks = []
    for rows in np.array_split(np.arange(n_mels), _FILTER_BLOCKS):
        bins = np.flatnonzero(filters[rows].any(axis=0))
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, bins[0], bins[-1] + 1
        blocks.append((r0, r1, c0, c1, torch.from_numpy(filters[r0:r1, c0:c1].copy()).to(device)))
    return blocks, torch.hann_window(N_FFT, device=device), mel_kernel.sparse_form(bank)


def _log_mel_unfloored(wav: torch.Tensor, n_mels: int, n_frames: int | None = None) -> torch.Tensor:
    """log10 mel power of wav [B, S] -> [B, M, n_frames], before the max - 8 floor.

    n_frames defaults to S // HOP; frames past S // HOP are taken as all-zero windows (zero padding).
    """
    batch, samples = wav.shape
    if samples <= N_FFT // 2:
        raise InputError(f"audio of {samples} samples is too short for the log-mel front-end (needs more than "
                         f"{N_FFT // 2} samples, {N_FFT // 2 / SAMPLE_RATE * 1000:.1f} ms at 16 kHz)")
    computed = samples // HOP
    out = wav.new_empty(batch, n_mels, n_frames or computed)
    out[..., computed:] = _LOG_SILENCE
    for b in range(batch):  # frame t is centred on sample 160 t: it starts 200 samples before it, reflected
        _log_mel_into(out[b, :, :computed], wav[b], -(N_FFT // 2))
    return out


def log_mel_frames(padded: torch.Tensor, n_mels: int) -> torch.Tensor:
    """Unfloored log10 mel of the frames of an already padded 1-D signal: frame i is padded[160 i : 160 i + 400]
    -> [M, (len - 400) // 160 + 1]. Used to extend a clip's features frame by frame as its samples arrive."""
    out = padded.new_empty(n_mels, max(0, (padded.shape[-1] - N_FFT) // HOP + 1))
    _log_mel_into(out, padded, 0)
    return out


def _log_mel_into(out: torch.Tensor, wav: torch.Tensor, start: int) -> None:
    """Write the log10 mel power of the frames wav[start + 160 t : start + 160 t + 400] of a 1-D wave, reflected past
    either end, into out [M, T].

    On AVX-512 / AVX2 CPUs the C++ kernel does it all (mel_kernel.py). Otherwise the frames go through in blocks of
    _FRAME_BLOCK (cache-sized), windowed into one reused buffer, and each block's mel and log are written straight
    into its slice of the output, in place.
    """
    total = out.shape[1]
    if total == 0:
        return
    filter_blocks, window, sparse = _constants(out.shape[0], out.device)
    if mel_kernel.log_mel_into(out, wav, start, window, sparse):
        return
    left, right = max(0, -start), max(0, start + (total - 1) * HOP + N_FFT - wav.shape[-1])
    padded = torch.cat([wav[1:left + 1].flip(-1), wav, wav[-right - 1:-1].flip(-1)]) if left or right else wav
    frames = padded[start + left:].unfold(-1, N_FFT, HOP)  # [>= T, N_FFT] view
    block = min(_FRAME_BLOCK, total)
    windowed = frames.new_empty(block, N_FFT)
    for first in range(0, total, block):
        stop = min(first + block, total)
        n = stop - first
        torch.mul(frames[first:stop], window, out=windowed[:n])
        spectrum = torch.fft.rfft(windowed[:n])  # (out= would add a copy: the FFT writes its own buffer)
        squares = torch.view_as_real(spectrum).square_().view(n, N_FFT + 2)  # [t, 2F]: re², im² side by side
        for r0, r1, c0, c1, weights in filter_blocks:
            torch.matmul(weights, squares[:, c0:c1].T, out=out[r0:r1, first:stop])
        log_block = out[:, first:stop].clamp_(min=1e-10)
        torch.log10(log_block, out=log_block)  # while the block is still in cache (faster than log10_)


def _floor_and_scale_(log_spec: torch.Tensor) -> torch.Tensor:
    """In place on [B, M, T]: max(x, item max - 8), then (x + 4) / 4."""
    floor = log_spec.amax(dim=(1, 2), keepdim=True) - 8.0  # [B, 1, 1]
    if mel_kernel.floor_and_scale_(log_spec, floor):
        return log_spec
    return torch.maximum(log_spec, floor, out=log_spec).add_(4.0).mul_(0.25)


def floor_and_scale(log_spec: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """Frames of a clip whose largest log10 mel value is `peak`: max(x, peak - 8), then (x + 4) / 4 (a new tensor;
    the same float32 operations as the whole-clip path, for features computed piece by piece)."""
    return torch.maximum(log_spec, peak - 8.0).add_(4.0).mul_(0.25)


def log_mel(wav: torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    """openai-whisper's `log_mel_spectrogram` without padding: [S] -> [M, S // 160], [B, S] -> [B, M, S // 160].

    The max - 8 floor is per item. This is what s3tokenizer's `log_mel_spectrogram` computes.
    """
    wav = torch.as_tensor(wav, dtype=torch.float32)
    out = _floor_and_scale_(_log_mel_unfloored(wav.reshape(-1, wav.shape[-1]), n_mels))
    return out[0] if wav.dim() == 1 else out


class WhisperFrontend:
    """transformers' `WhisperFeatureExtractor(feature_size=n_mels, chunk_length=...)` with
    `sampling_rate=16000, return_attention_mask=True`, as batched torch on the input's device.

    `padding="max_length"` truncates/pads each wave to chunk_length s (T = chunk_length * 100 frames);
    `"longest"` pads to the longest wave (T = its length // 160). The mask has ceil(L / 160) ones per item.
    Frames that see only zero padding are not computed: they are exactly log10(1e-10) before the floor.
    """

    def __init__(self, n_mels: int = 128, chunk_length: int = 30):
        self.n_mels = n_mels
        self.n_samples = chunk_length * SAMPLE_RATE

    def __call__(self, wavs: list, padding: str = "max_length") -> tuple[torch.Tensor, torch.Tensor]:
        """wavs: list of 1-D 16 kHz waves (numpy or torch). Returns features [B, M, T] float32, mask [B, T] int64."""
        if padding not in ("max_length", "longest"):
            raise InputError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        if not wavs:
            raise InputError("WhisperFrontend got an empty list of waves")
        device = wavs[0].device if isinstance(wavs[0], torch.Tensor) else torch.device("cpu")
        wavs = [torch.as_tensor(w, dtype=torch.float32, device=device).reshape(-1) for w in wavs]
        if padding == "max_length":
            wavs = [w[: self.n_samples] for w in wavs]
        lengths = [w.shape[0] for w in wavs]
        total = self.n_samples if padding == "max_length" else max(lengths)
        computed = min(total, max(lengths) + N_FFT)  # past this, every frame's window holds only zeros
        if all(n == computed for n in lengths):  # nothing to pad (a full 30 s clip): no copy for one wave
            batch = wavs[0][None] if len(wavs) == 1 else torch.stack(wavs)  # [B, S']
        else:
            batch = wavs[0].new_zeros(len(wavs), computed)
            for row, w in zip(batch, wavs):
                row[: w.shape[0]] = w
        n_frames = total // HOP
        features = _floor_and_scale_(_log_mel_unfloored(batch, self.n_mels, n_frames))  # [B, M, T]
        valid = torch.tensor([-(-n // HOP) for n in lengths], device=device)  # ceil(L / HOP) frames per item
        mask = (torch.arange(n_frames, device=device) < valid[:, None]).long()  # [B, T]
        return features, mask
