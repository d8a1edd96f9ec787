"""Check a device name ("cpu", "cuda", "cuda:1", "mps") before anything is loaded onto it.

torch's own failures are an AssertionError ("Torch not compiled with CUDA enabled") or a RuntimeError deep in a
load; `resolve_device` says instead which devices this machine has and, for CUDA on a CPU-only torch build, how to
install a CUDA build.
"""
from __future__ import annotations

import torch

from funaudiochat.errors import InputError

CUDA_HELP = ("install a CUDA build of torch, e.g. `.venv/bin/pip install torch=={version} --index-url "
             "https://download.pytorch.org/whl/cu128` (pick the cuXYZ of your driver: https://pytorch.org/get-started)")


def available_devices() -> list[str]:
    names = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return names


def resolve_device(spec: str | torch.device | None, what: str = "--device") -> torch.device:
    """A usable torch.device for `spec`, or an InputError that lists the available devices."""
    if spec is None:
        return torch.device("cpu")
    have = ", ".join(available_devices())
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"{what} {spec!r} is not a device name; this machine has: {have}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise InputError(f"{what} {spec}: this torch ({torch.__version__}) is a CPU-only build; use --device cpu "
                             f"or " + CUDA_HELP.format(version=torch.__version__.split("+")[0]))
        count = torch.cuda.device_count()
        if count == 0:
            raise InputError(f"{what} {spec}: torch has CUDA {torch.version.cuda} but sees no GPU (driver not loaded, "
                             f"or CUDA_VISIBLE_DEVICES hides them); this machine has: {have}")
        if device.index is not None and device.index >= count:
            raise InputError(f"{what} {spec}: there is no GPU {device.index}; this machine has: {have}")
        return device
    if device.type == "mps" and "mps" in have:
        return device
    raise InputError(f"{what} {spec}: not available here; this machine has: {have}")
