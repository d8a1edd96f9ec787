"""Training checkpoints: RUN_DIR/checkpoints/step-N folders, written atomically, resumed exactly.

    step-N/model/          config.json + model.safetensors (released format, full fp32) + tokenizer.json
    step-N/optimizer.pt    full (unsharded) optimizer state keyed by parameter name
    step-N/trainer.json    step, data position, data fingerprint, world size
    step-N/rng-rankR.pt    torch / CUDA / numpy / python RNG states of each process

A folder is written as step-N.tmp and renamed when complete, so a run killed while saving leaves the previous
checkpoint intact; leftover .tmp folders are removed on the next start. Full state dicts make a checkpoint
independent of the number of processes (the data order is too, see batching.py).
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from funaudiochat.config import FunAudioChatConfig
from funaudiochat.errors import CheckpointError
from funaudiochat.model.checkpoint import load_state_dict_checked, save_model
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.train.parallel import DistInfo, barrier

_STEP = re.compile(r"step-(\d+)")


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete step-N folder with the highest N, or None."""
    found = []
    folder = checkpoints_dir(run_dir)
    if folder.is_dir():
        for d in folder.iterdir():
            m = _STEP.fullmatch(d.name)
            if m and (d / "trainer.json").is_file():
                found.append((int(m.group(1)), d))
    return max(found)[1] if found else None


def remove_partial(run_dir: Path) -> None:
    folder = checkpoints_dir(run_dir)
    if folder.is_dir():
        for d in folder.glob("*.tmp"):
            shutil.rmtree(d, ignore_errors=True)


def write_released(cfg: FunAudioChatConfig, state: dict[str, torch.Tensor], out: Path,
                   tokenizer: Path | None) -> None:
    """A full state dict -> an inference checkpoint folder in the released format (config.json + safetensors)."""
    with torch.device("meta"):
        model = FunAudioChatModel(cfg)
    load_state_dict_checked(model, state, str(out))  # assigns the CPU tensors; no copy
    save_model(model, out)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / "tokenizer.json")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, cfg: FunAudioChatConfig, model_state: dict, optimizer_state: dict,
                    trainer_state: dict, tokenizer: Path | None, keep_last: int, info: DistInfo) -> Path:
    """Every process calls this (each writes its RNG state); rank 0 writes the rest and renames the folder."""
    folder = checkpoints_dir(run_dir)
    final, tmp = folder / f"step-{step}", folder / f"step-{step}.tmp"
    if info.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(info)
    torch.save(rng_state(), tmp / f"rng-rank{info.rank}.pt")
    barrier(info)
    if info.main:
        write_released(cfg, model_state, tmp / "model", tokenizer)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _prune(folder, keep_last)
    barrier(info)
    return final


def _prune(folder: Path, keep_last: int) -> None:
    steps = sorted((int(m.group(1)), d) for d in folder.iterdir() if (m := _STEP.fullmatch(d.name)))
    for _, d in steps[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)


def read_trainer_state(step_dir: Path) -> dict:
    try:
        return json.loads((step_dir / "trainer.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{step_dir}/trainer.json: unreadable ({err}); delete this step folder") from err


def read_optimizer_state(step_dir: Path) -> dict:
    return torch.load(step_dir / "optimizer.pt", map_location="cpu", weights_only=True)


def read_rng_state(step_dir: Path, rank: int) -> dict | None:
    path = step_dir / f"rng-rank{rank}.pt"
    if not path.is_file():
        return None
    return torch.load(path, weights_only=False)  # our own file: numpy / python RNG states are plain objects


def export(run_dir: Path, cfg: FunAudioChatConfig, model_state: dict, tokenizer: Path | None) -> Path:
    """RUN_DIR/final: the trained model as a released-format inference checkpoint (rank 0 only)."""
    out, tmp = Path(run_dir) / "final", Path(run_dir) / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_released(cfg, model_state, tmp, tokenizer)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
