"""Core-Cocktail merge: M = alpha * M1 + (1 - alpha) * M0 over every parameter of the LLM (pure functions over
state dicts, plus one function that reads and writes checkpoint folders).

M0 is the model before Core-Cocktail stage 1 and M1 the stage-1 result. The merge pulls the LLM back toward its
original weights to keep its text knowledge (the paper's stage 2 then continues at a low learning rate).
Non-LLM parameters (audio encoder, grouping adapter, speech head) are taken from M1 unchanged: the paper merges
"with the original LLM", which has no audio modules, and M0's audio modules are the less-trained ones.

Interpolation runs in fp32 and the result is cast back to M1's dtype.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from funaudiochat import fileio
from funaudiochat.config import FunAudioChatConfig
from funaudiochat.errors import CheckpointError, InputError
from funaudiochat.model.checkpoint import read_state_dict

LLM_PREFIX = "language_model."


def interpolate(base: torch.Tensor, tuned: torch.Tensor, alpha: float) -> torch.Tensor:
    return (alpha * tuned.float() + (1 - alpha) * base.float()).to(tuned.dtype)


def as_composite_llm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Fun-Audio-Chat state dict as is; a plain causal LM (`model.layers...`, `lm_head`) under `language_model.`."""
    if any(k.startswith(LLM_PREFIX) for k in state):
        return state
    if any(k.startswith("model.") for k in state):
        return {LLM_PREFIX + k: v for k, v in state.items()}
    raise CheckpointError("the base checkpoint has neither language_model.* nor model.* tensors; it must be a "
                          "Fun-Audio-Chat checkpoint or a causal-LM checkpoint")


def merge_state_dicts(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor],
                      alpha: float) -> dict[str, torch.Tensor]:
    """Every `language_model.*` tensor interpolated; every other tensor of `tuned` kept as is."""
    base_llm = {k: v for k, v in as_composite_llm(base).items() if k.startswith(LLM_PREFIX)}
    tuned_llm = [k for k in tuned if k.startswith(LLM_PREFIX)]
    missing = sorted(set(tuned_llm) - base_llm.keys())
    extra = sorted(base_llm.keys() - set(tuned_llm))
    wrong = [f"{k}: {tuple(base_llm[k].shape)} vs {tuple(tuned[k].shape)}" for k in tuned_llm
             if k in base_llm and base_llm[k].shape != tuned[k].shape]
    if missing or extra or wrong:
        raise CheckpointError("the two LLMs differ: " + "; ".join(
            part for part in (f"missing in base: {missing[:5]}" if missing else "",
                              f"only in base: {extra[:5]}" if extra else "",
                              f"shapes: {wrong[:5]}" if wrong else "") if part))
    merged = dict(tuned)
    for k in tuned_llm:
        merged[k] = interpolate(base_llm[k], tuned[k], alpha)
    return merged


def merge_checkpoints(base_dir: Path, tuned_dir: Path, out_dir: Path, alpha: float = 0.5) -> Path:
    """Read M0 and M1 folders, write the merged checkpoint (config and tokenizer files of M1) to `out_dir`."""
    from funaudiochat.train.checkpoint import write_released

    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"--alpha must be in [0, 1] (the weight of the stage-1 model), got {alpha}")
    base_dir, tuned_dir, out_dir = Path(base_dir), Path(tuned_dir), Path(out_dir)
    for d in (base_dir, tuned_dir):
        if not d.is_dir():
            raise CheckpointError(f"{d}: checkpoint folder not found")
    try:
        merged = merge_state_dicts(read_state_dict(base_dir), read_state_dict(tuned_dir), alpha)
    except CheckpointError as err:
        raise CheckpointError(f"BASE {base_dir}, STAGE1 {tuned_dir}: {err}") from None
    cfg = FunAudioChatConfig.load(tuned_dir)
    # written under a temporary name and renamed (fileio): a failure leaves neither a partial OUT nor a temp folder
    with fileio.atomic_path(out_dir, directory=True) as tmp:
        write_released(cfg, merged, tmp, tokenizer=None, source=f"{tuned_dir} (STAGE1, with its config.json)")
        for f in tuned_dir.iterdir():  # tokenizer.json, generation_config.json, ...
            weights = f.name.endswith((".safetensors", ".safetensors.index.json"))
            if f.is_file() and not weights and not (tmp / f.name).exists():
                shutil.copyfile(f, tmp / f.name)
    return out_dir
