"""Speed of our Whisper front-end vs transformers' WhisperFeatureExtractor (128 bins, 16 kHz, CPU).

    .venv/bin/python -m bench.mel [--runs 30] [--threads 2]

Both run in the same process, interleaved run by run, after a warm-up; figures are the median wall time and,
in brackets, the fastest run (a steadier figure on a shared, busy machine).
Cases: 30 s of audio (nothing to skip: the worst case for us), single and batch of 8, and 5 s of audio
padded to 30 s (the processor's usual call, where we skip the all-zero frames).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import WhisperFeatureExtractor

from funaudiochat.audio.mel import WhisperFrontend

from machine import machine_line  # bench/machine.py: CPU model and SIMD flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line())
    rng = np.random.default_rng(0)
    theirs = WhisperFeatureExtractor(feature_size=128)
    ours = WhisperFrontend(n_mels=128)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.runs} runs")
    print(f"{'case':<28}{'transformers ms':>20}{'ours ms':>18}{'speed-up':>16}")
    for label, seconds, batch in [("30 s, batch 1", 30, 1), ("30 s, batch 8", 30, 8),
                                  ("5 s padded to 30 s, batch 1", 5, 1), ("5 s padded to 30 s, batch 8", 5, 8)]:
        wavs = [(0.1 * rng.standard_normal(seconds * 16000)).astype(np.float32) for _ in range(batch)]
        runs = {
            "theirs": lambda: theirs(wavs, sampling_rate=16000, padding="max_length", return_attention_mask=True,
                                     return_tensors="pt"),
            "ours": lambda: ours(wavs, padding="max_length"),
        }
        times = {name: [] for name in runs}
        for i in range(args.runs + 3):  # the first 3 are warm-up
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                if i >= 3:
                    times[name].append(time.perf_counter() - start)
        (theirs_med, theirs_min), (ours_med, ours_min) = (
            (1e3 * float(np.median(times[n])), 1e3 * min(times[n])) for n in ("theirs", "ours"))
        print(f"{label:<28}{theirs_med:>10.2f} ({theirs_min:6.2f}){ours_med:>9.2f} ({ours_min:5.2f})"
              f"{theirs_med / ours_med:>8.1f}x ({theirs_min / ours_min:4.1f}x)")


if __name__ == "__main__":
    main()
