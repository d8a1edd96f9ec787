"""C++ operator libraries built on first use for this CPU's instruction set (model/int8_kernel.cpp,
audio/mel_kernel.cpp).

Build: the compiler torch.compile already needs (`$CXX`, else g++), one shared library per source, instruction set
(`avx512`, `avx2`, `scalar`: ATen's capability, so `ATEN_CPU_CAPABILITY=avx2` picks the AVX2 build) and torch
version, kept in ~/.cache/funaudiochat/kernels ($XDG_CACHE_HOME); about 10 s the first time, then loaded. Each build
registers its ops under a namespace of its own (`-DFAC_NS=...`), so several builds load side by side (tests check
each build the CPU runs).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from funaudiochat.fileio import user_cache_dir

PARALLEL_HEADER = Path(__file__).with_name("native_parallel.h")  # included by every library's source
VARIANT_FLAGS = {"avx512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"),
                 "avx2": ("-mavx2", "-mfma"), "scalar": ()}


def this_cpus_variant() -> str:
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "scalar")


def runnable_variants() -> list[str]:
    """The builds this CPU can execute, its own first (an AVX-512 CPU runs the AVX2 and scalar builds too)."""
    return {"avx512": ["avx512", "avx2", "scalar"], "avx2": ["avx2", "scalar"]}.get(this_cpus_variant(), ["scalar"])


def load_library(source: Path, namespace: str, variant: str) -> None:
    """Build (unless cached) and load the library of `source` for `variant`, its ops under torch.ops.<namespace>.
    Raises OSError, RuntimeError or subprocess.SubprocessError where the build fails."""
    torch.ops.load_library(str(_library(source, namespace, variant)))


def _library(source: Path, namespace: str, variant: str) -> Path:
    """The shared library of `source` built for `variant`, compiled into the cache folder unless it is there."""
    from torch.utils.cpp_extension import include_paths, library_paths

    torch_lib = library_paths()[0]
    flags = ["-O3", "-std=c++20", "-fPIC", "-shared", "-fopenmp", *VARIANT_FLAGS[variant],
             f"-DFAC_NS={namespace}", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             f"-I{PARALLEL_HEADER.parent}", *(f"-I{p}" for p in include_paths())]
    key = hashlib.sha256(source.read_bytes() + PARALLEL_HEADER.read_bytes() + " ".join(flags).encode()
                         + torch.__version__.encode()).hexdigest()
    folder = user_cache_dir() / "kernels"
    target = folder / f"{source.stem}_{variant}_{key[:16]}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so.tmp")
    os.close(fd)
    try:
        command = [os.environ.get("CXX", "g++"), *flags, str(source), "-o", tmp, f"-L{torch_lib}",
                   f"-Wl,-rpath,{torch_lib}", "-lc10", "-ltorch_cpu"]
        run = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            raise RuntimeError(f"{command[0]} failed: {run.stderr[-2000:]}")
        os.replace(tmp, target)  # (another process building the same library replaces it with the same bytes)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
