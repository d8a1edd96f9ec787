"""One line naming the machine a benchmark ran on: CPU model, cores, the SIMD flags that change kernels (AVX2,
AVX-512, AMX), torch build and date. Every bench script prints it first, so every BENCHMARKS.md figure carries it."""
from __future__ import annotations

import datetime
import os
import platform

import torch

SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile")


def cpu_flags() -> tuple[str, list[str]]:
    """(CPU model name, the SIMD flags of SIMD_FLAGS it has) from /proc/cpuinfo (Linux); ('unknown', []) elsewhere."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model, [f for f in SIMD_FLAGS if f in flags]


def machine_line() -> str:
    model, simd = cpu_flags()
    has_512 = any(f.startswith("avx512") for f in simd)
    return (f"machine: {model}, {os.cpu_count()} CPUs, SIMD {' '.join(simd) or 'none'}"
            f" ({'AVX-512' if has_512 else 'no AVX-512'}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {datetime.date.today().isoformat()}")


if __name__ == "__main__":
    print(machine_line())
