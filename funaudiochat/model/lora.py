"""Low-rank adapters (LoRA) on the LLM's linear layers, and the small "folded" deltas they leave behind.

Training: `attach(model, rank, alpha, targets)` turns each chosen `nn.Linear` of `language_model.*` into a
`LoRALinear` in place (same module, same `weight`/`bias` names) with two new parameters `lora_A` [r, in] (random)
and `lora_B` [out, r] (zeros), so the model starts exactly at its base and y = x W^T + b + scale x A^T B^T with
scale = alpha / rank. The base weights are frozen by the trainer; only A and B train.

Folded deltas: what a stage's LoRA changes in a weight, as two factors with the scale folded in: the change of
`NAME.weight` is `B @ A` for the pair `NAME.lora_A`, `NAME.lora_B`. Folded deltas of successive stages (and the
Core-Cocktail merge, which scales a stage's delta by alpha) concatenate along the rank: B1 A1 + B2 A2 =
[B1 | B2] [A1; A2]. An exported checkpoint keeps its total LLM delta against the original base in `lora.safetensors`
beside `model.safetensors` (which holds the merged dense weights, W + B A): that file is what ships, and it lets the
merge compute base + alpha * delta from the factors, exactly.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from funaudiochat import fileio
from funaudiochat.errors import CheckpointError, ConfigError

LLM_PREFIX = "language_model."
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DELTA_FILE = "lora.safetensors"               # folded total LLM delta of an exported checkpoint
ADAPTER_FILE = "lora_adapters.safetensors"    # live A/B parameters of a training checkpoint (resume)
SUFFIXES = (".lora_A", ".lora_B")


class LoRALinear(nn.Linear):
    """An `nn.Linear` with a low-rank update; created by `attach` (class swap), never directly."""

    lora_scale: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.lora_scale


def attach(model: nn.Module, rank: int, alpha: float, targets: list[str] | tuple[str, ...]) -> list[str]:
    """Add rank-`rank` adapters to the `language_model.*` linears whose last name is in `targets`; returns the
    module names. A is initialised like nn.Linear's weight (kaiming uniform), B with zeros."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise ConfigError(f"lora.targets: choose among {', '.join(TARGETS)}, got {list(targets)}")
    if rank < 1:
        raise ConfigError(f"lora.rank: must be a positive integer, got {rank}")
    names = []
    for name, module in model.named_modules():
        if not (name.startswith(LLM_PREFIX) and type(module) is nn.Linear and name.rsplit(".", 1)[-1] in targets):
            continue
        w = module.weight
        a = torch.empty(rank, w.shape[1], dtype=w.dtype, device=w.device)
        if a.device.type != "meta":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        module.__class__ = LoRALinear
        module.lora_A = nn.Parameter(a)
        module.lora_B = nn.Parameter(torch.zeros(w.shape[0], rank, dtype=w.dtype, device=w.device))
        module.lora_scale = alpha / rank
        names.append(name)
    if not names:
        raise ConfigError(f"lora.targets {list(targets)}: no such linear layer in the language model")
    return names


def is_adapter(key: str) -> bool:
    return key.endswith(SUFFIXES)


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A model state dict -> (dense tensors, live adapter tensors)."""
    dense = {k: v for k, v in state.items() if not is_adapter(k)}
    return dense, {k: v for k, v in state.items() if is_adapter(k)}


def modules_of(factors: dict[str, torch.Tensor]) -> list[str]:
    """Module names of a dict of `NAME.lora_A` / `NAME.lora_B` pairs (both must be there, with matching ranks)."""
    names = sorted({k[:-len(".lora_A")] for k in factors if is_adapter(k)})
    for name in names:
        a, b = factors.get(name + ".lora_A"), factors.get(name + ".lora_B")
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"LoRA factors of {name}: need lora_A [r, in] and lora_B [out, r]")
    if len(names) * 2 != len(factors):
        raise CheckpointError(f"LoRA factors: unexpected keys {sorted(k for k in factors if not is_adapter(k))[:5]}")
    return names


def fold(adapters: dict[str, torch.Tensor], scale: float, weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Live adapters (delta = scale * B A) -> folded factors (delta = B' A) scaled by `weight`."""
    out = {}
    for name in modules_of(adapters):
        out[name + ".lora_A"] = adapters[name + ".lora_A"].detach().float().clone()
        out[name + ".lora_B"] = adapters[name + ".lora_B"].detach().float() * (scale * weight)
    return out


def scaled(folded: dict[str, torch.Tensor], weight: float) -> dict[str, torch.Tensor]:
    """Folded factors whose delta is `weight` times the original one."""
    return {k: (v * weight if k.endswith(".lora_B") else v.clone()) for k, v in folded.items()}


def concat(*parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Folded deltas of several stages -> one folded delta (their sum), ranks concatenated."""
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        for name in modules_of(part):
            a, b = part[name + ".lora_A"], part[name + ".lora_B"]
            if name + ".lora_A" in out:
                a = torch.cat([out[name + ".lora_A"], a], dim=0)
                b = torch.cat([out[name + ".lora_B"], b], dim=1)
            out[name + ".lora_A"], out[name + ".lora_B"] = a, b
    return out


def delta(folded: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return folded[name + ".lora_B"].float() @ folded[name + ".lora_A"].float()


def apply(state: dict[str, torch.Tensor], folded: dict[str, torch.Tensor],
          weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Dense weights W + weight * B A for every folded pair (computed in fp32, cast back to W's dtype)."""
    out = dict(state)
    for name in modules_of(folded):
        key = name + ".weight"
        if key not in out:
            raise CheckpointError(f"LoRA delta for {key}: the model has no such weight")
        w = out[key]
        d = delta(folded, name)
        if d.shape != w.shape:
            raise CheckpointError(f"LoRA delta for {key}: shape {tuple(d.shape)}, the weight is {tuple(w.shape)}")
        out[key] = (w.float() + weight * d).to(w.dtype)
    return out


def merged_state(model_state: dict[str, torch.Tensor], scale: float) -> tuple[dict, dict]:
    """A live model state with adapters -> (dense state with the adapters merged in, their folded delta)."""
    dense, adapters = split_state(model_state)
    folded = fold(adapters, scale)
    return apply(dense, folded), folded


def adapter_scale(model: nn.Module) -> float | None:
    """The scale of the model's adapters (all equal), or None without adapters."""
    scales = {m.lora_scale for m in model.modules() if isinstance(m, LoRALinear)}
    return scales.pop() if scales else None


# ------------------------------------------------------------------------------------------------------- files

def save(factors: dict[str, torch.Tensor], path: str | Path, meta: dict[str, str] | None = None) -> Path:
    path = Path(path)
    with fileio.atomic_path(path) as tmp:  # removed on failure; a full disk is one StorageError line
        save_file({k: v.detach().contiguous().cpu() for k, v in factors.items()}, str(tmp),
                  metadata={"format": "pt", **(meta or {})})
    return path


def load(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a factor file; every key must be a LoRA factor with its pair."""
    try:
        factors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    try:
        modules_of(factors)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    return factors


def metadata(path: str | Path) -> dict[str, str]:
    """A safetensors file's metadata alone (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err


def load_delta(folder: str | Path) -> dict[str, torch.Tensor]:
    """The folded LLM delta of a checkpoint folder ({} when it has no `lora.safetensors`)."""
    path = Path(folder) / DELTA_FILE
    return load(path) if path.is_file() else {}


def adapters_scale(folder: str | Path) -> float:
    """The scale (alpha / rank) of the live adapters in a training checkpoint's model folder: recorded in the file's
    metadata; a file written before that was recorded takes it from its run's recipe (RUN/checkpoints/step-N/model
    -> RUN/recipe.yaml)."""
    import yaml

    folder = Path(folder)
    path = folder / ADAPTER_FILE
    recorded = metadata(path).get("scale")
    if recorded is not None:
        return float(recorded)
    recipe = folder.parents[2] / "recipe.yaml" if len(folder.parents) > 2 else folder / "recipe.yaml"
    if not recipe.is_file():
        raise CheckpointError(f"{path}: live LoRA adapters without their scale, and no run recipe at {recipe} to "
                              f"read it from: load the run's exported RUN/final instead")
    section = (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("lora") or {}
    try:
        return float(section["alpha"]) / int(section["rank"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        raise CheckpointError(f"{recipe}: no lora.alpha / lora.rank for the adapters in {path}") from None


def folded_adapters(folder: str | Path) -> dict[str, torch.Tensor]:
    """The live adapters of a training checkpoint's model folder as folded factors ({} when it has none)."""
    path = Path(folder) / ADAPTER_FILE
    return fold(load(path), adapters_scale(folder)) if path.is_file() else {}


def require_export(folder: str | Path) -> None:
    """Weight arithmetic (merge, deltas) reads dense weights as stored: refuse a training checkpoint whose LLM delta
    still lives in separate adapters, rather than silently leave it out."""
    if (Path(folder) / ADAPTER_FILE).is_file():
        raise CheckpointError(f"{folder} is a LoRA run's training checkpoint (its adapters are not merged yet): use "
                              f"the run's export, RUN/final")


def load_adapters(model: nn.Module, folder: str | Path) -> bool:
    """Copy the live adapters saved in a training checkpoint's model folder into `model`; False when none."""
    path = Path(folder) / ADAPTER_FILE
    if not path.is_file():
        return False
    saved = load(path)
    params = dict(model.named_parameters())
    wanted = {k for k in params if is_adapter(k)}
    if set(saved) != wanted:
        raise CheckpointError(f"{path}: adapters {sorted(set(saved) ^ wanted)[:4]} do not match the recipe's lora "
                              f"section (rank, targets)")
    with torch.no_grad():
        for k, v in saved.items():
            if params[k].shape != v.shape:
                raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)}, the recipe makes "
                                      f"{tuple(params[k].shape)} (lora.rank changed?)")
            params[k].copy_(v)
    return True
