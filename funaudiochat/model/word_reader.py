"""Word reader (`audio_config.word_reader`, fun-audio-chat-mini only): Whisper's own decoder reads the words of
the user's audio, and they enter the LLM as the LLM's own embeddings of those words.

The mini's adapter could not learn to read words from the frozen Whisper-tiny frames on a few hours of clips
(docs/mini.md): a linear or CTC head trained here misspells most of them. Whisper's decoder already reads them. For
each padded window of the user's audio it transcribes by beam search (Whisper's decoding: beam 5, the best
hypothesis by log-probability over length; greedy decoding loops and drops words on hard clips: faster-whisper's
tiny.en reads the mini's 150 test ASR clips at WER 0.177 greedy and 0.060 with beam 5), and a transcript that still
loops is cut to one copy (`cut_loop`). Each token read is mapped to the LLM's own pieces of the same bytes (`llm_ids`):
" 72" is Whisper's one token but SmolLM2's three pieces " ", "7", "2", which fill three of the user audio's 5 Hz
slots, in order, from the first; the slots after the last piece get nothing here (the continuous features still
fill every slot). Pieces beyond the slots of the audio are dropped (5 slots a second is about twice what speech
needs).

The reader sees Whisper's padded windows of `window_s` seconds: Whisper was trained on 30 s, but tiny.en reads a
question as well from 10 s (those clips: WER 0.068 against 0.073) at a quarter of the encoder's time.

The reader starts as Whisper's weights; the recipe stage `reader` (recipes/mini/reader_noisy.yaml) trains it, with
the encoder, on the training clips' scripts through noise and the telephone band (`teacher_forced`: every position
of a known transcript in one pass). Released checkpoints have no reader. Each step reads all its weights (8 M in the
layers) and scores the whole vocabulary (20 M in the tied projection): the step is bound by memory, not arithmetic.
By default (`set_compute_dtype`) its products read bf16 copies of the weights where the device computes bf16
natively: half the bytes (on a CPU in oneDNN's packed layout: a read 1.2x faster on an AMX CPU than with plain
copies, the same words). Only the products' inputs are rounded to bf16; sums, layer norms, attention and the
residual stream stay fp32. It reads as well (the mini's 150 test ASR clips: bench/word_reader.py, figures in
BENCHMARKS.md). On other CPUs the products read fp32 weights in oneDNN's packed layout, which a product of a few
rows (the 5 beams) reads 1.3-3x faster than the plain weight: the same sums in another order. Either kind of copy is
kept beside its weight (about 110 MB packed, for the tiny.en reader). With fp16 decode weights
(`quantize.set_decode_weights`) the vocabulary product of one window's beams reads an fp16 copy instead, compiled.

Shape legend: A windows, B beams, T encoder frames of a window (50 Hz), C Whisper width, V Whisper vocabulary,
S LLM sub-tokens per Whisper token, m tokens read, G 5 Hz slots, D LLM width.
"""
from __future__ import annotations

import math

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from funaudiochat.errors import ConfigError, InputError
from funaudiochat.model.precision import native_bf16


COMPUTE_DTYPES = ("auto", "fp32", "bf16")


@dataclass
class WordReaderConfig:
    vocab_size: int = 51864
    width: int = 384
    layers: int = 4
    heads: int = 6
    ffn_dim: int = 1536
    max_positions: int = 448
    start_ids: tuple[int, ...] = (50257, 50362)  # <|startoftranscript|> <|notimestamps|> (tiny.en)
    end_id: int = 50256                          # <|endoftext|>
    sub_tokens: int = 5                          # S: LLM sub-tokens kept per Whisper token
    beam_size: int = 5                           # Whisper's beam search (1: greedy)
    window_s: int = 10                           # seconds of audio per padded window the reader sees
    # the user audio's slots a second (5: one per 5 placeholder tokens at 25 Hz, as released). Fast speech reads to
    # more LLM pieces than 5 a second (digits are one piece each): what does not fit is never seen.
    slot_rate: float = 5.0

    @classmethod
    def from_dict(cls, data: dict, where: str = "audio_config.word_reader") -> "WordReaderConfig":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        cfg = cls(**{**data, "start_ids": tuple(data.get("start_ids", cls.start_ids))})
        if cfg.width % cfg.heads or min(cfg.layers, cfg.beam_size, cfg.sub_tokens, len(cfg.start_ids)) < 1:
            raise ConfigError(f"{where}: width must divide into heads; layers, beam_size, sub_tokens, start_ids >= 1")
        if not isinstance(cfg.window_s, int) or not 1 <= cfg.window_s <= 30:
            raise ConfigError(f"{where}.window_s must be whole seconds within [1, 30] (Whisper's window), "
                              f"got {cfg.window_s!r}")
        if not isinstance(cfg.slot_rate, (int, float)) or not 5 <= cfg.slot_rate <= 25:
            raise ConfigError(f"{where}.slot_rate must be within [5, 25] slots a second, got {cfg.slot_rate!r}")
        return cfg

    def placeholders(self, n: int) -> int:
        """A user audio's n placeholder tokens (25 Hz, as the released processor counts them) -> as many as give
        it `slot_rate` slots a second."""
        return math.ceil(n * self.slot_rate / 5)

    @property
    def window_frames(self) -> int:
        """Mel frames (100 Hz) per window."""
        return self.window_s * 100

    def to_dict(self) -> dict:
        return {**asdict(self), "start_ids": list(self.start_ids)}


def set_reader_settings(model, settings: dict, where: str = "audio_config.word_reader") -> None:
    """Make a built model's word reader read with `settings` (its config.json entry and the reader alike)."""
    model.word_reader.cfg = WordReaderConfig.from_dict(settings, where)
    model.cfg.audio_config.word_reader = settings


def cut_loop(tokens: torch.Tensor) -> torch.Tensor:
    """Whisper's failure on hard clips: it repeats a phrase until the token limit ("behold behold behold ...", or a
    whole sentence again). Keep one copy of the longest tail that repeats with some period p: a phrase of p >= 3
    tokens at least twice, a shorter one at least three times ("7 times 7 times 7" stays). [m] -> [m'] (m' <= m)."""
    t, keep = tokens.tolist(), len(tokens)
    for p in range(1, len(t) // 2 + 1):
        start = len(t) - p  # walk back while the tail stays periodic with period p
        while start > 0 and t[start - 1] == t[start - 1 + p]:
            start -= 1
        if len(t) - start >= (3 if p <= 2 else 2) * p:
            keep = min(keep, start + p)
    return tokens[:keep]


def _room_for(pos: int, cache: torch.Tensor) -> torch.Tensor:
    """cache [L, N, H, P, C/H] with room for position `pos`: P doubled (from 32) when full, positions kept."""
    size = cache.shape[3]
    if pos < size:
        return cache
    grown = cache.new_empty(*cache.shape[:3], max(32, 2 * size), cache.shape[4])
    grown[..., :size, :] = cache
    return grown


class _WeightCopy:
    """A copy of a weight made by `make` (a bf16 copy, or the CPU matrix library's packed layout), made once and
    remade when the weight is replaced or changed in place."""

    def __init__(self, make):
        self.make, self.key, self.copy = make, None, None

    def of(self, w: torch.Tensor) -> torch.Tensor:
        key = (w.data_ptr(), w._version)
        if self.key != key:
            self.key, self.copy = key, self.make(w.detach())
        return self.copy

    def drop(self) -> None:
        self.key = self.copy = None


def _bf16_copy(rows: int):
    """A maker of a weight's [N, C] bf16 copy: on a CPU in oneDNN's packed layout for products of about `rows` rows
    (a window's beams: 1.5-2x faster than the plain bf16 weight on an AMX CPU, where oneDNN repacks a plain weight at
    every call; BENCHMARKS.md, "the word reader's bf16 copies packed"), else plain."""
    def make(w: torch.Tensor) -> torch.Tensor:
        w = w.to(torch.bfloat16)
        return _packed(rows)(w) if _packs_for_cpu(w.device) else w
    return make


def _bf16_product(x: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
    """x [R, C] rounded to bf16, times a `_bf16_copy` [N, C] -> [R, N] fp32 (the product rounded to bf16 either way)."""
    x = x.to(torch.bfloat16)
    return (_packed_product(x, copy, None) if _packs_for_cpu(x.device) else F.linear(x, copy)).float()


def _packs_for_cpu(device: torch.device) -> bool:
    """Whether fp32 products on this device can read weights packed by oneDNN (PyTorch's CPU builds)."""
    return device.type == "cpu" and torch.backends.mkldnn.is_available()


def _packed(rows: int):
    """A maker of oneDNN's packed layout of a weight [N, C], for products of about `rows` rows."""
    return lambda w: torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows)


def _packed_product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _rows_times_half(z: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """z [R, C] fp32 times the fp16 copy half [V, C] -> [R, V] fp32: a product-and-sum reduction per row, stacked,
    which inductor fuses into one kernel that reads `half` once for all R rows (each weight converted to fp32 as it
    is loaded; products and sums in fp32)."""
    return torch.stack([(half * z[j]).sum(-1) for j in range(z.shape[0])])


_compiled_rows_times_half = torch.compile(_rows_times_half, dynamic=False)  # (compiled at first use)


class _Linear(nn.Linear):
    """nn.Linear whose product, during a read (`WordReader.read` sets `product`), reads a bf16 copy of the weight
    (`_bf16_copy`; the input rounded to bf16, the product accumulated in fp32, the bias added in fp32) or oneDNN's
    packed fp32 layout of it (the same sums in another order). Training reads the weight itself ("plain")."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.product = "plain"
        self._bf16, self._packed = _WeightCopy(_bf16_copy(WordReaderConfig.beam_size)), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.product == "plain" or self.weight.dtype != torch.float32:
            return super().forward(x)
        if self.product == "packed":
            return _packed_product(x, self._packed.of(self.weight), self.bias)
        return _bf16_product(x, self._bf16.of(self.weight)) + self.bias


class _Attention(nn.Module):
    """Whisper attention: `qkv` fused for self-attention, `q` + `kv` for cross-attention."""

    def __init__(self, width: int, heads: int, cross: bool):
        super().__init__()
        self.heads = heads
        if cross:
            self.q, self.kv = _Linear(width, width), _Linear(width, 2 * width)
        else:
            self.qkv = _Linear(width, 3 * width)
        self.out = _Linear(width, width)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """[A, L, C] -> [A, H, L, C/H]"""
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def attend(self, q, k, v) -> torch.Tensor:
        out = F.scaled_dot_product_attention(self.split(q), k, v)
        return self.out(out.transpose(1, 2).flatten(2))

    def attend_window(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Cross-attention of q [A*B, 1, C] (B beams of each of A windows) to each window's k, v [A, H, T, C/H]:
        a window's B beams are B query positions of one unmasked attention, so its keys and values are read once
        a step, not once per beam."""
        a = k.shape[0]
        q = self.split(q).view(a, -1, self.heads, q.shape[-1] // self.heads).transpose(1, 2)  # [A, H, B, C/H]
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # [A, B, H, C/H]
        return self.out(out.reshape(-1, 1, q.shape[1] * q.shape[3]))


class _DecoderLayer(nn.Module):
    def __init__(self, cfg: WordReaderConfig):
        super().__init__()
        self.self_norm, self.cross_norm, self.ffn_norm = (nn.LayerNorm(cfg.width) for _ in range(3))
        self.self_attn = _Attention(cfg.width, cfg.heads, cross=False)
        self.cross_attn = _Attention(cfg.width, cfg.heads, cross=True)
        self.fc1, self.fc2 = _Linear(cfg.width, cfg.ffn_dim), _Linear(cfg.ffn_dim, cfg.width)

    def forward(self, x, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int, cross_kv: tuple) -> torch.Tensor:
        """x [A*B, 1, C], one new position of each beam; k_cache / v_cache [A*B, H, P, C/H] hold positions < pos
        (this one is written at pos); cross_kv: each window's keys and values [A, H, T, C/H]."""
        q, k, v = self.self_attn.qkv(self.self_norm(x)).chunk(3, dim=-1)
        k_cache[:, :, pos] = self.self_attn.split(k)[:, :, 0]
        v_cache[:, :, pos] = self.self_attn.split(v)[:, :, 0]
        x = x + self.self_attn.attend(q, k_cache[:, :, : pos + 1], v_cache[:, :, : pos + 1])
        x = x + self.cross_attn.attend_window(self.cross_attn.q(self.cross_norm(x)), *cross_kv)
        return x + self.fc2(F.gelu(self.fc1(self.ffn_norm(x))))

    def teacher_forced(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """x [N, L, C], every position of a known token sequence at once (causal); memory [N, T, C] -> [N, L, C]."""
        attn, cross = self.self_attn, self.cross_attn
        q, k, v = (attn.split(t) for t in attn.qkv(self.self_norm(x)).chunk(3, dim=-1))
        x = x + attn.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2))
        k, v = (cross.split(t) for t in cross.kv(memory).chunk(2, dim=-1))
        x = x + cross.attend(cross.q(self.cross_norm(x)), k, v)
        return x + self.fc2(F.gelu(self.fc1(self.ffn_norm(x))))


class WordReader(nn.Module):
    def __init__(self, cfg: WordReaderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.width)  # tied with the output projection
        self.embed_positions = nn.Parameter(torch.zeros(cfg.max_positions, cfg.width))
        self.layers = nn.ModuleList(_DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)
        # Whisper token -> its LLM sub-tokens (-1 past the last one); set when the reader is attached
        self.register_buffer("llm_ids", torch.full((cfg.vocab_size, cfg.sub_tokens), -1, dtype=torch.long))
        self.compute_dtype = "auto"
        self.half_vocabulary = False  # the fp32 CPU product over the vocabulary reads an fp16 copy, compiled
        self._projection_half = _WeightCopy(lambda w: w[: cfg.end_id + 1].to(torch.float16).contiguous())
        self._projection_bf16 = _WeightCopy(lambda w: _bf16_copy(cfg.beam_size)(w[: cfg.end_id + 1]))  # words' rows
        self._projection_packed = _WeightCopy(lambda w: _packed(cfg.beam_size)(w[: cfg.end_id + 1]))  # words' rows

    def set_compute_dtype(self, name: str) -> None:
        """What the products read: fp32 weights, bf16 copies, or auto (bf16 where the device computes it natively)."""
        if name not in COMPUTE_DTYPES:
            raise ConfigError(f"word reader compute dtype must be one of {COMPUTE_DTYPES}, got {name!r}")
        self.compute_dtype = name

    def use_half_vocabulary(self, on: bool) -> None:
        """Whether the packed fp32 read's vocabulary product reads an fp16 copy (`_word_logits`); off drops the copy."""
        self.half_vocabulary = on
        if not on:
            self._projection_half.drop()

    def _product_kind(self, device: torch.device) -> str:
        """What this read's products read: "bf16" copies, the "packed" fp32 layout (a CPU), or the "plain" weights;
        sets every layer's products to match."""
        if self.embed_tokens.weight.dtype != torch.float32:
            kind = "plain"  # a model cast to bf16 as a whole
        elif self.compute_dtype == "bf16" or (self.compute_dtype == "auto" and native_bf16(device)):
            kind = "bf16"
        else:
            kind = "packed" if _packs_for_cpu(device) else "plain"
        self._set_products(kind)
        return kind

    def _set_products(self, kind: str) -> None:
        for module in self.modules():
            if isinstance(module, _Linear):
                if kind == "packed" and module._packed is None:
                    module._packed = _WeightCopy(_packed(self.cfg.beam_size))
                module.product = kind

    def _word_logits(self, z: torch.Tensor, kind: str) -> torch.Tensor:
        """final states [N, C] -> fp32 logits [N, end_id + 1] of the words and the end token: Whisper's specials
        and timestamps past them are never read, so their rows of the tied projection are not either. The
        projection [V, C] is read at every step, most of a read's time on a CPU whose cache does not hold it (80 MB
        in fp32); in bf16 it is half the bytes. On a CPU without native bf16 the fp32 product reads oneDNN's packed
        layout instead: about 3x faster than the plain product for the B rows of a window's beams; with
        `half_vocabulary` (set with fp16 decode weights, `quantize.set_decode_weights`), a compiled product over an
        fp16 copy reads half those bytes (~1.6x faster again on an AVX2 CPU) for one window's B rows."""
        if kind == "packed" and self.half_vocabulary and z.shape[0] == self.cfg.beam_size:
            return _compiled_rows_times_half(z, self._projection_half.of(self.embed_tokens.weight))
        if kind == "packed":
            return _packed_product(z, self._projection_packed.of(self.embed_tokens.weight), None)
        if kind == "bf16":
            return _bf16_product(z, self._projection_bf16.of(self.embed_tokens.weight))
        w = self.embed_tokens.weight
        return (z.to(w.dtype) @ w[: self.cfg.end_id + 1].T).float()

    def _step(self, token: torch.Tensor, pos: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
              cross: list) -> torch.Tensor:
        """tokens [N] at position `pos` -> final states [N, C]; each layer's keys and values of this position are
        written into its slice of k_cache / v_cache [L, N, H, P, C/H]."""
        x = (self.embed_tokens(token) + self.embed_positions[pos])[:, None]
        for layer, k, v, kv in zip(self.layers, k_cache, v_cache, cross):
            x = layer(x, k, v, pos, kv)
        return self.norm(x[:, 0])

    def teacher_forced(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Training: encoder windows memory [N, T, C] (post-LN) and token sequences [N, L] (the prompt `start_ids`,
        then the transcript) -> fp32 logits [N, L, V] of each next token, all positions in one causal pass (what
        `read` computes one step at a time). Products read the fp32 weights, so gradients reach them."""
        if tokens.shape[1] > self.cfg.max_positions:
            raise InputError(f"a transcript of {tokens.shape[1]} tokens is past the reader's "
                             f"{self.cfg.max_positions} positions")
        self._set_products("plain")  # a read may have left them on copies (no gradient there)
        x = self.embed_tokens(tokens) + self.embed_positions[: tokens.shape[1]]
        for layer in self.layers:
            x = layer.teacher_forced(x, memory)
        return (self.norm(x) @ self.embed_tokens.weight.T).float()

    @torch.no_grad()
    def read(self, memory: torch.Tensor, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Beam-search transcription of encoder windows memory [A, T, C] (post-LN, 50 Hz) -> the tokens read
        [A, m] (padded with the end token) and how many each window read [A] (the end token excluded)."""
        cfg, a, b = self.cfg, memory.shape[0], self.cfg.beam_size
        max_tokens = min(max_tokens, cfg.max_positions - len(cfg.start_ids))
        if max_tokens < 1:  # no slot to fill (an audio shorter than one 5 Hz group)
            return memory.new_zeros(a, 0, dtype=torch.long), memory.new_zeros(a, dtype=torch.long)
        kind = self._product_kind(memory.device)
        cross = [tuple(layer.cross_attn.split(t) for t in layer.cross_attn.kv(memory).chunk(2, dim=-1))
                 for layer in self.layers]  # per window [A, H, T, C/H], shared by its beams
        # every layer's keys and values in one tensor each, so a step reorders the beams' caches in one gather
        k_cache = v_cache = memory.new_empty(len(self.layers), a * b, cfg.heads, 0, cfg.width // cfg.heads,
                                             dtype=self.embed_tokens.weight.dtype)  # (what the layers compute in)
        for pos, start in enumerate(cfg.start_ids[:-1]):  # the prompt, the same in every beam
            k_cache, v_cache = _room_for(pos, k_cache), _room_for(pos, v_cache)
            self._step(torch.full((a * b,), start, device=memory.device), pos, k_cache, v_cache, cross)
        token = torch.full((a * b,), cfg.start_ids[-1], device=memory.device)
        scores = torch.full((a, b), float("-inf"), device=memory.device)  # fp32 whatever the model's dtype
        scores[:, 0] = 0.0  # the beams start identical: only the first one expands
        paths = torch.zeros(a, b, 0, dtype=torch.long, device=memory.device)
        finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(a)]  # (score / length, tokens)
        # CTranslate2's rule: a window is read once a step's best candidate has ended and B hypotheses have
        top_ended, done = [False] * a, [False] * a
        rows = torch.arange(a, device=memory.device)[:, None]
        for step in range(max_tokens):
            pos = len(cfg.start_ids) - 1 + step
            k_cache, v_cache = _room_for(pos, k_cache), _room_for(pos, v_cache)
            logits = self._word_logits(self._step(token, pos, k_cache, v_cache, cross), kind)
            if step == 0:
                logits[:, cfg.end_id] = float("-inf")  # an empty transcript is never read
            # the best 2B of a window's B*V candidates: enough for B live beams besides the ones that end here.
            # They are among its beams' own best 2B each, so the top-k over [A, B*V] is taken in two small ones.
            beam_top, beam_index = logits.log_softmax(dim=-1).topk(2 * b, dim=-1)  # [A*B, 2B]
            total = (scores[..., None] + beam_top.view(a, b, -1)).flatten(1)  # [A, B*2B]
            top, pick = total.topk(2 * b, dim=-1)
            index = pick // (2 * b) * logits.shape[-1] + beam_index.view(a, -1).gather(1, pick)  # into [A, B*V]
            parents = torch.zeros(a, b, dtype=torch.long, device=memory.device)
            tokens = torch.full((a, b), cfg.end_id, dtype=torch.long, device=memory.device)
            scores = torch.full_like(scores, float("-inf"))
            for i in range(a):
                live = 0
                for rank, (score, idx) in enumerate(zip(top[i].tolist(), index[i].tolist())):
                    if done[i] or live == b or score == float("-inf"):
                        break
                    parent, t = divmod(idx, logits.shape[-1])
                    if t == cfg.end_id:  # scored by log-probability per token read, as CTranslate2 does
                        finished[i].append((score / max(1, paths.shape[2]), paths[i, parent]))
                        top_ended[i] = top_ended[i] or rank == 0
                    else:
                        parents[i, live], tokens[i, live], scores[i, live] = parent, t, score
                        live += 1
                done[i] = top_ended[i] and len(finished[i]) >= b
            paths = torch.cat([paths[rows, parents], tokens[..., None]], dim=2)
            order = (rows * b + parents).flatten()
            for cache in (k_cache, v_cache):  # the beams' histories follow their parents (positions so far only)
                cache[..., : pos + 1, :] = cache[..., : pos + 1, :].index_select(1, order)
            token = tokens.flatten()
            if all(done):
                break
        for i in range(a):  # at the token limit the live beams count too
            if not done[i]:
                finished[i] += [(float(scores[i, k]) / paths.shape[2], paths[i, k]) for k in range(b)
                                if scores[i, k] > float("-inf")]
        best = [cut_loop(max(f, key=lambda hyp: hyp[0])[1]) if f else paths.new_zeros(0) for f in finished]
        count = torch.tensor([len(t) for t in best], dtype=torch.long, device=memory.device)
        out = torch.full((a, int(count.max()) if a else 0), cfg.end_id, dtype=torch.long, device=memory.device)
        for i, t in enumerate(best):
            out[i, : len(t)] = t
        return out, count

    def pieces(self, windows: list[torch.Tensor], n_groups: list[int]) -> list[torch.Tensor]:
        """windows: per audio, its encoder windows [W_a, T, C]; n_groups: per audio, its 5 Hz slots -> per audio the
        LLM piece ids [<= n_groups[a]] read, in slot order (what fills the slots; the rest get nothing)."""
        tokens, count = self.read(torch.cat(windows), max(n_groups, default=0))
        out, first = [], 0
        for w, slots in zip(windows, n_groups):
            read = torch.cat([tokens[i, : int(count[i])] for i in range(first, first + w.shape[0])])
            first += w.shape[0]
            pieces = self.llm_ids[read].flatten()
            out.append(pieces[pieces >= 0][:slots])
        return out

    def forward(self, windows: list[torch.Tensor], n_groups: int, llm_embeddings: torch.Tensor) -> torch.Tensor:
        """windows: per audio, its encoder windows [W_a, T, C] -> [A, G, D], the LLM pieces read in slot order."""
        out = llm_embeddings.new_zeros(len(windows), n_groups, llm_embeddings.shape[-1])
        for a, pieces in enumerate(self.pieces(windows, [n_groups] * len(windows))):
            out[a, : pieces.shape[0]] = llm_embeddings[pieces]
        return out
