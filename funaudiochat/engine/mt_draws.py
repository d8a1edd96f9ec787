"""Exp(1) draws from a torch CPU generator: the values `Tensor.exponential_(1, generator)` gives, twice as fast.

torch's CPU `exponential_` is a serial loop: for each float it takes a 64-bit word from the generator's Mersenne
Twister (two 32-bit outputs, the first as the high half), keeps its low 53 bits as u in [0, 1), and stores
-log1p(-u) rounded to float32 (13.5 ns a draw on an AVX-512 EPYC core; five speech positions of 6,565 codes take
0.45 ms a sampled step). numpy's MT19937 is the same generator with a tight output loop: put in torch's state, it
gives the same words; the transform runs as tensor ops on them, and torch's generator is moved past the words used,
so whatever draws from it next sees the stream exactly where `exponential_` would have left it.

The 64-bit log1p may round its last bit differently from the loop's libm on a few inputs; rounded to float32, the
draws then still agree except on inputs within 2^-29 of a float32 rounding boundary (none in tests/test_mt_draws.py's
two million draws).
"""
from __future__ import annotations

import threading

import numpy as np
import torch

# torch's CPUGeneratorImplState (aten/src/ATen/CPUGeneratorImpl.cpp), as get_state() returns it: int64 initial seed,
# int32 left (outputs before the next twist, + 1), int32 seeded, uint64 next, uint64 state[624], then the cached
# normal samples (untouched here)
_STATE_BYTES = 5056
_LEFT = slice(8, 12)
_NEXT = slice(16, 24)
_KEY = slice(24, 24 + 624 * 8)
_N = 624
_LOW_53 = (1 << 53) - 1

_local = threading.local()  # one numpy bit generator per thread (its state is set on every call)


def exponential_draws(shape, generator: torch.Generator) -> torch.Tensor:
    """Exp(1) draws [*shape] (float32, CPU) from a CPU `generator`, equal to
    `torch.empty(shape).exponential_(1, generator=generator)`, and the generator advanced as that call advances it."""
    state = generator.get_state()
    raw = state.numpy()
    if raw.size != _STATE_BYTES:  # a torch whose generator state is laid out otherwise: its own loop
        return torch.empty(shape).exponential_(1, generator=generator)
    bits = getattr(_local, "bits", None)
    if bits is None:
        bits = _local.bits = np.random.MT19937(0)
    left = int(raw[_LEFT].view(np.int32)[0])
    bits.state = {"bit_generator": "MT19937",
                  "state": {"key": raw[_KEY].view(np.uint64).astype(np.uint32), "pos": _N + 1 - left}}
    n = int(np.prod(shape, dtype=np.int64))
    words = torch.from_numpy(bits.random_raw(2 * n).view(np.int64))  # 32-bit outputs, one per int64
    u = (((words[0::2] << 32) | words[1::2]) & _LOW_53).double().mul_(2.0 ** -53)  # [n], exact in float64
    draws = torch.log1p(u.neg_()).neg_().float().view(shape)
    after = bits.state["state"]
    raw[_KEY].view(np.uint64)[:] = after["key"]
    raw[_LEFT].view(np.int32)[0] = _N + 1 - after["pos"]
    raw[_NEXT].view(np.uint64)[0] = after["pos"]
    generator.set_state(state)
    return draws
