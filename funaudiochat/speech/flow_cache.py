"""Streaming flow calls that compute only their new frames, from keys and values kept since the last call.

Under the DiT's chunk mask a frame of chunk k attends only to frames before the end of chunk k; every call starts
from the same fixed noise; and the token encoder's output for a frame is final once its look-ahead tokens are in
(a non-final call ends 3 tokens early). So the frames of every chunk a call completed follow the same trajectory in
each later call of the same window, and their keys and values at each Euler step and layer are the same: they are
kept (`FlowCache`), and the next call computes only the frames from the first incomplete chunk on (about hop +
chunk frames) instead of the whole window (up to 400 frames). The output equals `TokenToMelFlow.inference_rows`
with `streaming=True` up to float rounding (tests/test_flow_cache.py). The causal position convolutions also need
the 2 * (kernel - 1) input frames before the first computed one: kept per step beside the keys and values.

Memory per stream: steps x layers x 2 (keys, values) x 2 (guidance rows) x frames x dim floats (tiny flow: about
8 MB at 400 frames; the released DiT 1024 x 22: about 1.4 GB, a GPU's budget).

Shapes: B streams, G = 2B guidance rows (conditional rows, then unconditional), Q new frames, K key frames,
C model dim, H heads, D head dim, M mel bins.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from funaudiochat.speech.dit import _modulate, apply_rotary


@dataclass
class FlowCache:
    frames: int = 0  # P: leading frames of the window whose keys and values are kept (a multiple of the chunk)
    kv: list = field(default_factory=list)  # [step][layer] -> (k, v), each [2, H, P, D]
    context: list = field(default_factory=list)  # [step] -> [2, 2 * (kernel - 1), C]: the input before frame P


@torch.inference_mode()
def cached_rows(flow, tokens: list[list[int]], embeddings: torch.Tensor,
                caches: list[FlowCache]) -> tuple[list[torch.Tensor], list[FlowCache]]:
    """Non-final chunk-mask calls of several streams, each from its cache (same windows as `inference_rows`, each
    extending the window its cache was made on). -> per row the mel of frames [cache.frames, T) [1, M, T - P], and
    the cache to keep once the chunk is taken."""
    cfg, dit, solver = flow.cfg, flow.decoder.estimator, flow.decoder
    device = flow.spk_embed_affine_layer.weight.device
    lookahead, chunk, n = cfg.pre_lookahead_len, dit.cfg.static_chunk_size, len(tokens)
    ctx = 2 * (dit.input_embed.conv_pos_embed.kernel_size - 1)  # input frames the two causal convolutions look back
    if min(len(row) for row in tokens) <= lookahead:
        raise ValueError(f"a non-final flow call needs more than {lookahead} tokens")
    width = max(len(row) for row in tokens)
    padded = torch.tensor([row + [0] * (width - len(row)) for row in tokens], dtype=torch.long, device=device)
    mu_all = flow.encode(padded, finalize=False).transpose(1, 2)  # [B, T, M]
    total = [cfg.token_mel_ratio * (len(row) - lookahead) for row in tokens]  # T_b
    first = [c.frames for c in caches]  # P_b
    if any(p >= t for p, t in zip(first, total)):
        raise ValueError("a cached flow call must extend the window its cache was made on")
    q_len = max(t - p for p, t in zip(first, total))
    k_len = max(total)
    if k_len > solver.rand_noise.shape[2]:
        raise ValueError(f"{k_len} mel frames exceed the flow's fixed noise ({solver.rand_noise.shape[2]} frames)")
    noise = solver.rand_noise[0].transpose(0, 1).to(mu_all)  # [N, M]

    mu = mu_all.new_zeros(n, q_len, mu_all.shape[2])
    x = mu_all.new_zeros(n, q_len, mu_all.shape[2])
    for b, (p, t) in enumerate(zip(first, total)):
        mu[b, :t - p] = mu_all[b, p:t]
        x[b, :t - p] = noise[p:t]
    spks = flow.speaker(embeddings.to(flow.spk_embed_affine_layer.weight))
    mu_in, spks_in = torch.cat([mu, torch.zeros_like(mu)]), torch.cat([spks, torch.zeros_like(spks)])
    cond_in = torch.zeros_like(mu_in)

    # per row: the absolute position of each new frame, its RoPE angles, and the keys it may see
    pos = torch.tensor(first, device=device)[:, None] + torch.arange(q_len, device=device)  # [B, Q]
    angles = dit.rotary_embed(k_len + q_len)[pos].repeat(2, 1, 1)  # [G, Q, D]
    limit = torch.minimum((pos // chunk + 1) * chunk, torch.tensor(total, device=device)[:, None])
    mask = (torch.arange(k_len, device=device) < limit[..., None]).repeat(2, 1, 1).unsqueeze(1)  # [G, 1, Q, K]

    steps = []  # per step: (proj input [G, ctx + Q, C], [(k, v) [G, H, Q, D] per layer])

    def velocity(step: int, x_in: torch.Tensor, t_in: torch.Tensor) -> torch.Tensor:  # x_in [G, Q, M] -> [G, Q, M]
        t_emb = dit.time_embed(t_in)
        h_in = dit.input_embed.proj(torch.cat([x_in, cond_in, mu_in, spks_in.unsqueeze(1).expand(-1, q_len, -1)], -1))
        ext = torch.cat([_context(caches, step, h_in, ctx), h_in], dim=1)
        h = _position_conv(dit.input_embed.conv_pos_embed, ext, first) + h_in
        kv = []
        for layer, block in enumerate(dit.transformer_blocks):
            h, k, v = _block(block, h, t_emb, angles, mask, caches, step, layer, first, total, k_len)
            kv.append((k, v))
        steps.append((ext, kv))
        scale, shift = dit.norm_out.modulation(t_emb)
        return dit.proj_out(_modulate(h, scale, shift))

    x = solver.solve(x, velocity)  # frames last here: [B, Q, M]
    mels = [x[b:b + 1, :t - p].transpose(1, 2).float() for b, (p, t) in enumerate(zip(first, total))]
    return mels, [_extended(caches[b], b, n, steps, (total[b] // chunk) * chunk, ctx) for b in range(n)]


def _context(caches: list[FlowCache], step: int, h_in: torch.Tensor, ctx: int) -> torch.Tensor:
    """[G, ctx, C]: each row's kept proj input of the `ctx` frames before its first new frame (zeros before 0)."""
    n = len(caches)
    out = h_in.new_zeros(h_in.shape[0], ctx, h_in.shape[2])
    for b, c in enumerate(caches):
        if c.frames:
            out[b::n] = c.context[step]
    return out


def _position_conv(conv, ext: torch.Tensor, first: list[int]) -> torch.Tensor:
    """`CausalConvPositionEmbedding` on the new frames, continuing from the input kept before them.
    ext: [G, 2 * pad + Q, C], row b's frames [P_b - 2 * pad, P_b + Q) -> [G, Q, C]."""
    pad = conv.kernel_size - 1
    h = conv.conv1(ext.transpose(1, 2))  # [G, C, pad + Q]: row b's frames [P_b - pad, P_b + Q)
    # before frame 0, conv2's input is zero padding, not conv1 of zeros
    at = torch.tensor(first, device=ext.device).repeat(2)[:, None] - pad + torch.arange(h.shape[2], device=ext.device)
    return conv.conv2(h.masked_fill((at < 0)[:, None, :], 0.0)).transpose(1, 2)


def _block(block, h, t_emb, angles, mask, caches, step, layer, first, total, k_len):
    """One DiT block on the new frames, attending to each row's kept keys and values and the new ones.
    -> (h, the new frames' k and v [G, H, Q, D])."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.attn_norm.modulation(t_emb)
    attn, xn = block.attn, _modulate(h, scale_msa, shift_msa)
    q = apply_rotary(attn.to_q(xn), angles).unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # [G, H, Q, D]
    k = apply_rotary(attn.to_k(xn), angles).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    v = attn.to_v(xn).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    n = len(caches)
    keys = k.new_zeros(k.shape[0], k.shape[1], k_len, k.shape[3])  # [G, H, K, D], row b: kept, new, padding
    values = torch.zeros_like(keys)
    for b, (c, p, t) in enumerate(zip(caches, first, total)):
        if p:
            keys[b::n, :, :p], values[b::n, :, :p] = c.kv[step][layer]
        keys[b::n, :, p:t], values[b::n, :, p:t] = k[b::n, :, :t - p], v[b::n, :, :t - p]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    h = h + gate_msa.unsqueeze(1) * attn.to_out(out.transpose(1, 2).flatten(2))
    return h + gate_mlp.unsqueeze(1) * block.ff(_modulate(h, scale_mlp, shift_mlp)), k, v


def _extended(cache: FlowCache, b: int, n: int, steps: list, frames: int, ctx: int) -> FlowCache:
    """Row b's cache once this call's frames before `frames` (the end of its last complete chunk) are kept too."""
    p = cache.frames
    kv = [[tuple(torch.cat([old, new[b::n, :, :frames - p]], dim=2) if p else new[b::n, :, :frames].clone()
                 for old, new in zip(cache.kv[s][i] if p else (None, None), (k, v)))
           for i, (k, v) in enumerate(layers)] for s, (_, layers) in enumerate(steps)]
    # ext's index i is frame p - ctx + i: the kept context is frames [frames - ctx, frames)
    context = [ext[b::n, frames - p:frames - p + ctx].clone() for ext, _ in steps]
    return FlowCache(frames, kv, context)
