"""Which reduced precisions a device computes natively (and so speed up instead of slowing down)."""
from __future__ import annotations

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products run natively here (CUDA, or a CPU with AMX or AVX-512 BF16); elsewhere the CPU
    emulates them, slower than fp32."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
