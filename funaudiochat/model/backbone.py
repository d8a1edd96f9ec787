"""Decoder-only transformer used twice: the text LLM (Qwen3 / Qwen3-MoE / Llama / Qwen2) and the SRH stack.

Parameter names follow the released checkpoints (`layers.N.self_attn.q_proj.weight`, `mlp.experts.E.up_proj`, ...).

Shape legend: B batch, T new tokens, S attended (cache) length, C model dim, H / Hkv query / key-value heads,
D head dim, E experts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from funaudiochat.config import BackboneConfig
from funaudiochat.errors import CacheOverflowError
from funaudiochat.model.quantize import HalfDecodeLinear, HalfDecodeWeight, Int8Linear, Int8Weight, linear


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dim, computed in fp32 and returned in x's dtype (as HF)."""
    if x.dtype == torch.float32:  # one call; same math as below
        return F.rms_norm(x, (x.shape[-1],), None, eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * rms_normalize(x, self.eps)


def rope_inv_freq(cfg: BackboneConfig, device=None) -> torch.Tensor:
    """Inverse frequencies [D/2] of rotary embeddings, with optional linear / llama3 scaling."""
    dim = cfg.dim_head
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv = torch.where(is_mid, mid, scaled)
    return inv


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """positions [B, T] -> cos, signed sin [B, 1, T, D] for `apply_rope`.

    Halves concatenated as in HF `rotate_half` models; the first half of sin is negated so that
    rotate_half(x) * sin == roll(x, D/2) * signed_sin (one roll instead of chunk + neg + cat)."""
    freqs = positions[..., None].float() * inv_freq.float()  # [B, T, D/2]
    sin = freqs.sin()
    cos = torch.cat((freqs, freqs), dim=-1).cos()
    return cos.to(dtype)[:, None], torch.cat((-sin, sin), dim=-1).to(dtype)[:, None]


class RopeTable:
    """cos/sin of every position below `length`, computed once exactly as `rope_cos_sin` would (decode speed)."""

    def __init__(self, inv_freq: torch.Tensor, length: int, dtype: torch.dtype):
        cos, sin = rope_cos_sin(inv_freq, torch.arange(length, device=inv_freq.device)[None], dtype)
        self.cos, self.sin = cos[0, 0], sin[0, 0]  # [length, D]

    def __call__(self, positions: torch.Tensor):
        return self.cos[positions][:, None], self.sin[positions][:, None]  # [B, 1, T, D]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, x [B, H, T, D], with the signed sin of `rope_cos_sin`."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


@dataclass
class LayerCache:
    """One layer's slice of a `KVCache` plus where to write this step and how much to read."""

    k: torch.Tensor  # [B, Hkv, S_max, D]
    v: torch.Tensor
    start: int       # first slot written by this call
    read_len: int    # slots [0, read_len) are attended


class KVCache:
    """Pre-allocated keys and values, one [B, Hkv, S_max, D] tensor per layer. Owned by the engine.

    Separate tensors rather than one [layers, ...] block: a compiled step that writes a slot of one layer then
    mutates a whole graph input, which inductor updates in place, instead of a view of a shared base, which it
    rebuilds (copies) in full on every write."""

    def __init__(self, cfg: BackboneConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.dim_head)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len

    def layer(self, i: int, start: int, n_new: int, read_len: int | None = None) -> LayerCache:
        if start + n_new > self.max_len:
            raise CacheOverflowError(f"KV cache of {self.max_len} slots cannot hold {start + n_new} positions; "
                                     f"raise max_len or shorten the conversation")
        return LayerCache(self.k[i], self.v[i], start, read_len if read_len is not None else start + n_new)


def fuse_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of linears sharing an input into one tensor, and make each linear's
    parameters views into it: one matmul instead of several, no extra memory, state_dict unchanged (inference).
    The fused weight keeps the memory layout of the first weight (see `Engine`: column-major for eager CPU decoding).
    Int8 linears fuse their int8 weights and scales into an `Int8Weight`; linears with fp16 decode copies fuse into a
    `HalfDecodeWeight` (fp32 and fp16, each linear's copy a view into the fused one)."""
    if isinstance(linears[0], Int8Linear):
        return _fuse_int8(linears)
    if isinstance(linears[0], HalfDecodeLinear):
        half = torch.cat([lin.weight_half for lin in linears])
        row = 0
        for lin in linears:
            lin.weight_half = half[row:row + lin.out_features]
            row += lin.out_features
        weight, bias = _fuse_plain(linears)
        return HalfDecodeWeight(weight, half), bias
    return _fuse_plain(linears)


def _fuse_plain(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    column_major = linears[0].weight.stride(0) == 1 and linears[0].weight.shape[1] > 1
    weight = torch.cat([lin.weight.detach() for lin in linears])
    if column_major:
        weight = weight.t().contiguous().t()
    has_bias = [lin.bias is not None for lin in linears]
    bias = torch.cat([lin.bias.detach() for lin in linears]) if all(has_bias) else None
    row = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = nn.Parameter(weight[row:row + n], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[row:row + n], requires_grad=False)
        row += n
    return weight, bias


def _fuse_int8(linears: list[Int8Linear]) -> tuple[Int8Weight, torch.Tensor | None]:
    q = torch.cat([lin.weight for lin in linears])
    scale = torch.cat([lin.weight_scale for lin in linears])
    has_bias = [lin.bias is not None for lin in linears]
    bias = torch.cat([lin.bias.detach() for lin in linears]) if all(has_bias) else None
    row = 0
    for lin in linears:  # each linear's buffers become views into the fused ones
        n = lin.out_features
        lin.weight, lin.weight_scale = q[row:row + n], scale[row:row + n]
        if bias is not None:
            lin.bias = nn.Parameter(bias[row:row + n], requires_grad=False)
        row += n
    return Int8Weight(q, scale), bias


class Attention(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_head
        c = cfg.hidden_size
        self.q_proj = nn.Linear(c, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(c, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(c, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c, bias=cfg.attention_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.fused = None  # (weight, bias) of q|k|v after `fuse()`
        self.qk_norm_weight = None  # [H + Hkv, D]: q_norm / k_norm weights per head, after `fuse()`
        self.eps = cfg.rms_norm_eps

    def fuse(self) -> None:
        """Inference: one q|k|v matmul, and q and k normalised and rotated together."""
        self.fused = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        if hasattr(self, "q_norm"):
            self.qk_norm_weight = torch.cat([self.q_norm.weight.detach().expand(self.n_heads, -1),
                                             self.k_norm.weight.detach().expand(self.n_kv, -1)])

    def _qkv(self, x, cos, sin):
        """x [B, T, C] -> q [B, H, T, D], k and v [B, Hkv, T, D], normalised (Qwen3) and rotated."""
        b, t, _ = x.shape
        h, hkv, d = self.n_heads, self.n_kv, self.head_dim
        if self.fused is not None:
            # (split_with_sizes, not Tensor.split: that Python wrapper in a traced graph keeps AOT autograd from
            # caching the compiled decode step across processes)
            qk, v = linear(x, *self.fused).split_with_sizes([(h + hkv) * d, hkv * d], dim=-1)
            qk = qk.view(b, t, h + hkv, d)
            if self.qk_norm_weight is not None:
                qk = self.qk_norm_weight * rms_normalize(qk, self.eps)
            q, k = apply_rope(qk.transpose(1, 2), cos, sin).split_with_sizes([h, hkv], dim=1)
        else:
            q = self.q_proj(x).view(b, t, h, d)
            k = self.k_proj(x).view(b, t, hkv, d)
            v = self.v_proj(x)
            if hasattr(self, "q_norm"):
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        return q, k, v.view(b, t, hkv, d).transpose(1, 2)

    def forward(self, x, cos, sin, mask, cache: LayerCache | None = None, last_only: bool = False):
        """x [B, T, C] -> [B, T, C], or [B, 1, C] for the last query alone with `last_only` (keys and values, and
        the cache, still cover all T positions)."""
        b, t, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        if cache is not None:
            cache.k[:, :, cache.start:cache.start + t] = k
            cache.v[:, :, cache.start:cache.start + t] = v
            k, v = cache.k[:, :, :cache.read_len], cache.v[:, :, :cache.read_len]
        if last_only:
            q, t = q[:, :, -1:], 1
            mask = mask[:, :, -1:] if mask is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)
        self.fused = None  # gate|up weight after `fuse()`

    def fuse(self) -> None:
        self.fused, _ = fuse_linears([self.gate_proj, self.up_proj])

    def forward(self, x):
        if self.fused is not None:
            gate, up = linear(x, self.fused).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """Qwen3-MoE block: softmax router, top-k experts, optional renormalisation of the top-k weights."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.top_k, self.norm_topk = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))

    def forward(self, x):
        b, t, c = x.shape
        flat = x.reshape(-1, c)
        router_logits = self.gate(flat)  # [B*T, E]
        weights = F.softmax(router_logits, dim=-1, dtype=torch.float)
        weights, chosen = torch.topk(weights, self.top_k, dim=-1)  # [B*T, k]
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(flat)
        for e in chosen.unique().tolist():
            token, slot = torch.where(chosen == e)
            out.index_add_(0, token, self.experts[e](flat[token]) * weights[token, slot, None])
        return out.view(b, t, c), router_logits


class DecoderLayer(nn.Module):
    def __init__(self, cfg: BackboneConfig, index: int):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = SparseMoE(cfg) if cfg.is_moe_layer(index) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, last_only: bool = False):
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, last_only)
        x = x[:, -1:] + h if last_only else x + h
        h = self.mlp(self.post_attention_layernorm(x))
        router_logits = None
        if isinstance(h, tuple):
            h, router_logits = h
        return x + h, router_logits


def attention_mask_4d(attention_mask: torch.Tensor | None, q_len: int, k_len: int, q_offset: int,
                      batch: int, device) -> torch.Tensor | None:
    """Boolean SDPA mask [B, 1, Tq, Tk]: causal, keys with mask 0 hidden.

    `attention_mask` [B, Tk] holds 1/0, or segment ids 1, 2, ... for packed samples (then attention stays inside a
    segment). A query with no visible key (a left pad) attends to itself only, so no row is empty.
    Queries sit at key positions q_offset .. q_offset+q_len-1.
    """
    q_pos = torch.arange(q_offset, q_offset + q_len, device=device)
    k_pos = torch.arange(k_len, device=device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None]  # [1, Tq, Tk]
    if attention_mask is not None:
        seg = attention_mask.to(device)
        allowed = allowed & (seg[:, None, :] != 0)
        if seg.max() > 1:  # packed segments: block-diagonal within the row
            seg_q = seg[:, q_offset:q_offset + q_len]
            allowed = allowed & ((seg_q[:, :, None] == seg[:, None, :]) | (seg_q[:, :, None] == 0))
    allowed = allowed.expand(batch, q_len, k_len).clone()
    empty = ~allowed.any(-1)  # [B, Tq]
    if empty.any():
        rows = empty.nonzero(as_tuple=True)
        allowed[rows[0], rows[1], q_pos[rows[1]]] = True
    return allowed[:, None]


class Backbone(nn.Module):
    """Embedding (optional) + decoder layers + final RMSNorm. Returns post-norm hidden states."""

    def __init__(self, cfg: BackboneConfig, with_embeddings: bool = True):
        super().__init__()
        self.cfg = cfg
        if with_embeddings:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None = None, cache_start: int = 0, read_len: int | None = None,
                router_logits: list | None = None, rope: RopeTable | None = None,
                last_only: bool = False) -> torch.Tensor:
        """x [B, T, C], positions [B, T] (rotary), mask [B, 1, T, S] from `attention_mask_4d` -> [B, T, C].

        With `cache`, keys/values go to slots [cache_start, cache_start+T) and slots [0, read_len) are attended.
        MoE router logits are appended to `router_logits` when a list is given. `rope`: a precomputed table.
        `last_only` (prefill when only the last output is used): -> [B, 1, C]; the last layer still writes every
        position's keys and values, but runs attention output and MLP for the last position alone.
        """
        cos, sin = rope(positions) if rope is not None else rope_cos_sin(self.inv_freq, positions, x.dtype)
        t = x.shape[1]
        for i, layer in enumerate(self.layers):
            lc = cache.layer(i, cache_start, t, read_len) if cache is not None else None
            x, logits = layer(x, cos, sin, mask, lc, last_only=last_only and i == len(self.layers) - 1)
            if router_logits is not None and logits is not None:
                router_logits.append(logits)
        return self.norm(x)


class CausalLM(nn.Module):
    """`language_model`: Backbone under `model.` plus the text head `lm_head` (tied when configured)."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int,
                        attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Switch-style auxiliary loss over all MoE layers, as Qwen3-MoE computes it (padding excluded)."""
    logits = torch.cat(router_logits, dim=0)  # [layers*B*T, E]
    probs = F.softmax(logits, dim=-1)
    _, chosen = torch.topk(probs, top_k, dim=-1)
    expert_mask = F.one_hot(chosen, num_experts).float()  # [N, k, E]
    if attention_mask is None:
        tokens_per_expert = expert_mask.mean(0)
        prob_per_expert = probs.mean(0)
    else:
        valid = (attention_mask != 0).float().reshape(-1).repeat(len(router_logits))  # [N]
        tokens_per_expert = (expert_mask * valid[:, None, None]).sum(0) / valid.sum()
        prob_per_expert = (probs * valid[:, None]).sum(0) / valid.sum()
    return (tokens_per_expert * prob_per_expert[None]).sum() * num_experts
