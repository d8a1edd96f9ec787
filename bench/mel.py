"""Speed of our Whisper front-end vs transformers' WhisperFeatureExtractor (128 bins, 16 kHz, CPU).

    .venv/bin/python bench/mel.py [--runs 40] [--threads 1 2] [--batches 1 8]

Both run in the same process, interleaved run by run, after a warm-up; figures are the median wall time and,
in brackets, the fastest run (a steadier figure on a shared, busy machine), then the median CPU time of the process
(with one thread, the work done without the time spent waiting for a busy CPU). Each thread count limits torch and
numpy's BLAS (threadpoolctl) alike.
Cases: a voiced 30 s clip (espeak-ng speech read end to end, no silence to skip: the worst case for us), single and
batch of 8, and 5 s of it padded to 30 s (the processor's usual call, where we skip the all-zero frames).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from transformers import WhisperFeatureExtractor

from funaudiochat.audio import mel_kernel
from funaudiochat.audio.mel import SAMPLE_RATE, WhisperFrontend, mel_filters
from funaudiochat.data.synth import Utterance, synthesize

from machine import machine_line  # bench/machine.py: CPU model and SIMD flags

TEXT = ("The quick brown fox jumps over the lazy dog while the farmer reads the weather report aloud. "
        "Seven bright stars shone above the quiet harbour, and nobody on the ship wanted to sleep that night.")


def voiced_clip(seconds: float) -> np.ndarray:
    """espeak-ng en-us speech, repeated with short gaps until it fills `seconds` (float32, 16 kHz)."""
    speech = synthesize(Utterance("bench-mel", TEXT, voice="espeak:en-us"), SAMPLE_RATE)
    speech = np.concatenate([speech, np.zeros(SAMPLE_RATE // 10, np.float32)])
    n = int(seconds * SAMPLE_RATE)
    return np.tile(speech, n // len(speech) + 1)[:n]


def features_in_float64(clip: np.ndarray) -> torch.Tensor:
    """Whisper's features of a 30 s clip with every step in float64 (the reference both sides round from)."""
    spectrum = torch.stft(torch.from_numpy(clip).double(), 400, 160, window=torch.hann_window(400, dtype=torch.float64),
                          return_complex=True)[:, :-1]
    logs = (torch.from_numpy(mel_filters(128)).double() @ spectrum.abs() ** 2).clamp(min=1e-10).log10()
    return (torch.maximum(logs, logs.max() - 8.0) + 4.0) / 4.0


def side_by_side(runs: dict, rounds: int) -> tuple[dict, dict]:
    """({name: [wall seconds per run]}, {name: [CPU seconds per run]}), the callables taking turns, after 3 warm-up
    rounds."""
    wall, cpu = {name: [] for name in runs}, {name: [] for name in runs}
    for i in range(rounds + 3):
        for name, fn in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            if i >= 3:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    print(machine_line())
    clip = voiced_clip(30)
    theirs = WhisperFeatureExtractor(feature_size=128)
    ours = WhisperFrontend(n_mels=128)
    cases = [("voiced 30 s, batch 1", [clip]), ("voiced 30 s, batch 8", [np.roll(clip, 997 * i) for i in range(8)]),
             ("5 s padded to 30 s, batch 1", [clip[:5 * SAMPLE_RATE]]),
             ("5 s padded to 30 s, batch 8", [np.roll(clip, 997 * i)[:5 * SAMPLE_RATE] for i in range(8)])]

    def extract(wavs):
        return theirs(wavs, sampling_rate=16000, padding="max_length", return_attention_mask=True,
                      return_tensors="pt")

    exact = features_in_float64(clip)
    ours_error = (ours([clip])[0][0].double() - exact).abs().max().item()
    theirs_error = (extract([clip])["input_features"][0].double() - exact).abs().max().item()
    print(f"torch {torch.__version__}, mel kernel {'on' if mel_kernel.load() else 'off'}, median of {args.runs} "
          f"interleaved runs (fastest in brackets); largest difference from float64 features on the 30 s clip: "
          f"ours {ours_error:.2e}, transformers {theirs_error:.2e}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n{threads} thread(s)\n{'case':<30}{'transformers ms':>20}{'ours ms':>18}{'speed-up':>16}"
              f"{'CPU ms theirs / ours':>24}{'CPU ratio':>10}")
        with threadpool_limits(threads):
            for label, wavs in (c for c in cases if len(c[1]) in args.batches):
                times, cpu = side_by_side({"theirs": lambda: extract(wavs), "ours": lambda: ours(wavs)}, args.runs)
                (theirs_med, theirs_min), (ours_med, ours_min) = (
                    (1e3 * float(np.median(times[n])), 1e3 * min(times[n])) for n in ("theirs", "ours"))
                theirs_cpu, ours_cpu = (1e3 * float(np.median(cpu[n])) for n in ("theirs", "ours"))
                print(f"{label:<30}{theirs_med:>10.2f} ({theirs_min:6.2f}){ours_med:>9.2f} ({ours_min:5.2f})"
                      f"{theirs_med / ours_med:>8.1f}x ({theirs_min / ours_min:4.1f}x)"
                      f"{theirs_cpu:>14.2f} / {ours_cpu:<7.2f}{theirs_cpu / ours_cpu:>7.1f}x")


if __name__ == "__main__":
    main()
