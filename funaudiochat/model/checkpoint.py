"""Checkpoint I/O in the released format: `config.json` + safetensors (one file, or shards + index).

Key names are the released ones. The tied speech embedding may be stored as `audio_tower.embed_tokens.weight`
(what HF `save_pretrained` keeps) or as `audio_invert_tower.lm_head.weight`; either loads. A checkpoint without any
`audio_invert_tower.*` tensor loads as a speech-to-text model. Non-persistent buffers (positional sinusoids, rotary
frequencies) are never stored.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from funaudiochat import fileio
from funaudiochat.config import FunAudioChatConfig
from funaudiochat.errors import CheckpointError
from funaudiochat.model import lora
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.quantize import (SCALE_SUFFIX, prepare_for_quantized_state, quantize_model,
                                         quantized_module_names)

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SPEECH_EMBED = "audio_tower.embed_tokens.weight"
SPEECH_HEAD = "audio_invert_tower.lm_head.weight"
TEXT_HEAD = "language_model.lm_head.weight"
INT8 = "int8"  # weight-only int8 (model/quantize.py): not a torch dtype of the whole model
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16, int8")
    return DTYPES[dtype]


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (the index decides when present)."""
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from err
        files = [directory / name for name in sorted(set(weight_map.values()))]
    elif (directory / SINGLE_FILE).exists():
        files = [directory / SINGLE_FILE]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors found")
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{directory}: the index names shard(s) that do not exist: {', '.join(missing)}")
    return files


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(directory):
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{f}: cannot read safetensors file ({err}); is it complete?") from err
        dup = state.keys() & part.keys()
        if dup:
            raise CheckpointError(f"{f}: tensors also present in another shard: {', '.join(sorted(dup)[:5])}")
        state.update(part)
    return state


def _expected(model: torch.nn.Module) -> dict[str, torch.Size]:
    # state_dict() lists a tied tensor under every name; tensors that only exist as buffers are skipped
    return {k: v.shape for k, v in model.state_dict().items()}


def load_state_dict_checked(model: FunAudioChatModel, state: dict[str, torch.Tensor], source: str = "checkpoint",
                            allow_missing_speech_head: bool = True) -> None:
    """Load `state` into `model` strictly, with one clear error naming every problem."""
    state = dict(state)
    int8_heads = {k for k in (SPEECH_HEAD, TEXT_HEAD) if k + SCALE_SUFFIX in state}  # kept: not tied any more
    if SPEECH_HEAD in state and SPEECH_EMBED not in state:
        state[SPEECH_EMBED] = state[SPEECH_HEAD]
    if SPEECH_HEAD not in int8_heads:
        state.pop(SPEECH_HEAD, None)
    if model.cfg.text_config.tie_word_embeddings and TEXT_HEAD not in int8_heads:
        state.pop(TEXT_HEAD, None)
    has_head = any(k.startswith("audio_invert_tower.") for k in state)
    if model.audio_invert_tower is not None and not has_head and allow_missing_speech_head:
        log.warning("%s has no audio_invert_tower.* tensors: loading it as a speech-to-text model", source)
        model.drop_speech_head()

    expected = _expected(model)
    if SPEECH_HEAD not in int8_heads:
        expected.pop(SPEECH_HEAD, None)
    if model.cfg.text_config.tie_word_embeddings and TEXT_HEAD not in int8_heads:
        expected.pop(TEXT_HEAD, None)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}"
                  for k in sorted(expected.keys() & state.keys()) if state[k].shape != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {_few(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_few(mismatched)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model built from its config.json: " + "; ".join(problems))
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()


def _few(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def load_model(directory: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
               speech_head: bool = True, fold_adapters: bool = True,
               cfg: FunAudioChatConfig | None = None) -> FunAudioChatModel:
    """Build the model from `directory/config.json` and load its safetensors weights.

    dtype: cast every tensor to fp32 / bf16 / fp16 (None keeps the stored dtypes), or "int8": fp32 with the LLM's
    and the SRH's linears quantized to int8 weights (model/quantize.py). A quantized checkpoint (int8 weights with
    `.weight_scale` beside them) loads as stored, with dtype None or "int8". speech_head=False drops the SRH (pure
    speech-to-text, less memory). A LoRA run's training checkpoint (RUN/checkpoints/step-N/model) keeps the LLM
    unmerged with its live adapters beside it: they are folded into the weights, as the run's export does, unless
    fold_adapters=False (the trainer resuming them as live parameters). `cfg` builds the model with another config
    than the folder's, for the same tensors (the trainer: a recipe's `model.srh_token_scale`).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    quantize = dtype == INT8
    dt = torch.float32 if quantize else resolve_dtype(dtype)
    cfg = FunAudioChatConfig.from_dict(cfg.to_dict()) if cfg is not None else FunAudioChatConfig.load(directory)
    if not speech_head:
        cfg.audio_config.enable_audio_invert_tower = False
    with torch.device("meta"):
        model = FunAudioChatModel(cfg)
    state = read_state_dict(directory)
    if fold_adapters:
        state = lora.apply(state, lora.folded_adapters(directory))
    if not speech_head:
        state = {k: v for k, v in state.items() if not k.startswith("audio_invert_tower.")}
    int8_names = quantized_module_names(state)
    if int8_names:
        if dtype is not None and not quantize:
            raise CheckpointError(f"{directory} holds int8 weights (a quantized checkpoint): load it with dtype int8 "
                                  f"(--dtype int8) or no dtype, not {dtype}")
        prepare_for_quantized_state(model, int8_names)
    load_state_dict_checked(model, state, str(directory))
    materialize_buffers(model)
    model = model.to(device=device, dtype=dt) if dt is not None else model.to(device)
    if quantize and not int8_names:
        quantize_model(model)
    return model.eval()


def materialize_buffers(model: FunAudioChatModel) -> None:
    """Recompute non-persistent buffers that were created on the meta device."""
    from funaudiochat.model.backbone import Backbone, rope_inv_freq
    from funaudiochat.model.encoder import AudioEncoder, sinusoids

    for m in model.modules():
        if isinstance(m, Backbone):
            m.inv_freq = rope_inv_freq(m.cfg)
        elif isinstance(m, AudioEncoder):
            m.positional_embedding = sinusoids(m.cfg.max_source_positions, m.cfg.d_model)


def save_model(model: FunAudioChatModel, directory: str | Path, max_shard_bytes: int | None = None) -> None:
    """Write config.json + safetensors in the released layout (sharded with an index if `max_shard_bytes`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.cfg.save(directory / "config.json")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    for head in (SPEECH_HEAD, TEXT_HEAD):  # tied heads are stored once, under the embedding; int8 ones are not tied
        tied = head == SPEECH_HEAD or model.cfg.text_config.tie_word_embeddings
        if tied and head + SCALE_SUFFIX not in state:
            state.pop(head, None)
    meta = {"format": "pt"}
    if max_shard_bytes is None:
        _atomic_save(state, directory / SINGLE_FILE, meta)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _atomic_save(shard, directory / name, meta)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    fileio.write_text(directory / INDEX_FILE, json.dumps(index, indent=2) + "\n")


def _atomic_save(state: dict[str, torch.Tensor], path: Path, meta: dict) -> None:
    # a temporary name, removed on failure; a full disk is one StorageError line (fileio)
    with fileio.atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
