"""The C++ log-mel kernel (mel_kernel.cpp): Whisper's frames (reflected at the wave's ends), windowed 400-point real
FFTs, power, mel filter bank and log10 in one pass, LANES frames per vector (16 with AVX-512, 8 with AVX2).

Why a kernel: the FFT library torch calls (MKL's) transforms one 400-point frame at a time; on a voiced 30 s clip
it was about half of the front-end's time and bounded it at 2-4x transformers' extractor, which calls the same FFT
(BENCHMARKS.md, "Whisper log-mel front-end"). Across frames the transform is shuffle-free vector code.

Its values equal the torch path's (`torch.fft.rfft`, the filter bank, `torch.log10`) to fp32 rounding: the same
sums in another order, at least as close to a float64 reference as MKL's FFT (tests/test_mel_kernel.py).

Built on first use (`funaudiochat/native.py`) for AVX-512 or AVX2 CPUs; others, `$FUNAUDIOCHAT_MEL_KERNEL=0`, a
failed build (a warning, once) and tensors off the CPU or not float32 take the torch path in audio/mel.py.
"""
from __future__ import annotations

import functools
import logging
import os
import subprocess
import threading
from pathlib import Path

import numpy as np
import torch

from funaudiochat import native

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("mel_kernel.cpp")
VARIANTS = ("avx512", "avx2")  # the source has no scalar build
_state = {"op": None, "tried": False, "enabled": os.environ.get("FUNAUDIOCHAT_MEL_KERNEL", "1") != "0"}
_ops: dict[str, object] = {}
_lock = threading.Lock()


def ops(variant: str):
    """The ops of one build variant (any the CPU can run: tests check each), built or loaded here: its namespace,
    with `log_mel` and `floor_and_scale_`."""
    if variant not in _ops:
        namespace = f"funaudiochat_mel_{variant}"
        native.load_library(SOURCE, namespace, variant)
        _ops[variant] = getattr(torch.ops, namespace)
    return _ops[variant]


def load():
    """Build or load this CPU's kernel once per process -> the op, or None (off, no build for this CPU, or the build
    failed)."""
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            variant = native.this_cpus_variant()
            if _state["enabled"] and variant in VARIANTS:
                try:
                    _state["op"] = ops(variant)
                except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                    log.warning("the mel kernel could not be built (%s); the log-mel front-end uses torch's FFT",
                                (str(error).strip().splitlines() or [repr(error)])[-1])
    return _state["op"]


def set_enabled(enabled: bool) -> None:
    """Use the kernel (when it builds) or not, from the next call on (tests compare both paths)."""
    with _lock:
        _state.update(enabled=enabled, tried=False, op=None)


def sparse_form(filters: np.ndarray) -> tuple[torch.Tensor, ...]:
    """The filter bank [M, 201] row by row, as the kernel reads it: (first bin, bins, offset into weights) [M] int64
    and the weights of every row's span of bins, concatenated."""
    first, count, offset, weights = [], [], [], []
    for row in filters:
        bins = np.flatnonzero(row)
        lo, hi = (int(bins[0]), int(bins[-1]) + 1) if len(bins) else (0, 0)
        first.append(lo), count.append(hi - lo), offset.append(len(weights))
        weights.extend(row[lo:hi].tolist())
    as_long = functools.partial(torch.tensor, dtype=torch.long)
    return as_long(first), as_long(count), as_long(offset), torch.tensor(weights, dtype=torch.float32)


def log_mel_into(out: torch.Tensor, wav: torch.Tensor, start: int, window: torch.Tensor, sparse: tuple) -> bool:
    """out [M, T] = log10(max(mel power, 1e-10)) of the frames wav[start + 160 t : start + 160 t + 400] of a 1-D wave,
    reflected past either end (`sparse`: the filter bank's `sparse_form`), through the kernel -> True, or False (out
    untouched) where the kernel does not apply: the caller takes the torch path."""
    if wav.device.type != "cpu" or wav.dtype != torch.float32 or out.dtype != torch.float32 or out.stride(-1) != 1:
        return False
    kernel = load()
    if kernel is None:
        return False
    kernel.log_mel(wav.contiguous(), start, out, window, *sparse)
    return True


def floor_and_scale_(log_spec: torch.Tensor, floor: torch.Tensor) -> bool:
    """In place on log_spec [B, M, T] (contiguous), floor [B, 1, 1]: (max(x, floor) + 4) / 4 through the kernel ->
    True, or False (untouched) where it does not apply."""
    if log_spec.device.type != "cpu" or log_spec.dtype != torch.float32 or not log_spec.is_contiguous():
        return False
    kernel = load()
    if kernel is None:
        return False
    for item, value in zip(log_spec, floor.flatten().tolist()):
        kernel.floor_and_scale_(item, value)
    return True
