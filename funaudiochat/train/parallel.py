"""One process, or many under torchrun: process group, model wrapping (FSDP2 or DDP), full state dicts.

FSDP2 follows torchtitan/torchtune: build the model on the meta device, apply activation checkpointing, then
`fully_shard` every decoder layer of the LLM and of the SRH, then the root (which holds the audio encoder, the
adapter, the embeddings and the heads), then allocate the shards and load a full state dict from rank 0.
The audio encoder stays in the root unit because it runs only for batches with user audio: a separate FSDP unit
that runs on one rank and not on another would desynchronise the collectives. Parameters a rank did not use in a
step (encoder without audio, MoE experts no token chose) join the reduce-scatter with zero gradients.

On CPU the backend is gloo; every worker must exit through `exit_process` (see ../shared/ASSETS.md §8).
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group when torchrun launched more than one process; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(int(os.environ.get("RANK", "0")), world, local, device)


def exit_process(info: DistInfo, code: int) -> None:
    """Leave the process group and exit at once: gloo's teardown at interpreter exit aborts ~20% of CPU runs."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def decoder_layers(model: nn.Module) -> list[nn.ModuleList]:
    """The transformer layer lists that become FSDP units / checkpointed blocks: LLM and SRH decoders."""
    lists = [model.language_model.model.layers]
    if model.audio_invert_tower is not None:
        lists.append(model.audio_invert_tower.crq_transformer.layers)
    return lists


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every decoder layer (LLM, SRH, audio encoder) in backward instead of storing its activations."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for layers in decoder_layers(model) + [model.continuous_audio_tower.layers]:
        for i, layer in enumerate(layers):
            layers[i] = checkpoint_wrapper(layer)


def shard_fsdp(model: nn.Module, info: DistInfo) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world,))
    for layers in decoder_layers(model):
        for layer in layers:
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)  # the root's params are needed again in backward
    model.set_reduce_scatter_unused_params(True)
    return model


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    # unused parameters happen (no user audio in a batch, MoE experts), so DDP must look for them
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce / reduce-scatter on accumulation micro-steps (sync on the last one)."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        yield
    elif hasattr(model, "no_sync") and not enabled:  # DDP
        with model.no_sync():
            yield
    else:
        yield


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded fp32 CPU state dict with the plain model's names (on rank 0; empty elsewhere when sharded)."""
    return get_model_state_dict(model, options=FULL)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(model, optimizer, options=FULL)


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], info: DistInfo) -> None:
    """Load a full state dict (present on rank 0 at least) into a plain, DDP or FSDP2 model."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=info.enabled)
    set_model_state_dict(model, state, options=options)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, info: DistInfo) -> None:
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=info.enabled)
    set_optimizer_state_dict(model, optimizer, state, options=options)


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values)
    return values


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
