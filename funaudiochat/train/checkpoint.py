"""Training checkpoints: RUN_DIR/checkpoints/step-N folders, written atomically, resumed exactly.

    step-N/model/          config.json + model.safetensors (released format, full fp32) + tokenizer.json
    step-N/optimizer.pt    full (unsharded) optimizer state keyed by parameter name
    step-N/trainer.json    step, data position, data fingerprint, world size
    step-N/rng-rankR.pt    torch / CUDA / numpy / python RNG states of each process

Rank 0 writes the whole folder under a temporary name and renames it when complete (funaudiochat.fileio), so a run
killed while saving leaves the previous checkpoint intact; leftovers are removed on the next start. Full state dicts
make a checkpoint independent of the number of processes (the data order is too, see batching.py).

Tests can stop a save half-way: with FUNAUDIOCHAT_PAUSE_IN_SAVE=FILE set, rank 0 creates FILE once everything but
the rename of step-N is written (N: FUNAUDIOCHAT_PAUSE_AT_STEP, default the first save), then waits there
(FUNAUDIOCHAT_PAUSE_SECONDS, default 60 s), so that a test can kill the run in the middle of a save.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from funaudiochat import fileio
from funaudiochat.config import FunAudioChatConfig
from funaudiochat.errors import CheckpointError, FunAudioChatError
from funaudiochat.model.checkpoint import load_state_dict_checked, save_model
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.train.parallel import DistInfo

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
    """Remove what a killed save left: temporary folders / files of fileio, and `*.tmp` of older versions."""
    for folder in (Path(run_dir), checkpoints_dir(run_dir)):
        if folder.is_dir():
            for d in [*folder.glob("*.tmp"), *folder.glob(".*.tmp-*"), *folder.glob(".*.old-*")]:
                shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)


def write_released(cfg: FunAudioChatConfig, state: dict[str, torch.Tensor], out: Path,
                   tokenizer: Path | None, source: str = "the model state") -> None:
    """A full state dict -> an inference checkpoint folder in the released format (config.json + safetensors).
    `source` names the state in errors (the input checkpoint, not the temporary output folder)."""
    with torch.device("meta"):
        model = FunAudioChatModel(cfg)
    load_state_dict_checked(model, state, source)  # assigns the CPU tensors; no copy
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
                    trainer_state: dict, tokenizer: Path | None, keep_last: int, info: DistInfo,
                    extra: dict[str, tuple[dict, dict]] | None = None) -> Path:
    """Every process calls this: the RNG states are gathered to rank 0, which writes the folder atomically; a
    failure on rank 0 (a full disk) is raised on every process. `extra`: more safetensors files for the model
    folder (file name -> (tensors, metadata)), e.g. LoRA adapters and their scale."""
    folder = checkpoints_dir(run_dir)
    final = folder / f"step-{step}"
    rngs = _gather(rng_state(), info)
    error = None
    if info.main:
        try:
            with fileio.atomic_path(final, directory=True) as tmp:
                for rank, state in enumerate(rngs):
                    torch.save(state, tmp / f"rng-rank{rank}.pt")
                write_released(cfg, model_state, tmp / "model", tokenizer)
                _write_extra(tmp / "model", extra)
                torch.save(optimizer_state, tmp / "optimizer.pt")
                (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
                _test_pause(step)
            _prune(folder, keep_last)
        except Exception as err:  # noqa: BLE001 - told to every process, then re-raised
            error = err
    failure = _broadcast(None if error is None else str(error), info)
    if error is not None:
        raise error
    if failure is not None:
        raise FunAudioChatError(f"rank 0 could not save {final}: {failure}")
    return final


def _gather(obj, info: DistInfo) -> list:
    """Every process's `obj`, on rank 0 (a one-element list without torchrun)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world if info.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def _broadcast(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _test_pause(step: int) -> None:
    marker = os.environ.get("FUNAUDIOCHAT_PAUSE_IN_SAVE")
    at = os.environ.get("FUNAUDIOCHAT_PAUSE_AT_STEP")
    if marker and not Path(marker).exists() and (at is None or int(at) == step):
        Path(marker).touch()
        time.sleep(float(os.environ.get("FUNAUDIOCHAT_PAUSE_SECONDS", "60")))


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


def export(run_dir: Path, cfg: FunAudioChatConfig, model_state: dict, tokenizer: Path | None,
           extra: dict[str, tuple[dict, dict]] | None = None) -> Path:
    """RUN_DIR/final: the trained model as a released-format inference checkpoint (rank 0 only)."""
    out = Path(run_dir) / "final"
    with fileio.atomic_path(out, directory=True) as tmp:
        write_released(cfg, model_state, tmp, tokenizer)
        _write_extra(tmp, extra)
    return out


def _write_extra(folder: Path, extra: dict[str, tuple[dict, dict]] | None) -> None:
    from safetensors.torch import save_file

    for name, (tensors, meta) in (extra or {}).items():
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / name),
                  metadata={"format": "pt", **meta})
