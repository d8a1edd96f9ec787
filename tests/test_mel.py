"""Whisper log-mel: golden features (transformers 4.52.3), s3tokenizer mels, transformers, librosa and a float64
computation as oracles.

Tolerances: a float32 front-end (the goldens', transformers', ours with torch's FFT or with the C++ kernel) lies about
1e-5 from the float64 features, the largest errors where the clip's max - 8 floor cuts quiet bins (measured on these
clips: the goldens up to 8.8e-6, the kernel 7.4e-6, torch's FFT 1.08e-5). The float64 test holds each path to 1.5e-5;
two float32 computations differ by the sum of their errors (1.6e-5 measured between the kernel and one golden, in
opposite directions), and their comparisons allow 2e-5."""
from __future__ import annotations

import librosa
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import WhisperFeatureExtractor

from funaudiochat.audio import mel_kernel
from funaudiochat.audio.mel import WhisperFrontend, log_mel, mel_filters
from funaudiochat.errors import InputError


@pytest.fixture(scope="module")
def frontend_golden(shared_dir):
    return load_file(shared_dir / "golden/frontend/frontend.safetensors")


@pytest.mark.parametrize("n_mels", [80, 128])
def test_filters_match_librosa(n_mels):
    np.testing.assert_allclose(mel_filters(n_mels), librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels),
                               atol=1e-8)


@pytest.mark.parametrize("padding", ["max_length", "longest"])
@pytest.mark.parametrize("n_mels", [80, 128])
def test_frontend_matches_golden(frontend_golden, n_mels, padding):
    names = sorted(k[len("wav."):] for k in frontend_golden if k.startswith("wav."))
    assert len(names) >= 5
    frontend = WhisperFrontend(n_mels=n_mels)
    for name in names:
        wav = frontend_golden[f"wav.{name}"]
        features, mask = frontend([wav], padding=padding)
        want = frontend_golden[f"mel{n_mels}.{padding}.{name}.features"]
        want_mask = frontend_golden[f"mel{n_mels}.{padding}.{name}.mask"]
        assert features.shape == (1, *want.shape) and features.dtype == torch.float32
        np.testing.assert_allclose(features[0].numpy(), want, atol=2e-5, err_msg=name)
        # transformers 4.52.3 returned one mask entry more than frames when the padded length is not a multiple
        # of 160 (a frame that the STFT drops); later versions trim it, as we do.
        n_frames = want.shape[-1]
        assert len(want_mask) == n_frames + (len(wav) % 160 != 0 and padding == "longest")
        np.testing.assert_array_equal(mask[0].numpy(), want_mask[:n_frames], err_msg=name)


def features_in_float64(wav: np.ndarray, n_mels: int, samples: int) -> np.ndarray:
    """Whisper's features of wav zero-padded or cut to `samples`, every step in float64 (torch.stft, reflect pad)."""
    wav = torch.nn.functional.pad(torch.from_numpy(wav[:samples]).double(), (0, max(0, samples - len(wav))))
    spectrum = torch.stft(wav, 400, 160, window=torch.hann_window(400, dtype=torch.float64), center=True,
                          pad_mode="reflect", return_complex=True)[:, :-1]
    logs = (torch.from_numpy(mel_filters(n_mels)).double() @ spectrum.abs() ** 2).clamp(min=1e-10).log10()
    return ((torch.maximum(logs, logs.max() - 8.0) + 4.0) / 4.0).numpy()


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch-fft"])
@pytest.mark.parametrize("n_mels", [80, 128])
def test_frontend_within_float32_rounding_of_float64(frontend_golden, n_mels, kernel):
    """Both paths (the C++ kernel where it builds, torch's FFT) against float64 features of the goldens' waves and
    of speech-like noise (a ramp of loudness: many bins near the floor)."""
    rng = np.random.default_rng(3)
    wavs = [v for k, v in sorted(frontend_golden.items()) if k.startswith("wav.")]
    wavs.append((0.3 * rng.standard_normal(16000 * 12) * np.linspace(0.01, 1, 16000 * 12)).astype(np.float32))
    mel_kernel.set_enabled(kernel)
    try:
        if kernel and mel_kernel.load() is None:
            pytest.skip("the mel kernel does not build on this CPU")
        for wav in wavs:
            features, _ = WhisperFrontend(n_mels=n_mels)([wav])
            np.testing.assert_allclose(features[0].numpy(), features_in_float64(wav, n_mels, 480000), atol=1.5e-5,
                                       rtol=0)
    finally:
        mel_kernel.set_enabled(True)


def test_frontend_batch_equals_one_by_one(frontend_golden):
    wavs = [v for k, v in sorted(frontend_golden.items()) if k.startswith("wav.")]
    frontend = WhisperFrontend()
    features, mask = frontend([torch.from_numpy(w) for w in wavs])
    for i, wav in enumerate(wavs):
        one, one_mask = frontend([wav])
        torch.testing.assert_close(features[i], one[0], atol=1e-6, rtol=0)
        assert torch.equal(mask[i], one_mask[0])


@pytest.mark.parametrize("padding", ["max_length", "longest"])
@pytest.mark.parametrize("n_mels", [80, 128])
def test_frontend_matches_transformers(n_mels, padding):
    rng = np.random.default_rng(1)
    lengths = [1234, 16000 * 2 + 77, 16000 * 31]  # odd, ordinary, longer than the 30 s window
    wavs = [(0.3 * rng.standard_normal(n) * np.linspace(0.1, 1, n)).astype(np.float32) for n in lengths]
    theirs = WhisperFeatureExtractor(feature_size=n_mels)(
        wavs, sampling_rate=16000, padding=padding, return_attention_mask=True, return_tensors="np",
        truncation=padding == "max_length")
    features, mask = WhisperFrontend(n_mels=n_mels)(wavs, padding=padding)
    np.testing.assert_allclose(features.numpy(), theirs["input_features"], atol=2e-5)
    np.testing.assert_array_equal(mask.numpy(), theirs["attention_mask"])
    assert mask.dtype == torch.int64
    assert mask.sum(-1).tolist() == [min(-(-n // 160), features.shape[-1]) for n in lengths]


def test_skipped_silent_frames_equal_full_computation():
    """max_length does not compute frames that see only zero padding; they must equal the full computation."""
    wav = torch.randn(16000 * 3 + 5) * 0.1
    features, _ = WhisperFrontend(chunk_length=10)([wav])
    padded = torch.nn.functional.pad(wav, (0, 16000 * 10 - wav.shape[0]))
    torch.testing.assert_close(features[0], log_mel(padded), atol=1e-6, rtol=0)
    silent, _ = WhisperFrontend(chunk_length=10)([torch.zeros(1000)])
    assert torch.all(silent == silent.flatten()[0])  # our own code: every silent value is the same number
    # Silence is log10(1e-10) = -10, floored and scaled: (-10 + 4) / 4. torch's float32 log10 is not correctly
    # rounded and differs by CPU kernel (-10.0 with AVX2, -10.000001 with AVX-512), so compare with a tolerance
    # of a few float32 ulps around 1.5 (~1.2e-7 each) rather than bit for bit.
    expected = torch.full_like(silent, (-10.0 + 4) / 4)
    torch.testing.assert_close(silent, expected, atol=1e-6, rtol=0)


def test_log_mel_matches_s3tokenizer(shared_dir):
    s3 = load_file(shared_dir / "golden/cosyvoice/s3v3-tiny/s3_io.safetensors")
    for i in (1, 2):
        mel = log_mel(torch.from_numpy(s3[f"wav{i}"]), n_mels=128)
        # the FFT and log10 kernels round differently by instruction set and library: 2.0e-5 at worst (5 of 12,800
        # values over 1e-5), against the golden made on another CPU
        np.testing.assert_allclose(mel.numpy(), s3[f"mel{i}"], atol=5e-5)
    both = torch.from_numpy(np.stack([s3["wav1"][: len(s3["wav2"])], s3["wav2"]]))  # [2, S]
    batched = log_mel(both)
    assert batched.shape == (2, 128, len(s3["wav2"]) // 160)
    for i in range(2):  # the floor is per item: a batch changes nothing
        torch.testing.assert_close(batched[i], log_mel(both[i]), atol=1e-6, rtol=0)
    np.testing.assert_allclose(batched[1].numpy(), s3["mel2"], atol=5e-5)


def test_bad_calls():
    with pytest.raises(InputError, match="padding"):
        WhisperFrontend()([np.zeros(16000, np.float32)], padding="do_not_pad")
    with pytest.raises(InputError, match="too short"):
        log_mel(torch.zeros(150))
