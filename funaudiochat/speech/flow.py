"""Speech tokens -> mel: CosyVoice3's `CausalMaskedDiffWithDiT` + `CausalConditionalCFM`, checkpoint-compatible.

Shapes: N tokens, T = 2N mel frames (token_mel_ratio 2), M mel bins (80), E = 80 embedding width, S = 192 x-vector.

tokens -> Embedding(6561, E) -> PreLookaheadLayer (sees 3 tokens ahead) -> repeat x2 -> mu [1, M, T];
x-vector -> L2 normalise -> Linear(192, 80) -> spks. Then 10 Euler steps of the DiT velocity on a cosine time grid,
starting from fixed noise, with classifier-free guidance on a batch of 2: v = 1.7 v(mu, spks) - 0.7 v(0, 0).

`finalize=False` (streaming): the last 3 tokens are only look-ahead context; the output covers the others.
The fixed noise is regenerated like the released code (seed 0, then randn(1, 80, 15000)) as a non-persistent buffer.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from funaudiochat.errors import InputError
from funaudiochat.speech.cosyvoice_config import FlowConfig
from funaudiochat.speech.dit import DiT

NOISE_FRAMES = 15000  # 300 s of 50 Hz mel: the released fixed-noise length, the longest mel one call can make


def released_flow_noise(mel_dim: int = 80) -> torch.Tensor:
    """The released `CausalConditionalCFM.rand_noise`: seed 0, then randn(1, 80, 15000) (on the CPU)."""
    return torch.randn(1, mel_dim, NOISE_FRAMES, generator=torch.Generator().manual_seed(0), device="cpu")


class PreLookaheadLayer(nn.Module):
    """conv1 (kernel L+1, sees L tokens ahead) -> leaky ReLU -> conv2 (kernel 3, causal) + residual."""

    def __init__(self, in_channels: int, channels: int, lookahead: int):
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(in_channels, channels, lookahead + 1)
        self.conv2 = nn.Conv1d(channels, in_channels, 3)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, N, E]; context: [B, L, E] tokens after x (streaming) or None (zeros: end of speech)."""
        h = x.transpose(1, 2)  # [B, E, N]
        if context is None:
            h = F.pad(h, (0, self.lookahead))
        else:
            h = torch.cat([h, context.transpose(1, 2)], dim=2)
        h = F.leaky_relu(self.conv1(h))
        h = self.conv2(F.pad(h, (2, 0)))
        return h.transpose(1, 2) + x


class ConditionalFlowMatching(nn.Module):
    """Euler ODE solver with CFG around the DiT `estimator` (the released `decoder`)."""

    def __init__(self, cfg: FlowConfig, noise: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.estimator = DiT(cfg.dit)
        self.register_buffer("rand_noise", released_flow_noise(cfg.dit.mel_dim) if noise is None else noise,
                             persistent=False)

    def time_grid(self, dtype=torch.float32, device=None) -> torch.Tensor:
        t = torch.linspace(0, 1, self.cfg.n_timesteps + 1, device=device, dtype=dtype)
        return 1 - torch.cos(t * 0.5 * torch.pi) if self.cfg.t_scheduler == "cosine" else t

    def forward(self, mu: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor, streaming: bool = False,
                on_step: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
                key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """mu, cond: [B, M, T]; spks: [B, M]. Returns the mel [B, M, T]. Every row starts from the same noise.

        `on_step(step, x_in [2B, M, T], t_in [2B], velocity [2B, M, T])` sees every raw estimator call (rows B..2B-1:
        unconditional). `key_valid` [B, T]: rows right-padded to T (see `DiT.forward`).
        """
        n_frames = mu.shape[2]
        if n_frames > self.rand_noise.shape[2]:
            raise InputError(f"{n_frames} mel frames exceed the flow's fixed noise ({self.rand_noise.shape[2]} frames, "
                             f"300 s); synthesise shorter pieces (or stream with a flow window)")
        x = self.rand_noise[:, :, :n_frames].to(mu).expand(mu.shape[0], -1, -1)
        mu_in = torch.cat([mu, torch.zeros_like(mu)])  # [2B, M, T]: conditional rows, unconditional rows
        spks_in = torch.cat([spks, torch.zeros_like(spks)])
        cond_in = torch.cat([cond, torch.zeros_like(cond)])
        keys_in = None if key_valid is None else torch.cat([key_valid, key_valid])

        def velocity(step: int, x_in: torch.Tensor, t_in: torch.Tensor) -> torch.Tensor:
            v = self.estimator(x_in, mu_in, t_in, spks_in, cond_in, streaming=streaming, key_valid=keys_in)
            if on_step is not None:
                on_step(step, x_in, t_in, v)
            return v

        return self.solve(x, velocity).float()

    def solve(self, x: torch.Tensor, velocity: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]):
        """The Euler steps with classifier-free guidance from noise x [B, ...]: `velocity(step, x_in [2B, ...],
        t_in [2B])` -> v [2B, ...] (rows B..2B-1 unconditional). t and dt advance exactly like the released solver
        (t += dt; dt = t_span[k+1] - t)."""
        t_span = self.time_grid(x.dtype, x.device)
        cfg_rate = self.cfg.inference_cfg_rate
        t, dt = t_span[0:1], t_span[1] - t_span[0]
        for step in range(1, len(t_span)):
            v_cond, v_uncond = velocity(step - 1, torch.cat([x, x]), t.expand(2 * x.shape[0]).contiguous()).chunk(2)
            x = x + dt * ((1.0 + cfg_rate) * v_cond - cfg_rate * v_uncond)
            t = t + dt
            if step < len(t_span) - 1:
                dt = t_span[step + 1] - t
        return x


class TokenToMelFlow(nn.Module):
    """Parameter names equal the released `flow.pt` (`input_embedding`, `spk_embed_affine_layer`, ...)."""

    def __init__(self, cfg: FlowConfig, noise: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.pre_lookahead_layer = PreLookaheadLayer(cfg.input_size, cfg.pre_lookahead_channels, cfg.pre_lookahead_len)
        self.decoder = ConditionalFlowMatching(cfg, noise)

    def speaker(self, embedding: torch.Tensor) -> torch.Tensor:
        """x-vector [1, S] -> spks [1, M]."""
        return self.spk_embed_affine_layer(F.normalize(embedding, dim=1))

    def encode(self, tokens: torch.Tensor, finalize: bool) -> torch.Tensor:
        """tokens [1, N] (codes < vocab) -> mu [1, M, T]; T = 2N, or 2(N - L) when not finalising."""
        h = self.input_embedding(tokens.clamp(min=0))  # [1, N, E]
        if finalize:
            h = self.pre_lookahead_layer(h)
        else:
            lookahead = self.cfg.pre_lookahead_len
            h = self.pre_lookahead_layer(h[:, :-lookahead], context=h[:, -lookahead:])
        return h.repeat_interleave(self.cfg.token_mel_ratio, dim=1).transpose(1, 2).contiguous()

    @torch.inference_mode()
    def inference(self, tokens: torch.Tensor, embedding: torch.Tensor, finalize: bool = True,
                  streaming: bool = False, on_step=None) -> torch.Tensor:
        """tokens [1, N] int, embedding [1, S] -> mel [1, M, T]. `streaming` uses the DiT chunk mask."""
        if not finalize and tokens.shape[1] <= self.cfg.pre_lookahead_len:
            raise ValueError(f"a non-final flow call needs more than {self.cfg.pre_lookahead_len} tokens")
        spks = self.speaker(embedding.to(self.spk_embed_affine_layer.weight))
        mu = self.encode(tokens, finalize)
        return self.decoder(mu, spks, torch.zeros_like(mu), streaming=streaming, on_step=on_step)

    @torch.inference_mode()
    def inference_rows(self, tokens: list[list[int]], embeddings: torch.Tensor, streaming: bool = False) -> list:
        """Non-final calls of several streams as one batch: tokens of different lengths (each > the look-ahead),
        embeddings [B, S] -> one mel [1, M, 2 (N_b - L)] per row, what `inference(row, finalize=False)` gives
        (up to float rounding). Rows are right-padded: the look-ahead layer and the DiT's position convolution are
        causal on the padded side, every other block is per frame, and padded frames are masked as keys."""
        lookahead, ratio = self.cfg.pre_lookahead_len, self.cfg.token_mel_ratio
        if min(len(row) for row in tokens) <= lookahead:
            raise ValueError(f"a non-final flow call needs more than {lookahead} tokens")
        device = self.spk_embed_affine_layer.weight.device
        width = max(len(row) for row in tokens)
        padded = torch.tensor([row + [0] * (width - len(row)) for row in tokens], dtype=torch.long, device=device)
        frames = torch.tensor([ratio * (len(row) - lookahead) for row in tokens], device=device)
        mu = self.encode(padded, finalize=False)  # [B, M, T]
        key_valid = torch.arange(mu.shape[2], device=device)[None, :] < frames[:, None]
        if bool(key_valid.all()):
            key_valid = None  # equal lengths: exactly the single-row computation, batched
        spks = self.speaker(embeddings.to(self.spk_embed_affine_layer.weight))
        mel = self.decoder(mu, spks, torch.zeros_like(mu), streaming=streaming, key_valid=key_valid)
        return [mel[b:b + 1, :, :int(n)] for b, n in enumerate(frames)]
