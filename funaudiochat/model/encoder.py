"""Continuous audio encoder (`continuous_audio_tower`): Whisper-style, attention restricted to 2 s chunks.

log-mel [n_mels, T] at 100 Hz -> conv1 (k3) -> GELU -> conv2 (k3, stride 2) -> GELU  => 50 Hz
-> + sinusoid positions (restarting per chunk) -> pre-LN layers, attention inside each chunk of 2*n_window mel frames
-> avg-pool x2 (25 Hz) -> ln_post -> proj to the LLM width.   (SPEC.md §3.1)

Chunks are processed as a batch with a key-padding mask, which is the block-diagonal attention of the released
code (its sdpa / flash-attention path; its eager path scrambles heads, SPEC §13 item 1).

Shape legend: F audios, M mel bins, T mel frames, K chunks, W frames per chunk, C d_model, D output_dim.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from funaudiochat.config import AudioConfig
from funaudiochat.errors import ConfigError
from funaudiochat.model.quantize import prompt_product_dtype

_ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu}


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed position table [length, channels]: sin halves then cos halves."""
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2).float())
    t = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


def conv_output_lengths(mel_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames after conv2 (50 Hz) and after pooling (25 Hz) for mel lengths at 100 Hz."""
    after_cnn = (mel_lengths - 1) // 2 + 1
    return after_cnn, (after_cnn - 2) // 2 + 1


class EncoderAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        k_, w, c = x.shape
        q, k, v = (p(x).view(k_, w, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # [K, H, W, C/H]
        return self.out_proj(out.transpose(1, 2).reshape(k_, w, c))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.self_attn = EncoderAttention(cfg.d_model, cfg.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)
        self.act = _ACTIVATIONS[cfg.activation_function]

    def forward(self, x, key_mask):
        x = x + self.self_attn(self.self_attn_layer_norm(x), key_mask)
        x = x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:  # as released: keep fp16 activations finite
            limit = torch.finfo(x.dtype).max - 1000
            x = x.clamp(-limit, limit)
        return x


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.d_model
        self.chunk = 2 * cfg.n_window
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, c, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(c, c, kernel_size=3, stride=2, padding=1)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.ln_post = nn.LayerNorm(c)
        self.proj = nn.Linear(c, cfg.output_dim)
        self.audio_bos_eos_token = nn.Embedding(2, cfg.output_dim)  # present in released weights, never used
        self.register_buffer("positional_embedding", sinusoids(cfg.max_source_positions, c), persistent=False)

    def _chunks(self, features: torch.Tensor, lengths: list[int]):
        """Cut each audio's valid frames into chunks of `self.chunk` frames -> [K, M, W], chunk lengths, owners."""
        pieces, chunk_lens, owner = [], [], []
        for i, n in enumerate(lengths):
            for start in range(0, n, self.chunk):
                size = min(self.chunk, n - start)
                pieces.append(features[i, :, start:start + size])
                chunk_lens.append(size)
                owner.append(i)
        width = max(chunk_lens)
        batch = features.new_zeros(len(pieces), features.shape[1], width)
        for j, p in enumerate(pieces):
            batch[j, :, :p.shape[1]] = p
        return batch, torch.tensor(chunk_lens, device=features.device), owner

    def encode_frames(self, features: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """features [F, M, T] (padded), lengths [F] valid mel frames -> per audio [T_i', C] at 50 Hz (pre-pool).

        Audios of length 0 give an empty [0, C] tensor.
        """
        lens = [int(n) for n in lengths.tolist()]
        out: list[torch.Tensor | None] = [None] * len(lens)
        valid = [i for i, n in enumerate(lens) if n > 0]
        for i in range(len(lens)):
            if lens[i] == 0:
                out[i] = features.new_zeros(0, self.cfg.d_model)
        if not valid:
            return out
        x, chunk_lens, owner = self._chunks(features[valid], [lens[i] for i in valid])
        dtype = x.dtype
        # a quantized engine's prompt pass (model/quantize.py) computes the encoder's products in bf16
        bf16 = prompt_product_dtype() == torch.bfloat16 and dtype == torch.float32 and not torch.is_grad_enabled()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            frame_mask = (torch.arange(x.shape[-1], device=x.device)[None] < chunk_lens[:, None])  # [K, W]
            x = F.gelu(self.conv1(x)) * frame_mask[:, None].to(x.dtype)
            x = F.gelu(self.conv2(x)).transpose(1, 2)  # [K, W', C]
            x = x.to(dtype) + self.positional_embedding[: x.shape[1]].to(dtype)  # (the residual stream: fp32)
            cnn_lens = (chunk_lens - 1) // 2 + 1
            key_valid = torch.arange(x.shape[1], device=x.device)[None] < cnn_lens[:, None]  # [K, W']
            key_mask = key_valid[:, None, None, :]  # [K, 1, 1, W'] broadcast over heads and queries
            for layer in self.layers:
                x = layer(x, key_mask).to(dtype)
        per_audio: dict[int, list[torch.Tensor]] = {}
        for j, n in enumerate(cnn_lens.tolist()):
            per_audio.setdefault(owner[j], []).append(x[j, :n])
        for k, i in enumerate(valid):
            out[i] = torch.cat(per_audio[k], dim=0)
        return out

    def window_frames(self, features: torch.Tensor, lengths: torch.Tensor, window: int) -> list[torch.Tensor]:
        """Whisper's own input: each audio's mel cut into windows of `window` mel frames (even, at most one attention
        chunk), the last padded with the clip's floor (the log-mel of silence: its scaled max - 2)
        -> per audio [W, window/2, C] at 50 Hz, pre-LN."""
        if window % 2 or not 0 < window <= self.chunk:
            raise ConfigError(f"a window of {window} mel frames must be even and within one attention chunk "
                              f"({self.chunk} frames)")
        out = []
        for mel, n in zip(features, lengths.tolist()):
            n_windows = -(-n // window)
            padded = mel.new_full((mel.shape[0], n_windows * window), float(mel[:, :n].max()) - 2.0 if n else 0)
            padded[:, :n] = mel[:, :n]
            windows = padded.unflatten(1, (n_windows, window)).transpose(0, 1)  # [W, M, window]
            full = torch.full((n_windows,), window, device=mel.device)
            out.append(torch.stack(self.encode_frames(windows, full)) if n_windows else
                       mel.new_zeros(0, window // 2, self.cfg.d_model))
        return out

    def pool_project(self, frames: torch.Tensor) -> torch.Tensor:
        """[T', C] at 50 Hz -> [T'//2, D] at 25 Hz (sequences shorter than 2 are not pooled, as released)."""
        if frames.shape[0] >= 2:
            frames = F.avg_pool1d(frames.T[None], kernel_size=2, stride=2)[0].T
        return self.proj(self.ln_post(frames))

    def forward(self, features: torch.Tensor, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        """features [F, M, T], lengths [F] -> [F, max_len, D] at 25 Hz, zero-padded / truncated to `max_len`."""
        return self.project(self.encode_frames(features, lengths), max_len)

    def project(self, per_audio: list[torch.Tensor], max_len: int) -> torch.Tensor:
        """Per audio frames [T_i', C] at 50 Hz -> [F, max_len, D] at 25 Hz, zero-padded / truncated to `max_len`."""
        out = self.proj.weight.new_zeros(len(per_audio), max_len, self.cfg.output_dim)
        for i, frames in enumerate(per_audio):
            if frames.shape[0] == 0:
                continue
            feats = self.pool_project(frames)[:max_len]
            out[i, : feats.shape[0]] = feats
        return out
