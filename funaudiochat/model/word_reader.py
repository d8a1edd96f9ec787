"""Word reader (`audio_config.word_reader`, fun-audio-chat-mini only): Whisper's own decoder reads the words of
the user's audio, and its states enter the LLM as the embeddings of those words.

The mini's adapter could not learn to read words from the frozen Whisper-tiny frames on a few hours of clips
(docs/mini.md): a linear or CTC head trained here misspells most of them. Whisper's decoder already reads them. For
each 30 s window of the user's audio it decodes greedily; the final state that predicts token j (LayerNorm'd, [C])
gives a distribution over Whisper's vocabulary, and its top-k tokens, mapped to the LLM's own sub-tokens
(`llm_ids`), give the expected LLM input embedding of word piece j. That soft embedding, plus a learned correction of
the state (zero at the start), fills the user audio's 5 Hz slot j; the slots after the last word get nothing here
(the continuous features still fill every slot). Words beyond the slots of the audio are dropped (a 5 Hz slot per
Whisper token is ~1.5x what speech needs).

The reader is frozen (Whisper's weights); only `correction` trains. Released checkpoints have no reader.

Shape legend: A audios, T encoder frames of a window (1500 at 50 Hz), C Whisper width, V Whisper vocabulary,
S LLM sub-tokens per Whisper token, m tokens read, G 5 Hz slots, D LLM width.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from funaudiochat.errors import ConfigError


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
    sub_tokens: int = 4                          # S: LLM sub-tokens kept per Whisper token
    top_k: int = 16                              # Whisper tokens mixed into each soft embedding

    @classmethod
    def from_dict(cls, data: dict, where: str = "audio_config.word_reader") -> "WordReaderConfig":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        cfg = cls(**{**data, "start_ids": tuple(data.get("start_ids", cls.start_ids))})
        if cfg.width % cfg.heads or min(cfg.layers, cfg.top_k, cfg.sub_tokens, len(cfg.start_ids)) < 1:
            raise ConfigError(f"{where}: width must divide into heads; layers, top_k, sub_tokens, start_ids >= 1")
        return cfg

    def to_dict(self) -> dict:
        return {**asdict(self), "start_ids": list(self.start_ids)}


class _Attention(nn.Module):
    """Whisper attention: `qkv` fused for self-attention, `q` + `kv` for cross-attention."""

    def __init__(self, width: int, heads: int, cross: bool):
        super().__init__()
        self.heads = heads
        if cross:
            self.q, self.kv = nn.Linear(width, width), nn.Linear(width, 2 * width)
        else:
            self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """[A, L, C] -> [A, H, L, C/H]"""
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def attend(self, q, k, v) -> torch.Tensor:
        out = F.scaled_dot_product_attention(self.split(q), k, v)
        return self.out(out.transpose(1, 2).flatten(2))


class _DecoderLayer(nn.Module):
    def __init__(self, cfg: WordReaderConfig):
        super().__init__()
        self.self_norm, self.cross_norm, self.ffn_norm = (nn.LayerNorm(cfg.width) for _ in range(3))
        self.self_attn = _Attention(cfg.width, cfg.heads, cross=False)
        self.cross_attn = _Attention(cfg.width, cfg.heads, cross=True)
        self.fc1, self.fc2 = nn.Linear(cfg.width, cfg.ffn_dim), nn.Linear(cfg.ffn_dim, cfg.width)

    def forward(self, x, cache: list, cross_kv: tuple) -> torch.Tensor:
        """x [A, 1, C], one new position; cache [k, v] of the positions before it (grown in place)."""
        q, k, v = self.self_attn.qkv(self.self_norm(x)).chunk(3, dim=-1)
        k, v = self.self_attn.split(k), self.self_attn.split(v)
        cache[0] = k if cache[0] is None else torch.cat([cache[0], k], dim=2)
        cache[1] = v if cache[1] is None else torch.cat([cache[1], v], dim=2)
        x = x + self.self_attn.attend(q, cache[0], cache[1])
        x = x + self.cross_attn.attend(self.cross_attn.q(self.cross_norm(x)), *cross_kv)
        return x + self.fc2(F.gelu(self.fc1(self.ffn_norm(x))))


class WordReader(nn.Module):
    def __init__(self, cfg: WordReaderConfig, llm_dim: int):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.width)  # tied with the output projection
        self.embed_positions = nn.Parameter(torch.zeros(cfg.max_positions, cfg.width))
        self.layers = nn.ModuleList(_DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)
        # Whisper token -> its LLM sub-tokens (-1 past the last one); set when the reader is attached
        self.register_buffer("llm_ids", torch.full((cfg.vocab_size, cfg.sub_tokens), -1, dtype=torch.long))
        self.correction = nn.Linear(cfg.width, llm_dim, bias=False)
        nn.init.zeros_(self.correction.weight)  # at the start the slots hold Whisper's words alone

    @torch.no_grad()
    def read(self, memory: torch.Tensor, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy transcription of encoder windows memory [A, T, C] (post-LN, 50 Hz) -> the final states that
        predicted each token [A, m, C] and the number of tokens read per window [A] (the end token excluded)."""
        cfg, a = self.cfg, memory.shape[0]
        max_tokens = min(max_tokens, cfg.max_positions - len(cfg.start_ids))
        cross = [tuple(layer.cross_attn.split(t) for t in layer.cross_attn.kv(memory).chunk(2, dim=-1))
                 for layer in self.layers]
        caches = [[None, None] for _ in self.layers]
        states, count = [], torch.zeros(a, dtype=torch.long, device=memory.device)
        done = torch.zeros(a, dtype=torch.bool, device=memory.device)
        token = torch.full((a,), cfg.start_ids[0], dtype=torch.long, device=memory.device)
        for pos in range(len(cfg.start_ids) - 1 + max_tokens):
            x = (self.embed_tokens(token) + self.embed_positions[pos])[:, None]
            for layer, cache, kv in zip(self.layers, caches, cross):
                x = layer(x, cache, kv)
            if pos + 1 < len(cfg.start_ids):  # still inside the prompt
                token = torch.full_like(token, cfg.start_ids[pos + 1])
                continue
            z = self.norm(x[:, 0])
            token = (z @ self.embed_tokens.weight.T).argmax(dim=-1)
            done |= token == cfg.end_id
            states.append(z)
            count += (~done).long()
            if bool(done.all()):
                break
        if not states:
            return memory.new_zeros(a, 0, cfg.width), count
        return torch.stack(states, dim=1)[:, : int(count.max())], count

    def embed(self, states: torch.Tensor, llm_embeddings: torch.Tensor) -> torch.Tensor:
        """states [N, C] -> soft LLM embeddings [N, D]: the top-k Whisper tokens' probabilities (renormalised)
        times the mean embedding of each one's LLM sub-tokens, plus the learned correction."""
        probs, tokens = (states @ self.embed_tokens.weight.T).softmax(dim=-1).topk(self.cfg.top_k, dim=-1)
        probs = probs / probs.sum(dim=-1, keepdim=True)
        ids = self.llm_ids[tokens]                                    # [N, k, S]
        valid = (ids >= 0).to(llm_embeddings.dtype)
        pieces = llm_embeddings[ids.clamp(min=0)] * valid[..., None]  # [N, k, S, D]
        means = pieces.sum(dim=2) / valid.sum(dim=2, keepdim=True).clamp(min=1)
        return (probs[..., None].to(means.dtype) * means).sum(dim=1) + self.correction(states)

    def forward(self, windows: list[torch.Tensor], n_groups: int, llm_embeddings: torch.Tensor) -> torch.Tensor:
        """windows: per audio, its encoder windows [W_a, T, C] -> [A, G, D], slot j holding word piece j."""
        out = llm_embeddings.new_zeros(len(windows), n_groups, llm_embeddings.shape[-1])
        flat = torch.cat(windows)
        states, count = self.read(flat, n_groups)
        first = 0
        for a, w in enumerate(windows):
            read = [states[i, : int(count[i])] for i in range(first, first + w.shape[0])]
            first += w.shape[0]
            pieces = torch.cat(read)[:n_groups]
            if pieces.shape[0]:
                out[a, : pieces.shape[0]] = self.embed(pieces.to(out.dtype), llm_embeddings)
        return out
