"""The C++ log-mel kernel (audio/mel_kernel.py): each build this CPU runs against the float64 log mel of the same
frames, its reflected edges, partial vectors of frames, output rows of any stride, the one-pass floor and scale, and
its checks on bad input."""
import numpy as np
import pytest
import torch

from funaudiochat.audio import mel_kernel
from funaudiochat.audio.mel import N_FFT, _constants, log_mel, log_mel_frames, mel_filters
from funaudiochat.native import runnable_variants

BUILDS = [v for v in runnable_variants() if v in mel_kernel.VARIANTS]
pytestmark = pytest.mark.skipif(not BUILDS, reason="the mel kernel has no build for this CPU (AVX2 or AVX-512)")


def log_mel_float64(wav: torch.Tensor, start: int, frames: int, n_mels: int) -> torch.Tensor:
    """log10(max(mel power, 1e-10)) of wav[start + 160 t : start + 160 t + 400], reflected, in float64 -> [M, T]."""
    index = start + 160 * torch.arange(frames)[:, None] + torch.arange(N_FFT)  # [T, 400]
    n = wav.shape[0]
    index = torch.where(index < 0, -index, torch.where(index >= n, 2 * (n - 1) - index, index))
    spectrum = torch.fft.rfft(wav.double()[index] * torch.hann_window(N_FFT, dtype=torch.float64))
    return (torch.from_numpy(mel_filters(n_mels)).double() @ (spectrum.abs() ** 2).T).clamp(min=1e-10).log10()


def run(variant, wav, start, out, n_mels):
    _, window, sparse = _constants(n_mels, torch.device("cpu"))
    mel_kernel.ops(variant).log_mel(wav, start, out, window, *sparse)


@pytest.mark.parametrize("variant", BUILDS)
@pytest.mark.parametrize("n_mels", [80, 128])
def test_each_build_equals_float64_log_mel(variant, n_mels):
    """Frame counts that fill no, some and many vectors of 16 (AVX-512) or 8 (AVX2) frames, frames reflected at both
    ends (start -200, as Whisper centres them) or wholly inside (start 0), one and two threads. What Whisper's
    features keep (values above the clip's max - 8 floor) to 5e-5 of the float64 log; the loud values (above max - 3)
    to 5e-6. Below the floor, a float32 FFT's absolute rounding dominates quiet bins (any FFT's: only the floor is
    ever read there)."""
    g = torch.Generator().manual_seed(0)
    for samples, start, frames in [(1234, -200, 7), (4000, -200, 25), (4000, 0, 21), (16000, -200, 100),
                                   (16000 * 3 + 77, -200, 300), (401, 0, 1)]:
        wav = torch.randn(samples, generator=g) * torch.linspace(0.01, 1, samples)
        want = log_mel_float64(wav, start, frames, n_mels)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = torch.full((n_mels, frames), float("nan"))
            run(variant, wav, start, out, n_mels)
            peak = want.max()
            kept, loud = want > peak - 8, want > peak - 3
            torch.testing.assert_close(out.double()[kept], want[kept], atol=5e-5, rtol=0)
            torch.testing.assert_close(out.double()[loud], want[loud], atol=5e-6, rtol=0)
            assert torch.all(out[~kept] < peak - 8 + 1e-4)


@pytest.mark.parametrize("variant", BUILDS)
def test_rows_of_a_wider_output_and_silence(variant):
    """out may be columns of a wider tensor (the frontend writes the computed frames of a longer window): only they
    change. Frames of exact zeros give log10(1e-10) = -10. A pure tone keeps its window's quiet side lobes above the
    floor, where float32 FFTs round to about 1e-4 of the log (torch's: 9.6e-5 on these frames, the kernel 1.1e-4)."""
    wav = torch.zeros(3200)
    wav[1600:] = torch.sin(torch.arange(1600) * 0.3)
    wide = torch.full((80, 40), 7.0)
    run(variant, wav, -200, wide[:, 3:23], 80)
    assert torch.all(wide[:, :3] == 7.0) and torch.all(wide[:, 23:] == 7.0)
    torch.testing.assert_close(wide[:, 3:6], torch.full((80, 3), -10.0), atol=1e-6, rtol=0)  # frames of zeros
    want = log_mel_float64(wav, -200, 20, 80)
    kept = want > want.max() - 8
    torch.testing.assert_close(wide[:, 3:23].double()[kept], want[kept], atol=2e-4, rtol=0)


@pytest.mark.parametrize("variant", BUILDS)
def test_floor_and_scale_in_one_pass_equals_torch(variant):
    """(max(x, floor) + 4) / 4 as one pass: the same floats as torch's three (a quarter scales exactly), on lengths
    with and without a vector tail."""
    for n in (1, 15, 16, 17, 1000, 100003):
        x = torch.randn(n) * 5
        want = (torch.maximum(x, torch.tensor(-2.5)) + 4.0) / 4.0
        mel_kernel.ops(variant).floor_and_scale_(x, -2.5)
        assert torch.equal(x, want)


def test_whole_clip_and_frame_by_frame_agree():
    """log_mel (reflect-padded inside the kernel) and log_mel_frames (a padded signal, frames from 0) read the same
    frames: the same numbers, whichever path this CPU takes."""
    wav = torch.randn(16000) * 0.1
    padded = torch.cat([wav[1:201].flip(0), wav, wav[-201:-1].flip(0)])
    unfloored = log_mel_frames(padded, 128)[:, : 16000 // 160]
    floored = log_mel(wav)
    torch.testing.assert_close(torch.maximum(unfloored, unfloored.max() - 8.0).add(4.0).mul(0.25), floored,
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", BUILDS)
def test_bad_input_is_refused(variant):
    wav, out = torch.randn(1000), torch.empty(80, 4)
    _, window, sparse = _constants(80, torch.device("cpu"))
    op = mel_kernel.ops(variant).log_mel
    cases = [
        ((wav.double(), -200, out, window, *sparse), "contiguous 1-D float32"),
        ((torch.randn(2000)[::2], -200, out, window, *sparse), "contiguous 1-D float32"),
        ((wav, -200, torch.empty(4, 80).T, window, *sparse), "contiguous rows"),
        ((wav, -200, torch.empty(80, 20), window, *sparse), "reach past"),
        ((wav, -1000, out, window, *sparse), "reach past"),
        ((wav, -200, out, window[:399].contiguous(), *sparse), "400 contiguous"),
        ((wav, -200, out, window, sparse[0][:79].contiguous(), *sparse[1:]), "int64 \\[mels\\]"),
        ((wav, -200, out, window, sparse[0] + 150, *sparse[1:]), "reaches past"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            op(*args)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        mel_kernel.ops(variant).floor_and_scale_(torch.randn(4, 4).T, 0.0)


def test_switched_off_the_frontend_takes_torch_fft():
    """set_enabled(False) (as $FUNAUDIOCHAT_MEL_KERNEL=0) routes to torch's FFT, within float32 rounding of the
    kernel's features."""
    wav = torch.randn(48000) * torch.linspace(0.05, 1, 48000)
    on = log_mel(wav)
    mel_kernel.set_enabled(False)
    try:
        assert mel_kernel.load() is None
        off = log_mel(wav)
    finally:
        mel_kernel.set_enabled(True)
    torch.testing.assert_close(on, off, atol=2e-5, rtol=0)
