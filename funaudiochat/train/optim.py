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
    """AdamW over the trainable parameters; weight decay on matrices and embeddings only (nanoGPT)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


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
