"""Speaker x-vector (192-d) from a reference recording with CosyVoice's CAM++ model (`campplus.onnx`).

As the released frontend does: 16 kHz mono audio -> Kaldi fbank (80 bins, 25/10 ms, povey window, no dither) as
computed by torchaudio.compliance.kaldi.fbank on samples in [-1, 1] -> subtract the per-bin mean over time ->
CAM++ -> [1, 192]. The fbank is written here in torch (torchaudio is not a dependency).

Shapes: T samples, N frames, K = 257 FFT bins (512-point), B = 80 mel bins.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from funaudiochat.errors import CheckpointError, InputError

SAMPLE_RATE = 16000


def _mel(f: torch.Tensor | float):
    return 1127.0 * ((1.0 + f / 700.0).log() if isinstance(f, torch.Tensor) else math.log(1.0 + f / 700.0))


def kaldi_mel_banks(n_bins: int, n_fft: int, sample_rate: int, low_freq: float = 20.0,
                    high_freq: float = 0.0) -> torch.Tensor:
    """Kaldi's triangular filters on the mel scale, [B, n_fft // 2 + 1] (the Nyquist column is zero)."""
    nyquist = 0.5 * sample_rate
    high_freq = high_freq if high_freq > 0 else nyquist + high_freq
    mel_low, mel_high = _mel(low_freq), _mel(high_freq)
    delta = (mel_high - mel_low) / (n_bins + 1)
    b = torch.arange(n_bins, dtype=torch.float32).unsqueeze(1)
    left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    mel = _mel(sample_rate / n_fft * torch.arange(n_fft // 2, dtype=torch.float32)).unsqueeze(0)
    up, down = (mel - left) / (center - left), (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return torch.nn.functional.pad(banks, (0, 1))


def kaldi_fbank(wav: torch.Tensor, sample_rate: int = SAMPLE_RATE, n_bins: int = 80) -> torch.Tensor:
    """torchaudio.compliance.kaldi.fbank(wav, num_mel_bins=n_bins, dither=0) for 1-D float wav -> [N, B]."""
    frame, shift = int(sample_rate * 0.025), int(sample_rate * 0.010)
    if wav.shape[0] < frame:
        raise InputError(f"reference audio is {wav.shape[0] / sample_rate:.3f} s long; it needs at least 25 ms")
    n_fft = 1 << (frame - 1).bit_length()
    frames = wav.float().unfold(0, frame, shift)  # [N, frame]
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - 0.97 * previous
    frames = frames * torch.hann_window(frame, periodic=False).pow(0.85)  # the "povey" window
    power = torch.fft.rfft(frames, n=n_fft).abs().pow(2)  # [N, K]
    energies = power @ kaldi_mel_banks(n_bins, n_fft, sample_rate).T  # [N, B]
    return torch.clamp(energies, min=torch.finfo(torch.float32).eps).log()


class SpeakerEncoder:
    """CAM++ ONNX model: a wav path (any rate, mixed to mono) or a 16 kHz array -> x-vector [1, 192]."""

    def __init__(self, onnx_path: str | Path):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        try:
            self.session = onnxruntime.InferenceSession(str(onnx_path), sess_options=options,
                                                        providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types
            raise CheckpointError(f"{onnx_path}: cannot load the CAM++ speaker model ({err})") from None
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, audio) -> torch.Tensor:
        if isinstance(audio, (str, Path)):
            from funaudiochat.audio.io import load_audio

            audio = load_audio(audio, SAMPLE_RATE)
        feats = kaldi_fbank(torch.as_tensor(np.asarray(audio, dtype=np.float32)))
        feats = feats - feats.mean(dim=0, keepdim=True)
        out = self.session.run(None, {self.input_name: feats.unsqueeze(0).numpy()})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).reshape(1, -1)
