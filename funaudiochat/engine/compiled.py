"""Compiled one-position decode for the LLM and the Speech Refined Head (opt-in: `Engine(model, compile=True)`).

Eager decoding of a small model is dominated by per-op overhead (about a thousand small ops per S2S step). Here one
decode position of each stack is a single function of static shapes: the whole pre-allocated KV cache is attended
under a mask (valid slots up to the current one), the new key/value are written with `index_copy_` at a slot held in
a tensor, and the rotary rows are looked up inside. torch.compile turns it into one graph; on CPU with weight
freezing and the C++ wrapper. Shapes change only with the cache size, which the engine rounds up to `CACHE_BUCKET`
slots so few graphs are compiled.

Shape legend: B batch, S cache slots, L layers, Hkv key/value heads, D head dim, C model width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from funaudiochat.model.backbone import Backbone, RopeTable

CACHE_BUCKET = 128


def decode_position(bb: Backbone, x: torch.Tensor, positions: torch.Tensor, rope: RopeTable, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """x [B, 1, C] at LLM/SRH slot `slot` ([1] long) -> post-norm hidden [B, 1, C].

    k_cache / v_cache [L, B, Hkv, S, D] get the new entries; key_valid [B, S] marks attendable slots (the new one
    included); slots after `slot` are ignored.
    """
    s = k_cache.shape[3]
    mask = (key_valid & (torch.arange(s, device=x.device) <= slot))[:, None, None, :]  # [B, 1, 1, S]
    cos, sin = rope(positions)
    for i, layer in enumerate(bb.layers):
        attn = layer.self_attn
        q, k, v = attn._qkv(layer.input_layernorm(x), cos, sin)
        k_cache[i].index_copy_(2, slot, k)
        v_cache[i].index_copy_(2, slot, v)
        out = F.scaled_dot_product_attention(q, k_cache[i], v_cache[i], attn_mask=mask,
                                             enable_gqa=attn.n_kv != attn.n_heads)
        x = x + attn.o_proj(out.transpose(1, 2).reshape(x.shape[0], 1, -1))
        h = layer.mlp(layer.post_attention_layernorm(x))
        x = x + (h[0] if isinstance(h, tuple) else h)
    return bb.norm(x)


class CompiledDecoder:
    """The two compiled step functions; both return fp32 logits of the one position."""

    def __init__(self, model, rope: RopeTable, srh_rope: RopeTable | None):
        self.model, self.rope, self.srh_rope = model, rope, srh_rope
        device = model.language_model.lm_head.weight.device
        options = {"freezing": True, "cpp_wrapper": True} if device.type == "cpu" else None
        self.llm = torch.compile(self._llm, dynamic=False, options=options)
        self.srh = torch.compile(self._srh, dynamic=False, options=options) if srh_rope is not None else None

    def _llm(self, x, positions, k_cache, v_cache, slot, key_valid):
        lm = self.model.language_model
        hidden = decode_position(lm.model, x, positions, self.rope, k_cache, v_cache, slot, key_valid)
        return hidden, lm.lm_head(hidden[:, -1]).float()

    def _srh(self, z, positions, k_cache, v_cache, slot, key_valid):
        srh = self.model.audio_invert_tower
        h = decode_position(srh.crq_transformer, srh.input_matching(z), positions, self.srh_rope, k_cache, v_cache,
                            slot, key_valid)
        return srh.lm_head(srh.output_matching(h)[:, -1]).float()
