"""Which parameters train (name patterns), AdamW with decay on matrices only, and the learning-rate schedule."""
from __future__ import annotations

import math
from fnmatch import fnmatchcase

import torch
from torch import nn

from funaudiochat.errors import ConfigError
from funaudiochat.train.config import OptimSection


def select_trainable(model: nn.Module, trainable: list[str], frozen: list[str]) -> tuple[int, int]:
    """Set requires_grad from fnmatch patterns over parameter names; a parameter trains when one of its names
    matches `trainable` and none matches `frozen` (tied tensors have several names). Returns (trained, total)
    element counts. A pattern that matches nothing is an error (a typo would silently train the wrong set)."""
    names: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        params[id(p)] = p
    all_names = [n for ns in names.values() for n in ns]
    unused = [pat for pat in trainable + frozen if not any(fnmatchcase(n, pat) for n in all_names)]
    if unused:
        raise ConfigError(f"train.trainable / train.frozen: pattern(s) {unused} match no parameter "
                          f"(names look like {all_names[0]!r}, {all_names[-1]!r})")
    trained = total = 0
    for key, p in params.items():
        ns = names[key]
        on = any(fnmatchcase(n, pat) for n in ns for pat in trainable) and \
            not any(fnmatchcase(n, pat) for n in ns for pat in frozen)
        p.requires_grad_(on)
        total += p.numel()
        trained += p.numel() if on else 0
    if trained == 0:
        raise ConfigError("train.trainable / train.frozen leave no parameter to train")
    return trained, total


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices and embeddings only (nanoGPT). Each group
    carries its `lr_scale` (optim.lr_scale: the first name pattern a parameter matches, else 1), which the
    schedule multiplies in (`set_lr`)."""
    names: dict[int, list[str]] = {}  # every name of a trainable tensor (tied tensors have several)
    for n, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            names.setdefault(id(p), []).append(n.removeprefix("module."))  # DDP's wrapper prefix
    scale_of: dict[int, float] = {}
    for pattern, factor in cfg.lr_scale.items():
        matched = [key for key, ns in names.items() if any(fnmatchcase(n, pattern) for n in ns)]
        if not matched:
            raise ConfigError(f"optim.lr_scale: pattern {pattern!r} matches no trainable parameter")
        for key in matched:
            scale_of.setdefault(key, float(factor))
    groups = {}
    for p in model.parameters():
        if p.requires_grad:
            key = (p.dim() >= 2, scale_of.get(id(p), 1.0))
            groups.setdefault(key, {"params": [], "weight_decay": cfg.weight_decay if key[0] else 0.0,
                                    "lr_scale": key[1]})["params"].append(p)
    # matrices first, as before lr_scale existed: a resumed run's saved optimizer state lists its groups in this order
    ordered = [groups[k] for k in sorted(groups, key=lambda k: not k[0])]
    return torch.optim.AdamW(ordered, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled rate into every group, times the group's `lr_scale`."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def warmup_steps(cfg: OptimSection, total_steps: int) -> int:
    return cfg.warmup_steps or int(math.ceil(cfg.warmup_ratio * total_steps))


def lr_at(step: int, total_steps: int, cfg: OptimSection) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up to `lr`, then cosine / linear decay that
    reaches `min_lr` at the last step, or constant."""
    warm = warmup_steps(cfg, total_steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warm) / max(1, total_steps - 1 - warm)
    progress = min(max(progress, 0.0), 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * shape
