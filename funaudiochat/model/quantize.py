"""Weight-only int8 linears with one scale per output channel, for CPU decoding (`--dtype int8`).

W [N, K] ~ q [N, K] int8 x scale [N] (symmetric: scale = max|W[n]| / 127). y = (x @ q^T) * scale + b, the scale
applied after the reduction, so decoding reads each weight as one byte and keeps no fp32 copy of it. A decode step's
few rows (up to `int8_kernel.MAX_ROWS`) go through the C++ kernel of model/int8_kernel.py, eagerly and inside compiled
graphs: each int8 weight converted in registers, read once for all rows. Without it (not built, or turned off),
traced for a compiled CPU decode graph (engine/compiled.py) the product is a product-and-sum reduction over the int8
weights, the int8 -> fp32 conversion inside the reduction (x * q promotes per element). More rows (a prompt's
positions), or eagerly without the kernel, blocks of rows are converted into one reused fp32 scratch buffer (16 MB at
most, per thread) and multiplied by BLAS: torch's int8 kernel (`torch._weight_int8pack_mm`) measured 7x slower than
fp32 for one row and 20x for 25 rows on an AVX2 CPU, and a fresh fp32 tensor per call costs page faults.
Activations, norms, embeddings, biases and KV caches stay fp32.

Prompt passes (`prompt_products()`: the prefill's LLM layers and the speech head's layers over a prompt's positions)
multiply many rows by each weight, so their time is arithmetic, not the weight's bytes. Where the CPU computes bf16
natively (AVX-512 BF16 or AMX) they convert the int8 blocks to bf16 instead (exactly: |q| <= 127 fits bf16's 8-bit
significand) and multiply in bf16 with fp32 sums: the mini's layer products for 43 / 160 new positions 2.3x / 3.4x
faster (bench/int8_prefill.py). Rounded to bf16 are the product's inputs (the activations) and its outputs; the
heads' logits are not computed inside a prompt pass and stay as before. The audio encoder of a quantized engine runs
its convolutions and layers under bf16 autocast in the same passes (its weights stay fp32): the mini's encoder and
word reader on a 2 s question, 110 -> 85 ms; its readings of 447 of 450 test clips (clean, 10 dB, telephone) are
unchanged. `set_prompt_products("fp32")` keeps every product in fp32. An fp32 engine never enters a prompt pass.

Quantized: every linear of the LLM, its text head, the Speech Refined Head and its speech head (the SRH's
speech-token embedding then reads rows of the int8 head). Not quantized: the audio encoder, the adapter, embedding
tables and MoE routers. A tied head gets its own int8 copy; the embedding keeps the fp32 table.

A quantized checkpoint stores each quantized linear's int8 weight under its usual name and the scales beside it
(`NAME.weight_scale`); `checkpoint.load_model` recognises one by those keys and loads it as is.

fp16 decode weights (`set_decode_weights(model, "fp16")`, `--decode-weights fp16`) are the exact-arithmetic
alternative where int8 is slow (AVX2 CPUs, engine/compiled.py `_warn_slow_int8`): the same linears keep their fp32
weights for everything but compiled CPU decoding, which reads an fp16 copy of each (`HalfDecodeLinear`): half the bytes
a step, each weight converted to fp32 inside the product-and-sum reduction (F16C), so products and sums stay fp32.
Only the weights are rounded (relative error at most 2^-11). Cost: 2 bytes a weight more memory (the mini: +0.3 GB).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from funaudiochat.model.int8_kernel import kernel_for

SCALE_SUFFIX = "_scale"
PRODUCT_SUM_MAX_ROWS = 8  # compiled CPU decoding: from about 16 rows on, BLAS (one read of each weight for all rows)
                          # is as fast or faster than product-and-sum reductions (bench/matvec.py)
SCRATCH_ELEMENTS = 1 << 22  # fp32 weights dequantized at once by the eager product
_scratch = threading.local()
PROMPT_PRODUCTS = ("auto", "bf16", "fp32")
_prompt_products = {"mode": "auto"}  # process-wide setting (set_prompt_products)
QUANTIZED_PARTS = ("language_model", "audio_invert_tower")
# MoE routers: small, and their top-k choice is sensitive; the SRH's per-answer projections (style, cue, prosody):
# small, read once per answer step, and the prosody's few outputs are logits added as they are
NOT_QUANTIZED = ("mlp.gate", "answer_style", "answer_cue", "answer_prosody")


class Int8Weight:
    """A fused int8 weight and its scales, held outside any module (`Attention.fused`, `MLP.fused`)."""

    __slots__ = ("q", "scale")

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        self.q, self.scale = q, scale


class Int8Linear(nn.Module):
    """nn.Linear with an int8 weight [N, K] (buffer `weight`) and fp32 scales [N] (buffer `weight_scale`)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.out_features, self.in_features = q.shape

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        q, scale = quantize_weight(linear.weight)
        bias = linear.bias.detach().float() if linear.bias is not None else None
        return cls(q, scale, bias)

    @classmethod
    def empty_like(cls, linear: nn.Linear) -> "Int8Linear":
        """An uninitialised twin of `linear` on its device (a meta model about to load a quantized checkpoint)."""
        dev = linear.weight.device
        bias = torch.empty(linear.out_features, device=dev) if linear.bias is not None else None
        return cls(torch.empty(linear.weight.shape, dtype=torch.int8, device=dev),
                   torch.empty(linear.out_features, device=dev), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.weight_scale, self.bias)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The dequantized rows `ids` of the weight (a tied head used as an embedding table)."""
        return F.embedding(ids, self.weight).to(self.weight_scale.dtype) * self.weight_scale[ids][..., None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, bias={self.bias is not None}"


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (q [N, K] int8, scale [N] fp32), symmetric per output channel, round to nearest."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (an all-zero row gets q = 0)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
    """x [..., K] (fp32) times int8 q [N, K], then * scale [N] (+ bias) -> [..., N]."""
    flat = x.reshape(-1, x.shape[-1])
    in_prompt_pass = not torch.compiler.is_compiling() and getattr(_scratch, "product_dtype", None) is not None
    kernel = None if in_prompt_pass else kernel_for(flat)
    if kernel is not None:  # a decode step's few rows: the C++ kernel reads each int8 weight once for all of them
        y = kernel(flat.contiguous(), q, scale)
    elif torch.compiler.is_compiling() and x.device.type == "cpu":
        # one vectorised pass over the int8 weights (any row count: a BLAS form would need an fp32 weight)
        y = (flat.unsqueeze(-2) * q).sum(-1) * scale
    else:
        y = _blockwise_dequantized_product(flat, q) * scale.to(x.dtype)
    y = y.view(*x.shape[:-1], q.shape[0])
    return y if bias is None else y + bias


DECODE_WEIGHTS = ("fp32", "fp16")


class HalfDecodeWeight:
    """A fused fp32 weight and its fp16 copy (`HalfDecodeLinear`), held outside any module (`Attention.fused`,
    `MLP.fused`)."""

    __slots__ = ("weight", "half")

    def __init__(self, weight: torch.Tensor, half: torch.Tensor):
        self.weight, self.half = weight, half


class HalfDecodeLinear(nn.Linear):
    """nn.Linear whose compiled CPU decode steps read `weight_half`, an fp16 copy of its fp32 weight (a buffer that
    state dicts leave out); everything else (prompt passes, eager steps) multiplies the fp32 weight as before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return half_decode_linear(x, self.weight, self.weight_half, self.bias)


def half_decode_linear(x: torch.Tensor, weight: torch.Tensor, half: torch.Tensor, bias: torch.Tensor | None = None):
    """F.linear(x, weight, bias), traced for a compiled CPU decode step (few rows) as a product-and-sum reduction over
    the fp16 copy `half` [N, K]: x * half promotes each weight to fp32, so only the weights' bytes are halved."""
    if torch.compiler.is_compiling() and x.device.type == "cpu" and x.shape[:-1].numel() <= PRODUCT_SUM_MAX_ROWS:
        y = (x.unsqueeze(-2) * half).sum(-1)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


@torch.no_grad()
def set_decode_weights(model: nn.Module, kind: str) -> None:
    """"fp16": give the linears of the LLM, text head, SRH and speech head (int8's targets) fp16 copies that compiled
    CPU decoding reads (`HalfDecodeLinear`), and make a word reader's fp32 vocabulary product read an fp16 copy
    (`WordReader.half_vocabulary`); "fp32": drop any such copies. In place; fused projections are dropped (an Engine
    fuses again, copies included)."""
    if kind not in DECODE_WEIGHTS:
        raise ValueError(f"decode weights must be one of {', '.join(DECODE_WEIGHTS)}, got {kind!r}")
    reader = getattr(model, "word_reader", None)
    if reader is not None:
        reader.use_half_vocabulary(False)
    _unfuse(model)
    for m in model.modules():
        if isinstance(m, HalfDecodeLinear):
            m.__class__ = nn.Linear
            del m._buffers["weight_half"]
    if kind == "fp32":
        return
    for _, _, lin in list(_targets(model)):
        if lin.weight.dtype != torch.float32:
            raise ValueError(f"fp16 decode weights are copies of fp32 weights; this model's are {lin.weight.dtype}")
        half = lin.weight.detach().to(torch.float16, memory_format=torch.contiguous_format)
        if not torch.isfinite(half).all():
            raise ValueError(f"a weight of {lin} exceeds fp16's range (65504): keep fp32 decode weights")
        lin.__class__ = HalfDecodeLinear  # (same parameters and hooks; a subclass, so every nn.Linear check holds)
        lin.register_buffer("weight_half", half, persistent=False)
    if reader is not None:
        reader.use_half_vocabulary(True)


def set_prompt_products(mode: str) -> None:
    """How prompt passes multiply int8 weights: "auto" (bf16 where the CPU computes it natively, else fp32),
    "bf16" or "fp32" (as decoding does)."""
    if mode not in PROMPT_PRODUCTS:
        raise ValueError(f"prompt products must be one of {', '.join(PROMPT_PRODUCTS)}, got {mode!r}")
    _prompt_products["mode"] = mode


@contextmanager
def prompt_products(device: torch.device):
    """Within: this thread's eager int8 products are a prompt pass's (bf16 products per `set_prompt_products`)."""
    mode = _prompt_products["mode"]
    if mode == "auto":
        from funaudiochat.model.precision import native_bf16

        mode = "bf16" if device.type == "cpu" and native_bf16(device) else "fp32"
    before = getattr(_scratch, "product_dtype", None)
    _scratch.product_dtype = torch.bfloat16 if mode == "bf16" else None
    try:
        yield
    finally:
        _scratch.product_dtype = before


def prompt_product_dtype() -> torch.dtype | None:
    """bf16 inside a prompt pass that multiplies in bf16 (`prompt_products`), else None: the audio encoder of a
    quantized engine follows it too (model/encoder.py)."""
    return getattr(_scratch, "product_dtype", None)


def _blockwise_dequantized_product(flat: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """flat [M, K] @ q^T [K, N] through blocks of q's rows converted into this thread's scratch buffer (fp32, or
    bf16 inside a prompt pass: see `prompt_products`); the result is in flat's dtype."""
    n, k = q.shape
    rows = max(1, min(n, SCRATCH_ELEMENTS // k))
    dtype = getattr(_scratch, "product_dtype", None) or flat.dtype
    key = (flat.device, dtype)
    buf = getattr(_scratch, "buffers", {}).get(key)
    if buf is None or buf.numel() < rows * k:
        buf = torch.empty(rows * k, dtype=dtype, device=flat.device)
        _scratch.buffers = {**getattr(_scratch, "buffers", {}), key: buf}
    x = flat.to(dtype)
    if rows == n:
        w = buf[: n * k].view(n, k).copy_(q)
        return (x @ w.t()).to(flat.dtype)
    out = flat.new_empty(flat.shape[0], n)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        w = buf[: (r1 - r0) * k].view(r1 - r0, k).copy_(q[r0:r1])
        out[:, r0:r1] = x @ w.t()
    return out


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a plain weight, an `Int8Weight` or a `HalfDecodeWeight` (the fused projections)."""
    if isinstance(weight, Int8Weight):
        return int8_linear(x, weight.q, weight.scale, bias)
    if isinstance(weight, HalfDecodeWeight):
        return half_decode_linear(x, weight.weight, weight.half, bias)
    return F.linear(x, weight, bias)


def _targets(model: nn.Module, names: set[str] | None = None):
    """(parent, attribute, linear) of every nn.Linear to quantize; with `names`, exactly those (checkpoint keys)."""
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if names is not None:
            if name not in names:
                continue
        elif not name.startswith(QUANTIZED_PARTS) or name.endswith(NOT_QUANTIZED):
            continue
        parent_name, _, attr = name.rpartition(".")
        yield model.get_submodule(parent_name), attr, module


def _unfuse(model: nn.Module) -> None:
    """Drop fused projections (an Engine made them from the old weights; the next Engine fuses again)."""
    for m in model.modules():
        if hasattr(m, "fused"):
            m.fused = None


@torch.no_grad()
def quantize_model(model: nn.Module) -> nn.Module:
    """Replace the linears of the LLM, text head, SRH and speech head by `Int8Linear`, in place; returns `model`."""
    _unfuse(model)
    for parent, attr, lin in list(_targets(model)):
        setattr(parent, attr, Int8Linear.from_linear(lin))
    return model


def quantized_module_names(state: dict[str, torch.Tensor]) -> set[str]:
    """Module names that a checkpoint's state dict stores as int8 (those with a `weight_scale` beside the weight)."""
    suffix = ".weight" + SCALE_SUFFIX
    return {k[: -len(suffix)] for k in state if k.endswith(suffix)}


def prepare_for_quantized_state(model: nn.Module, names: set[str]) -> None:
    """Swap the linears `names` for empty `Int8Linear`s (before loading a quantized state dict into `model`)."""
    for parent, attr, lin in list(_targets(model, names)):
        setattr(parent, attr, Int8Linear.empty_like(lin))


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())
