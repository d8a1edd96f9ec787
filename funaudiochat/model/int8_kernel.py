"""The C++ int8 decode product (int8_kernel.cpp), built on first use for this CPU's instruction set.

Why a kernel: a decode step reads every int8 weight once, converts it to fp32 and multiplies it into a few rows.
inductor traces that as a product-and-sum reduction with a single accumulator per output, so one FMA chain bounds
it (about 15 G weights/s on two Zen 4 cores), and it reads the weights once per row of a batch. The kernel keeps two
chains per row (four for a single row), prefetches the weights into L2 ahead of them and passes over each weight row
once for 4 rows: one row at the rate the CPU reads memory (2 x 11 GB/s on two Intel AMX cores), 4 rows for about 1.7x
the time of one (BENCHMARKS.md, "The int8 decode kernel"). It is an operator of its own
(`torch.ops.funaudiochat_int8_<variant>.int8_mm`), so a compiled decode graph calls it between its fused kernels.

Built on first use for this CPU's instruction set (`funaudiochat/native.py`; about 10 s, then cached).
`$FUNAUDIOCHAT_INT8_KERNEL=0` turns it off; a build that fails logs a warning once. Either way int8 products fall
back to the product-and-sum reduction (compiled) or dequantized blocks and BLAS (eager), as before.
"""
from __future__ import annotations

import logging
import os
import subprocess
import threading
from pathlib import Path

import torch

from funaudiochat import native

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int8_kernel.cpp")
MAX_ROWS = 32  # more rows (a prompt's positions) multiply faster through BLAS on dequantized blocks
_state = {"op": None, "tried": False, "enabled": os.environ.get("FUNAUDIOCHAT_INT8_KERNEL", "1") != "0"}
_ops: dict[str, object] = {}
_lock = threading.Lock()


def kernel_for(flat: torch.Tensor):
    """The int8 product op for the rows `flat` [M, K], or None where it does not apply (off, not built, not fp32 on
    the CPU, or more than MAX_ROWS rows). Outside a compiled graph the first call builds or loads it; inside one it
    is only looked up (a compiled engine loads it when it is built: engine/compiled.py `CompiledDecoder`)."""
    if flat.device.type != "cpu" or flat.dtype != torch.float32 or flat.shape[0] > MAX_ROWS:
        return None
    if not torch.compiler.is_compiling() and not _state["tried"]:
        load()
    return _state["op"]


def load() -> object | None:
    """Build or load this CPU's kernel once per process -> the op, or None (off, or the build failed)."""
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            if _state["enabled"]:
                try:
                    _state["op"] = op(native.this_cpus_variant())
                except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                    log.warning("the int8 decode kernel could not be built (%s); int8 products use the slower "
                                "reductions", (str(error).strip().splitlines() or [repr(error)])[-1])
    return _state["op"]


def set_enabled(enabled: bool) -> None:
    """Use the kernel (when it builds) or not, from the next product on (tests compare both paths)."""
    with _lock:
        _state.update(enabled=enabled, tried=False, op=None)


def op(variant: str):
    """The `int8_mm` op of one build variant (any the CPU can run: tests check each), built or loaded here."""
    if variant not in _ops:
        namespace = f"funaudiochat_int8_{variant}"
        native.load_library(SOURCE, namespace, variant)

        @torch.library.register_fake(f"{namespace}::int8_mm")
        def _shape(x, q, scale):
            return x.new_empty(x.shape[0], q.shape[0])

        _ops[variant] = getattr(torch.ops, namespace).int8_mm
    return _ops[variant]
