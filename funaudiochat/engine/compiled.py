"""Compiled one-position decode for the LLM and the Speech Refined Head (opt-in: `Engine(model, compile=True)`).

Eager decoding of a small model is dominated by per-op overhead (about a thousand small ops per S2S step). Here one
decode position of each stack is a single function of static shapes: the whole pre-allocated KV cache is attended
under a mask (valid slots up to the current one), the new key/value are written in place (`index_put_`, one cache
tensor per layer) at a slot held in a tensor, and the rotary rows are looked up inside. torch.compile turns it into
one graph; on CPU with the C++ wrapper, and its linears traced as product-and-sum reductions (`_LinearAsProductSum`:
a decode step is bound by reading the weights). Shapes change with the batch and the cache size (rounded up to
`CACHE_BUCKET` slots): the first graph is specialised on its shapes, the next one takes them as symbols and serves all
of them.

Each graph also builds its own input (token embedding, fused with the last speech group's features) and marks the
new cache slots valid, and a whole speech-to-speech step is one graph: the LLM position, the ungrouping and the SRH's
5 positions with the choice of each speech token (repetition penalty, temperature, top-k / top-p, then the argmax,
or a draw as torch.multinomial makes it from exponential noise drawn outside from the seeded generator) and its
embedding in between. One
call per step instead of six removes the Python, guard checks and small eager ops between them (each costs 10-200 us
on a small CPU, as much as a layer's matmuls). Int8 linears (model/quantize.py) call the C++ int8 kernel
(model/int8_kernel.py) from inside the graph, or, without it, trace themselves as a product-and-sum reduction over
their int8 weights, the conversion fused into it; the fp16 decode copies of an fp32 model's linears
(`Engine(decode_weights="fp16")`) trace as such reductions.

On a GPU the layer is what is compiled, and each step is replayed as a CUDA graph (`CompiledDecoder`).

Compiled artefacts persist: inductor's FX graph and AOT autograd caches live under the user's cache folder
(`~/.cache/funaudiochat/torchinductor`, or $TORCHINDUCTOR_CACHE_DIR), so a later process compiling the same graphs
skips code generation, the C++ compiler and AOT autograd: only dynamo's tracing is left.

Shape legend: B batch, S cache slots, L layers, Hkv key/value heads, D head dim, C model width.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from funaudiochat.engine.cuda_graphs import GraphedStep
from funaudiochat.engine.sampling import SamplingParams, choose, process
from funaudiochat.fileio import user_cache_dir
from funaudiochat.model.backbone import Backbone, RopeTable
from funaudiochat.model import int8_kernel
from funaudiochat.model.quantize import PRODUCT_SUM_MAX_ROWS, Int8Linear
from funaudiochat.speech.pending_units import follow_on, is_start, text_locked, window

log = logging.getLogger(__name__)

CACHE_BUCKET = 128


def step_input(model, token: torch.Tensor, group: torch.Tensor | None, fuse: torch.Tensor):
    """The LLM input of one decode step -> (x [B, 1, C], the text embedding [B, 1, C]).

    token [B] is the last text id; where `fuse` [B], it is averaged with the last speech group [B, k] fed back
    through the adapter, (E_text(t) + Enc(g)) / 2. group None, or a model without speech feedback
    (`audio_config.speech_feedback` false): no row fuses."""
    ids = token[:, None]  # a decoded <|audio_bos|> always opens the assistant's speech
    text_embed = model.embed_inputs(ids, ids == model.cfg.text_config.audio_bos_index)
    if group is None or not model.cfg.audio_config.speech_feedback:
        return text_embed, text_embed
    return torch.where(fuse[:, None, None], (text_embed + model.audio_tower(group)) / 2, text_embed), text_embed


def srh_input(model, hidden: torch.Tensor, text_embed: torch.Tensor, token: torch.Tensor,
              style: torch.Tensor | None):
    """The SRH's input at one decode step -> (hidden + text_embed [B, 1, C], plus the answer's style where the head
    reads one (`audio_config.srh_answer_style`), the style in force after the step [B, C] or None). token [B] is the
    step's input id: a decoded <|audio_bos|> opens a spoken answer, <|audio_eos|> closes it."""
    if model.audio_invert_tower.answer_style is None:
        return hidden + text_embed, style
    ids = token[:, None]
    styles, style = model.answer_styles(hidden, ids, ids == model.cfg.text_config.audio_bos_index, style)
    return hidden + text_embed + styles, style


def answer_prosody(model, style: torch.Tensor | None) -> torch.Tensor | None:
    """The head's rate and loudness biases [B, Vs] from the answer style's carried state [B, S] (its first D entries
    are the style in force), where the head has them (`audio_config.srh_answer_prosody`), else None."""
    srh = model.audio_invert_tower
    if srh.answer_prosody is None:
        return None
    return srh.prosody_bias(style[:, :model.cfg.text_config.hidden_size])


def layer_position(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One decoder layer at one position: x [B, 1, C] -> [B, 1, C]; writes its key / value at `slot`."""
    attn = layer.self_attn
    q, k, v = attn._qkv(layer.input_layernorm(x), cos, sin)
    k_cache[:, :, slot] = k  # index_put_: inductor writes it in place (index_copy_ falls back to a full copy)
    v_cache[:, :, slot] = v
    out = _one_query_attention(q, k_cache, v_cache, mask)
    x = x + attn.o_proj(out.transpose(1, 2).reshape(x.shape[0], 1, -1))
    h = layer.mlp(layer.post_attention_layernorm(x))
    return x + (h[0] if isinstance(h, tuple) else h)


def decode_position(bb: Backbone, x: torch.Tensor, positions: torch.Tensor, rope: RopeTable,
                    k_cache: list[torch.Tensor], v_cache: list[torch.Tensor], slot: torch.Tensor,
                    key_valid: torch.Tensor, layer_fn=layer_position) -> torch.Tensor:
    """x [B, 1, C] at LLM/SRH slot `slot` ([1] long) -> post-norm hidden [B, 1, C].

    k_cache / v_cache (one [B, Hkv, S, D] per layer) get the new entries; key_valid [B, S] marks attendable slots
    (the new one included); slots after `slot` are ignored. `layer_fn` runs each layer (`layer_position`, or its
    compiled form: one graph serves every layer of a stack).
    """
    s = k_cache[0].shape[2]
    mask = (key_valid & (torch.arange(s, device=x.device) <= slot))[:, None, None, :]  # [B, 1, 1, S]
    cos, sin = rope(positions)
    for i, layer in enumerate(bb.layers):
        x = layer_fn(layer, x, cos, sin, k_cache[i], v_cache[i], slot, mask)
    return bb.norm(x)


def _one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, H, 1, D] over k / v [B, Hkv, S, D] under mask [B, 1, 1, S] -> [B, H, 1, D].

    Two batched matmuls instead of `scaled_dot_product_attention`: at these sizes the CPU flash kernel costs ~100 us
    per call (it copies k / v to expand the shared GQA heads), a bmm ~30 us. (A products-and-sum form fuses, but
    inductor leaves that reduction scalar: ~200 us.) Query head h reads key/value head h // (H / Hkv), as `repeat_kv`
    does."""
    b, h, _, d = q.shape
    hkv = k.shape[1]
    qg = q.view(b, hkv, h // hkv, d)                                        # [B, Hkv, G, D]
    scores = (qg @ k.transpose(-1, -2)) * d ** -0.5                          # [B, Hkv, G, S]
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return (probs @ v).view(b, h, 1, d)


class _LinearAsProductSum(TorchFunctionMode):
    """Inside a compiled decode graph, trace `F.linear(x, W, b)` as (x[..., None, :] * W).sum(-1) + b.

    Decoding multiplies a few rows by every weight, so a step is bound by reading the weights. Inductor turns the
    product-and-sum into one vectorised reduction kernel that streams a row-major W [N, K] across all threads, for
    one row at about 2x the rate of MKL's matrix-vector product on CPU, and still faster up to 8 rows
    (bench/matvec.py); it also fuses the bias and the next pointwise ops. The engine keeps weights row-major when it
    compiles."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and args[0].shape[:-1].numel() <= PRODUCT_SUM_MAX_ROWS:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            y = (x.unsqueeze(-2) * weight).sum(-1)
            return y if bias is None else y + bias
        return func(*args, **kwargs)


def _warn_slow_int8() -> None:
    """Without the int8 kernel (model/int8_kernel.py: turned off, or no compiler), compiled int8 decoding is fast
    where inductor vectorises the int8 reductions with AVX-512; with AVX2 code each load of 8 int8 weights goes
    through memory byte by byte, and the step runs slower than fp32 (BENCHMARKS.md)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX512"):
        log.warning("int8 decoding compiled for %s (no AVX-512) runs slower than fp32 on this CPU: use --dtype fp32 "
                    "here, with --decode-weights fp16 for half the bytes a step (BENCHMARKS.md, 'Against llama.cpp')",
                    capability)


class CompiledDecoder:
    """The compiled step functions. Every one returns fp32 logits; caches and key masks are updated in place.

    On CPU each step is one whole compiled graph. On a GPU the layer is compiled (regional compilation: one graph per
    stack serves all its layers, so the 8B's S2S step compiles two layer graphs, not 36 + 5 x 28 unrolled layers) and
    each step, with `cuda_graphs`, is replayed as a CUDA graph (engine/cuda_graphs.py), which removes the launches
    that otherwise bound it."""

    LLM_IN_PLACE = ("k_cache", "v_cache", "key_valid")  # what the steps update in place (CUDA graphs: by address)
    S2S_IN_PLACE = LLM_IN_PLACE + ("srh_k", "srh_v", "srh_key_valid")

    def __init__(self, model, rope: RopeTable, srh_rope: RopeTable | None, cuda_graphs: bool = True):
        self.model, self.rope, self.srh_rope = model, rope, srh_rope
        use_persistent_cache()
        if model.language_model.model.norm.weight.device.type == "cpu":
            if any(isinstance(m, Int8Linear) for m in model.modules()) and int8_kernel.load() is None:
                _warn_slow_int8()  # (the graphs look the kernel up as they are traced: loaded before them)
            self.layer_fn = layer_position
            # No weight freezing: it made no step faster (fp32, bf16, int8; BENCHMARKS.md, "Second start of infer
            # --compile"), and AOT autograd's cache refuses frozen graphs, so every start would compile again
            options = {"cpp_wrapper": True}
            # dynamic=None: the first graph is specialised on its shapes; the first call with another batch size or
            # cache length compiles one graph with those sizes symbolic, which then serves them all (a server's
            # batches and growing caches: 3 graphs, not one per batch size and cache bucket, each ~1 min on the
            # mini; the symbolic graph's steps ran within 10 % of the specialised ones). Batches of one row keep
            # their own graphs (dynamo specialises size 1).
            # (product-and-sum linears on CPU only: GPU BLAS already streams weights near memory bandwidth)
            self.llm = torch.compile(self._llm_as_sums, dynamic=None, options=options)
            self.s2s = torch.compile(self._s2s_as_sums, dynamic=None, options=options)
            return
        self.layer_fn = torch.compile(layer_position, dynamic=False)
        self.llm = GraphedStep(self._llm, self.LLM_IN_PLACE) if cuda_graphs else self._llm
        self.s2s = GraphedStep(self._s2s, self.S2S_IN_PLACE) if cuda_graphs else self._s2s

    # Each compiled step has a code object of its own: dynamo keeps its graphs, and counts recompilations against its
    # limit (8), per code object, so one shared wrapper would make the LLM and S2S steps share 8 graphs.
    def _llm_as_sums(self, *args):
        """`_llm` with its linears as product-and-sum reductions."""
        with _LinearAsProductSum():
            return self._llm(*args)

    def _s2s_as_sums(self, *args, **kwargs):
        """`_s2s` with its linears as product-and-sum reductions."""
        with _LinearAsProductSum():
            return self._s2s(*args, **kwargs)

    def _llm(self, token, group, fuse, positions, k_cache, v_cache, slot, key_valid):
        """token [B] (the last text id), group [B, k] (the last speech group, or None without speech), fuse [B]
        (rows whose input fuses the two), positions [B, 1] -> (hidden [B, 1, C], text embedding [B, 1, C], text
        logits [B, V]); the input goes to LLM slot `slot`."""
        lm = self.model.language_model
        x, text_embed = step_input(self.model, token, group, fuse)
        key_valid.index_fill_(1, slot, True)  # (a scalar fill: no host-to-device copy inside a CUDA graph)
        hidden = decode_position(lm.model, x, positions, self.rope, k_cache, v_cache, slot, key_valid, self.layer_fn)
        return hidden, text_embed, lm.lm_head(hidden[:, -1]).float()

    def _srh(self, z, positions, k_cache, v_cache, slot, key_valid):
        """One SRH position: z [B, 1, C] (ungrouped LLM state + previous token embedding) -> logits [B, Vs]."""
        srh = self.model.audio_invert_tower
        h = decode_position(srh.crq_transformer, srh.input_matching(z), positions, self.srh_rope, k_cache, v_cache,
                            slot, key_valid, self.layer_fn)
        return srh.lm_head(srh.output_matching(h)[:, -1]).float()

    def _s2s(self, token, group, fuse, positions, k_cache, v_cache, slot, key_valid, srh_k, srh_v, srh_key_valid,
             embed, style, counts, noise, params: SamplingParams, speech_bias=None, upcoming=None, follow=None,
             lagged=None):
        """One S2S step (inputs as `_llm`, then the SRH's cache and key mask, embed [B, C] of its last token, style
        [B, C] the answer style in force (or None: `srh_input`), counts [B, Vs] speech history or None, noise [B, k, Vs]
        Exp(1) draws when sampling, else None, speech_bias [Vs] 0 / -inf on codes never to draw, or None, upcoming
        [B, W + k] the pending-units view's units from the group's start, or None, follow: (the last code said [B], the
        tokens its unit has lasted [B], the answer's text has ended [B], the pace term [B], the hold prior's starts
        [B, k + 1]) when the speech follows the text, or None, lagged: (hidden [B, 1, C], text embedding [B, 1, C],
        input id [B], positions [B, 1], slot [1]) of the earlier LLM step whose group this is (a text lead,
        `GenerationConfig.text_lead`), or None: this step's) -> text logits [B, V], the SRH's raw logits and scores
        [B, k, Vs], its tokens [B, k], the embedding [B, C] of the last one, the answer style after the step, and this
        step's LLM hidden state and text embedding [B, 1, C]. The speech tokens are chosen as `Engine._srh_group`
        chooses them eagerly."""
        srh = self.model.audio_invert_tower
        k = srh.group_size
        hidden, text_embed, text_logits = self._llm(token, group, fuse, positions, k_cache, v_cache, slot, key_valid)
        said = (hidden, text_embed, token, positions, slot) if lagged is None else lagged  # the group's LLM step
        u, style = srh_input(self.model, *said[:3], style)
        prosody = answer_prosody(self.model, style)
        fine = srh.ungroup(u)  # [B, k, C]
        fine_pos = said[3] * k + torch.arange(k, device=fine.device)  # [B, k]
        fine_slots = said[4] * k + torch.arange(k, device=fine.device)
        srh_key_valid.index_fill_(1, fine_slots, True)
        logits, scores, tokens = [], [], []
        started = torch.zeros(fine.shape[0], dtype=torch.long, device=fine.device)  # units begun in the group
        for j in range(k):
            z = fine[:, j:j + 1] + embed[:, None]
            if upcoming is not None:
                z = z + srh.pending_view(window(upcoming, started, srh.pending_width)[:, None])
            call_logits = self._srh(z, fine_pos[:, j:j + 1], srh_k, srh_v, fine_slots[j:j + 1], srh_key_valid)
            if speech_bias is not None:
                call_logits = call_logits + speech_bias
            if prosody is not None:
                call_logits = call_logits + prosody
            if follow is not None:
                a_cfg = self.model.cfg.audio_config
                call_logits = text_locked(call_logits, window(upcoming, started, 1)[:, 0], *follow,
                                          a_cfg.bos_token_id, a_cfg.eos_token_id)
            call_scores = process(call_logits, params, counts if follow is None else None)
            tok = choose(call_scores, params, noise=noise[:, j] if noise is not None else None)
            if counts is not None:  # later calls of the group see this token in the history
                counts = counts.scatter_add(1, tok[:, None], torch.ones_like(tok[:, None], dtype=counts.dtype))
            started = started + is_start(tok).long()
            if follow is not None:
                follow = follow_on(tok, *follow[1:])
            embed = srh.embed(tok)
            logits.append(call_logits)
            scores.append(call_scores)
            tokens.append(tok)
        return (text_logits, torch.stack(logits, 1), torch.stack(scores, 1), torch.stack(tokens, 1), embed, style,
                hidden, text_embed)


def use_persistent_cache() -> None:
    """Keep inductor's compiled graphs in the user's cache folder (not /tmp) unless $TORCHINDUCTOR_CACHE_DIR says
    where: a second process compiling the same graphs loads them instead."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(user_cache_dir() / "torchinductor")
