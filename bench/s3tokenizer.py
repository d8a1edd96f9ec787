"""Speed of the S3 speech tokenizer: torch module vs onnxruntime on its ONNX export, side by side.

    .venv/bin/python bench/s3tokenizer.py [--threads 2] [--seconds 10] [--sizes tiny released]

Random weights (speed does not depend on their values). Each size is exported to ONNX once (the released size
writes a ~1 GB file to a temporary folder). Per size it prints the log-mel time, the median time per utterance of
the torch backend and the onnxruntime backend (one utterance at a time, as released), their ratio, and the real-time
factor; codes of both backends are checked to agree.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from funaudiochat.audio.mel import log_mel
from funaudiochat.speech.s3onnx import S3TokenizerONNX, export_onnx
from funaudiochat.speech.s3tokenizer import S3Tokenizer, S3TokenizerConfig

from machine import machine_line  # bench/machine.py: CPU model and SIMD flags

SIZES = {
    "tiny": S3TokenizerConfig(n_audio_state=256, n_audio_head=4, n_audio_layer=2),  # the s3v3-tiny golden
    "released": S3TokenizerConfig(),  # speech_tokenizer_v3: 1280 state, 20 heads, 12 layers
}


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line())
    torch.manual_seed(0)

    noise = 0.1 * np.random.default_rng(0).standard_normal(int(args.seconds * 16000))
    wav = torch.from_numpy(noise.astype(np.float32))
    t_mel = median_seconds(lambda: log_mel(wav, 128), args.repeats)
    mel = log_mel(wav, 128)[None]
    mel_len = torch.tensor([mel.shape[-1]])
    print(f"{args.seconds:g} s of audio, {args.threads} threads, torch {torch.__version__}; "
          f"log-mel {t_mel * 1e3:.1f} ms")
    print(f"{'size':<9} {'params':>8} {'torch ms':>9} {'onnx ms':>9} {'torch/onnx':>10} "
          f"{'RTF torch':>10} {'RTF onnx':>9}")
    for name in args.sizes:
        model = S3Tokenizer(SIZES[name]).eval()
        n_params = sum(p.numel() for p in model.parameters())
        with tempfile.TemporaryDirectory() as tmp:
            onnx_backend = S3TokenizerONNX(export_onnx(model, Path(tmp) / f"{name}.onnx"), threads=args.threads)
            t_torch = median_seconds(lambda: model.quantize(mel, mel_len), args.repeats)
            t_onnx = median_seconds(lambda: onnx_backend.quantize(mel, mel_len), args.repeats)
            same = torch.equal(model.quantize(mel, mel_len)[0], onnx_backend.quantize(mel, mel_len)[0])
        print(f"{name:<9} {n_params / 1e6:>7.1f}M {t_torch * 1e3:>9.1f} {t_onnx * 1e3:>9.1f} "
              f"{t_torch / t_onnx:>10.2f} {t_torch / args.seconds:>10.4f} {t_onnx / args.seconds:>9.4f}"
              + ("" if same else "  (codes differ!)"))


if __name__ == "__main__":
    main()
