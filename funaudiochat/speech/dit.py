"""The flow's velocity estimator: a DiT (CosyVoice3 `cosyvoice/flow/DiT`), checkpoint-compatible.

Shapes: B batch (2 under classifier-free guidance), T mel frames, C model dim, H heads, D head dim, M mel bins (80).

Input concat[x_t, cond, mu, spk] (4*M) -> Linear -> C, plus a causal convolutional position embedding.
Blocks: AdaLayerNormZero (shift/scale/gate from the time embedding), self-attention (SDPA) with RoPE, FFN (GELU tanh).
Attention is full, or chunk-causal when streaming (a query in chunk k sees every frame before the end of chunk k).

RoPE follows x-transformers' `RotaryEmbedding(D)` as the released code calls it: on the [B, T, H*D] projection, so
only the first D channels (head 0) are rotated, with interleaved pairs (0,1), (2,3), ...
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from funaudiochat.speech.cosyvoice_config import DiTConfig


class TimestepEmbedding(nn.Module):
    """Sinusoid of 1000*t (256 dims: sin then cos) -> Linear -> SiLU -> Linear."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # t: [B] -> [B, C]
        half = self.freq_dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
        angles = 1000 * t.unsqueeze(1) * freqs.unsqueeze(0)  # [B, half]
        return self.time_mlp(torch.cat((angles.sin(), angles.cos()), dim=-1).to(t.dtype))


class CausalConvPositionEmbedding(nn.Module):
    """Two grouped convolutions (kernel 31, groups 16), each left-padded so frame i sees frames <= i, with Mish."""

    def __init__(self, dim: int, kernel_size: int = 31, groups: int = 16):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv1 = nn.Sequential(nn.Conv1d(dim, dim, kernel_size, groups=groups), nn.Mish())
        self.conv2 = nn.Sequential(nn.Conv1d(dim, dim, kernel_size, groups=groups), nn.Mish())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, C] -> [B, T, C]
        h = x.transpose(1, 2)
        h = self.conv1(F.pad(h, (self.kernel_size - 1, 0)))
        h = self.conv2(F.pad(h, (self.kernel_size - 1, 0)))
        return h.transpose(1, 2)


class InputEmbedding(nn.Module):
    def __init__(self, mel_dim: int, mu_dim: int, spk_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(2 * mel_dim + mu_dim + spk_dim, dim)
        self.conv_pos_embed = CausalConvPositionEmbedding(dim)

    def forward(self, x, cond, mu, spks) -> torch.Tensor:  # [B, T, M] x3, spks [B, S] -> [B, T, C]
        spks = spks.unsqueeze(1).expand(-1, x.shape[1], -1)
        h = self.proj(torch.cat([x, cond, mu, spks], dim=-1))
        return self.conv_pos_embed(h) + h


class RotaryEmbedding(nn.Module):
    """x-transformers' RotaryEmbedding(D): interleaved frequency pairs; `inv_freq` is a checkpoint buffer."""

    def __init__(self, dim_head: int, base: float = 10000.0):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim_head, 2).float() / dim_head)))

    def forward(self, seq_len: int) -> torch.Tensor:  # -> angles [T, D]
        t = torch.arange(seq_len, device=self.inv_freq.device).type_as(self.inv_freq)
        freqs = t[:, None] * self.inv_freq[None, :]  # [T, D/2]
        return torch.stack((freqs, freqs), dim=-1).flatten(-2)  # [T, D]: f0 f0 f1 f1 ...


def apply_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate the first D = angles.shape[-1] channels of x [B, T, H*D] by interleaved pairs; the rest pass through."""
    d = angles.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    pairs = rot.unflatten(-1, (-1, 2))  # [B, T, D/2, 2]
    rotated_half = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return torch.cat((rot * angles.cos() + rotated_half * angles.sin(), rest), dim=-1)


class AdaLayerNormZero(nn.Module):
    """LayerNorm (no affine) modulated by the time embedding; `n_chunks` = 6 in blocks, 2 at the output."""

    def __init__(self, dim: int, n_chunks: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim * n_chunks)
        self.n_chunks = n_chunks

    def modulation(self, t_emb: torch.Tensor) -> tuple[torch.Tensor, ...]:  # [B, C] -> n_chunks x [B, C]
        return torch.chunk(self.linear(F.silu(t_emb)), self.n_chunks, dim=1)


def _modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.Sequential(nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor, angles: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q = apply_rotary(self.to_q(x), angles)
        k = apply_rotary(self.to_k(x), angles)
        v = self.to_v(x)
        q, k, v = (h.unflatten(-1, (self.heads, -1)).transpose(1, 2) for h in (q, k, v))  # [B, H, T, D]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(out.transpose(1, 2).flatten(2))  # [B, T, H*D] -> [B, T, C]


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        # indices match the released keys ff.ff.0.0 / ff.ff.2 (index 1 was a dropout)
        self.ff = nn.Sequential(nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(approximate="tanh")),
                                nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff(x)


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.attn_norm = AdaLayerNormZero(cfg.dim, 6)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.dim_head)
        self.ff = FeedForward(cfg.dim, cfg.ff_mult)

    def forward(self, x, t_emb, angles, mask) -> torch.Tensor:  # x [B, T, C], t_emb [B, C]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.attn_norm.modulation(t_emb)
        x = x + gate_msa.unsqueeze(1) * self.attn(_modulate(x, scale_msa, shift_msa), angles, mask)
        return x + gate_mlp.unsqueeze(1) * self.ff(_modulate(x, scale_mlp, shift_mlp))


def chunk_mask(n_frames: int, chunk: int, device=None) -> torch.Tensor:
    """[T, T] bool: query i sees key j iff j < (i // chunk + 1) * chunk."""
    pos = torch.arange(n_frames, device=device)
    return pos.unsqueeze(0) < ((pos // chunk + 1) * chunk).unsqueeze(1)


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.time_embed = TimestepEmbedding(cfg.dim)
        self.input_embed = InputEmbedding(cfg.mel_dim, cfg.mu_dim, cfg.spk_dim, cfg.dim)
        self.rotary_embed = RotaryEmbedding(cfg.dim_head)
        self.transformer_blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.norm_out = AdaLayerNormZero(cfg.dim, 2)
        self.proj_out = nn.Linear(cfg.dim, cfg.mel_dim)

    def forward(self, x: torch.Tensor, mu: torch.Tensor, t: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor,
                streaming: bool = False, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """x, mu, cond: [B, M, T]; t: [B]; spks: [B, S]. Returns the velocity [B, M, T].

        `key_valid` [B, T] bool: right-padded rows of different lengths; a padded frame is no key (every block is
        per frame or causal, so each row's real frames then compute what the row computes alone)."""
        n_frames = x.shape[2]
        t_emb = self.time_embed(t)
        h = self.input_embed(x.transpose(1, 2), cond.transpose(1, 2), mu.transpose(1, 2), spks)  # [B, T, C]
        angles = self.rotary_embed(n_frames)
        mask = chunk_mask(n_frames, self.cfg.static_chunk_size, x.device) if streaming else None
        if key_valid is not None:
            keys = key_valid[:, None, None, :]  # [B, 1, 1, T]
            mask = keys if mask is None else mask & keys
        for block in self.transformer_blocks:
            h = block(h, t_emb, angles, mask)
        scale, shift = self.norm_out.modulation(t_emb)
        return self.proj_out(_modulate(h, scale, shift)).transpose(1, 2)
