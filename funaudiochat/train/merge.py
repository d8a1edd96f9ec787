"""Core-Cocktail merge: M = alpha * M1 + (1 - alpha) * M0 over every parameter of the LLM (pure functions over
state dicts, plus one function that reads and writes checkpoint folders).

M0 is the model before Core-Cocktail stage 1 and M1 the stage-1 result. The merge pulls the LLM back toward its
original weights to keep its text knowledge (the paper's stage 2 then continues at a low learning rate).
Non-LLM parameters (audio encoder, grouping adapter, speech head) are taken from M1 unchanged: the paper merges
"with the original LLM", which has no audio modules, and M0's audio modules are the less-trained ones.

Interpolation runs in fp32 and the result is cast back to M1's dtype.

With LoRA (M1 holds `lora.safetensors`, see funaudiochat/model/lora.py) M1 = M0 + D with D = B A on the adapted
layers, so the merge alpha * M1 + (1 - alpha) * M0 is M0 + alpha * D: it is computed from M0 and the factors (no
difference of nearly equal weights), D is checked against M1, and OUT keeps the factors scaled by alpha.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from funaudiochat import fileio
from funaudiochat.config import FunAudioChatConfig
from funaudiochat.errors import CheckpointError, InputError
from funaudiochat.model import lora
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


def own_delta(tuned: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The factors that M1's folded delta adds after M0's (M1's delta starts with M0's, copied when M1 trained)."""
    own = {}
    for name in lora.modules_of(tuned):
        a, b = tuned[name + ".lora_A"], tuned[name + ".lora_B"]
        if name + ".lora_A" in base:
            a0, b0 = base[name + ".lora_A"], base[name + ".lora_B"]
            r = a0.shape[0]
            if a.shape[0] < r or not (torch.equal(a[:r], a0) and torch.equal(b[:, :r], b0)):
                raise CheckpointError(f"{name}: STAGE1's LoRA delta does not start with BASE's; STAGE1 was not "
                                      f"trained from BASE")
            a, b = a[r:], b[:, r:]
        if a.shape[0]:
            own[name + ".lora_A"], own[name + ".lora_B"] = a, b
    if set(k[:-7] for k in base) - set(k[:-7] for k in tuned):
        raise CheckpointError("BASE has LoRA deltas on layers STAGE1 has none on; STAGE1 was not trained from BASE")
    return own


def merge_lora_state_dicts(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor],
                           own: dict[str, torch.Tensor], alpha: float, rtol: float = 1e-4) -> dict[str, torch.Tensor]:
    """M0 + alpha * D over the LLM (D from the factors `own`); every other tensor of `tuned` kept as is. M1 must be
    M0 + D within `rtol` (relative to the weight's largest entry) on the adapted layers and equal to M0 elsewhere."""
    merged_dense = merge_state_dicts(base, tuned, 0.0)  # M0's LLM, M1's other parts (and the same checks)
    expected = lora.apply(merged_dense, own, 1.0)
    for k in tuned:
        if k.startswith(LLM_PREFIX):
            scale = max(1.0, float(tuned[k].abs().max())) if tuned[k].numel() else 1.0
            err = float((tuned[k].float() - expected[k].float()).abs().max()) if tuned[k].numel() else 0.0
            if err > rtol * scale:
                raise CheckpointError(f"{k}: STAGE1 differs from BASE + its LoRA delta by {err:.3g}; STAGE1 was "
                                      f"not trained from BASE with LoRA only (use a dense merge: remove "
                                      f"{lora.DELTA_FILE} from STAGE1)")
    return lora.apply(merged_dense, own, alpha)


def merge_checkpoints(base_dir: Path, tuned_dir: Path, out_dir: Path, alpha: float = 0.5) -> Path:
    """Read M0 and M1 folders, write the merged checkpoint (config and tokenizer files of M1) to `out_dir`."""
    from funaudiochat.train.checkpoint import write_released

    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"--alpha must be in [0, 1] (the weight of the stage-1 model), got {alpha}")
    base_dir, tuned_dir, out_dir = Path(base_dir), Path(tuned_dir), Path(out_dir)
    for d in (base_dir, tuned_dir):
        if not d.is_dir():
            raise CheckpointError(f"{d}: checkpoint folder not found")
        lora.require_export(d)
    # OUT is checked before the work, and nothing the user has is replaced (an input, a file, another folder)
    for name, d in (("BASE", base_dir), ("STAGE1", tuned_dir)):
        if out_dir.resolve() == d.resolve():
            raise InputError(f"OUT {out_dir} is {name}: writing there would replace an input; name a new folder")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"OUT {out_dir}: exists and is not an empty folder; name a new folder (or remove it)")
    base_delta, tuned_delta = lora.load_delta(base_dir), lora.load_delta(tuned_dir)
    out_delta = None
    try:
        if tuned_delta:
            own = own_delta(tuned_delta, base_delta)
            merged = merge_lora_state_dicts(read_state_dict(base_dir), read_state_dict(tuned_dir), own, alpha)
            out_delta = lora.concat(base_delta, lora.scaled(own, alpha))
        else:
            merged = merge_state_dicts(read_state_dict(base_dir), read_state_dict(tuned_dir), alpha)
    except CheckpointError as err:
        raise CheckpointError(f"BASE {base_dir}, STAGE1 {tuned_dir}: {err}") from None
    cfg = FunAudioChatConfig.load(tuned_dir)
    # written under a temporary name and renamed (fileio): a failure leaves neither a partial OUT nor a temp folder
    with fileio.atomic_path(out_dir, directory=True) as tmp:
        write_released(cfg, merged, tmp, tokenizer=None, source=f"{tuned_dir} (STAGE1, with its config.json)")
        if out_delta:
            lora.save(out_delta, tmp / lora.DELTA_FILE)
        for f in tuned_dir.iterdir():  # tokenizer.json, generation_config.json, ...
            weights = f.name.endswith((".safetensors", ".safetensors.index.json"))
            if f.is_file() and not weights and not (tmp / f.name).exists():
                shutil.copyfile(f, tmp / f.name)
    return out_dir
