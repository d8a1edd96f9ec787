"""Speech Refined Head (`audio_invert_tower`, the released "crq" decoder). SPEC.md §3.3, §6.3, §7.2.

One LLM state u_p (5 Hz) is ungrouped by `pre_matching` into k=5 vectors P[5p .. 5p+4] (25 Hz). A small causal
transformer then predicts the speech tokens one by one: the input at fine position q is P[q] plus the embedding of
the previous speech token (times `srh_token_scale`, 1 in the released model), so token j = q+5 is predicted from
P[j-5] and token j-1 (teacher forcing in training, the token just sampled in generation). `lm_head` is tied to the
adapter's speech embedding table.

Shape legend: B batch, L LLM positions, Q = 5L fine positions, D LLM width, Dc SRH width, V speech codebook.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from funaudiochat.config import AudioConfig
from funaudiochat.model.backbone import Backbone, KVCache, attention_mask_4d
from funaudiochat.model.quantize import Int8Linear
from funaudiochat.speech.pending_units import PAD
from funaudiochat.speech.piper_tokens import GAINS, NUM_UNITS, VOCAB_SIZE


class SpeechRefinedHead(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.group_size = k = cfg.group_size
        self.token_scale = float(cfg.srh_token_scale)
        self.blind_gain = cfg.srh_blind_gain
        d, crq = cfg.output_dim, cfg.crq_transformer_config
        self.pre_matching = nn.Linear(d, d * k, bias=True)
        self.crq_transformer = Backbone(crq, with_embeddings=False)
        self.input_matching = nn.Linear(d, crq.hidden_size, bias=False)
        self.output_matching = nn.Linear(crq.hidden_size, d, bias=False)
        self.lm_head = nn.Linear(d, cfg.codebook_size, bias=False)
        self.pending_width = cfg.srh_pending_units
        if self.pending_width:  # one row per (slot, unit), the last unit of each slot = none known
            self.pending_rows = PAD + 1
            self.pending_embed = nn.Embedding(self.pending_width * self.pending_rows, d)
        # `srh_answer_style`: the LLM state at a spoken answer's opener, projected, is added to the head's input
        # throughout that answer (how to say it); zero at the start, so a head that gains it is unchanged
        self.answer_style = nn.Linear(d, d, bias=False) if cfg.srh_answer_style else None
        if self.answer_style is not None:
            nn.init.zeros_(self.answer_style.weight)
        # `srh_answer_cue`: the style also reads the mean input embedding of the user's last words (`running_cue`)
        self.answer_cue = nn.Linear(d, d, bias=False) if cfg.srh_answer_cue else None
        if self.answer_cue is not None:
            nn.init.zeros_(self.answer_cue.weight)
        # `srh_answer_prosody`: the style in force, projected to a rate bias and one bias per loudness level
        self.answer_prosody = nn.Linear(d, 1 + len(GAINS), bias=False) if cfg.srh_answer_prosody else None
        if self.answer_prosody is not None:
            nn.init.zeros_(self.answer_prosody.weight)
        self.level_scale = float(cfg.srh_level_scale)
        self.speedup_scale = float(cfg.srh_speedup_scale)
        self.codebook_size = cfg.codebook_size

    def pending_view(self, pending: torch.Tensor) -> torch.Tensor:
        """Pending unit ids [B, Q, W] (speech/pending_units.py) -> [B, Q, D]: the sum of each slot's embedding."""
        slots = torch.arange(self.pending_width, device=pending.device) * self.pending_rows
        return self.pending_embed(pending + slots).sum(dim=-2)

    @staticmethod
    def running_cue(words: torch.Tensor, counted: torch.Tensor, resets: torch.Tensor,
                    carried: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The cue at each of L positions: the mean of `words` [B, L, D] (input embeddings) over the `counted`
        [B, L] positions from the last `resets` [B, L] one (itself included) up to it. `carried` [B, D + 1] (float32:
        the running sum and count before the first position; zeros at a sequence's start). Computed from ids alone,
        so a prefill that copies cached keys counts their positions too. -> (cues [B, L, D] float32, the running
        sum and count after the last position [B, D + 1])."""
        b, l, d = words.shape
        w = counted[..., None].float()
        running = torch.cat([words.float() * w, w], dim=-1).cumsum(1)  # [B, L, D + 1]
        index = torch.arange(l, device=words.device).expand(b, l)
        last_reset = torch.where(resets, index, -1).cummax(1).values
        before = running.gather(1, (last_reset - 1).clamp(min=0)[..., None].expand_as(running))
        before = torch.where((last_reset > 0)[..., None], before, 0.0)  # the sum up to the reset, excluded
        start = torch.zeros(b, d + 1, device=words.device) if carried is None else carried.float()
        cue = torch.where((last_reset >= 0)[..., None], running - before, start[:, None] + running)
        return cue[..., :d] / cue[..., d:].clamp(min=1.0), cue[:, -1]

    def answer_styles(self, hidden: torch.Tensor, opens: torch.Tensor, closes: torch.Tensor,
                      carried: torch.Tensor | None = None,
                      cues: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The style input [B, L, D] of LLM positions with post-norm hidden states [B, L, D]: inside a spoken answer,
        from its opener (`opens` [B, L]: the assistant's <|audio_bos|>) up to the next `closes` [B, L] (its
        <|audio_eos|>, a record's start), the projected state at that opener (plus, with `answer_cue`, the projected
        `cues` [B, L, D] at it: `running_cue`); zero elsewhere. `carried` [B, D] is the style in force before the
        first position (a decode step, a prefill chunk). -> (styles, the style in force after the last position
        [B, D])."""
        b, l, _ = hidden.shape
        index = torch.arange(l, device=hidden.device).expand(b, l)
        last_open = torch.where(opens, index, -1).cummax(1).values  # [B, L] latest opener at or before, or -1
        last_close = torch.where(closes, index, -1).cummax(1).values
        at_open = last_open.clamp(min=0)[..., None].expand_as(hidden)
        style = self.answer_style(hidden.gather(1, at_open))
        if self.answer_cue is not None:
            style = style + self.answer_cue(cues.gather(1, at_open).to(hidden.dtype))
        styles = torch.where((last_open > last_close)[..., None], style, 0.0)
        if carried is not None:
            before = (last_open < 0) & (last_close < 0)
            styles = torch.where(before[..., None], carried[:, None].to(styles.dtype), styles)
        return styles, styles[:, -1]

    def prosody_bias(self, styles: torch.Tensor) -> torch.Tensor:
        """The answer styles in force [..., D] -> biases [..., V] (float32) on the head's logits: the rate bias on
        every Piper token that starts a unit (times `speedup_scale` where it is positive), plus the bias of its
        loudness level (times `level_scale`) on every Piper token of that level; none on the specials. Piper token
        ((g * U) + u) * 2 + cont (speech/piper_tokens.py)."""
        rate_and_levels = self.answer_prosody(styles.to(self.answer_prosody.weight.dtype)).float()  # [..., 1 + G]
        codes = torch.arange(self.codebook_size, device=styles.device)
        piper = codes < VOCAB_SIZE
        level = (codes // (2 * NUM_UNITS)).clamp(max=len(GAINS) - 1)
        levels = rate_and_levels[..., 1:] * self.level_scale
        rate = rate_and_levels[..., :1]
        rate = torch.where(rate > 0, rate * self.speedup_scale, rate)
        bias = levels.index_select(-1, level) + rate * (codes % 2 == 0)
        return bias * piper

    def rate_bias(self, styles: torch.Tensor) -> torch.Tensor:
        """The answer styles in force [..., D] -> the prosody's rate bias [...] as learned (positive: asked to be
        fast; `speedup_scale` not applied)."""
        return self.answer_prosody(styles.to(self.answer_prosody.weight.dtype))[..., 0].float()

    def ungroup(self, u: torch.Tensor) -> torch.Tensor:
        """u [B, L, D] -> P [B, 5L, D]; fine position 5p+k belongs to LLM position p."""
        b, l, _ = u.shape
        return self.pre_matching(u).view(b, l * self.group_size, -1)

    def history_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """The speech ids the head reads back: as said, or with `srh_blind_gain` Piper frame tokens at the normal
        loudness (token ((g * U) + u) * 2 + cont -> (u * 2) + cont), so each frame's loudness comes from the answer's
        style, not from the frame before it."""
        if not self.blind_gain:
            return tokens
        return torch.where(tokens < VOCAB_SIZE, tokens % (2 * NUM_UNITS), tokens)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Speech token ids -> their (tied) embeddings as the head's input adds them (dequantized rows of an int8
        head; `history_ids`), times `token_scale`."""
        tokens = self.history_ids(tokens)
        if isinstance(self.lm_head, Int8Linear):
            rows = self.lm_head.rows(tokens)
        else:
            rows = F.embedding(tokens, self.lm_head.weight)
        return rows * self.token_scale if self.token_scale != 1.0 else rows

    def decode_hidden(self, z: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                      cache: KVCache | None = None, cache_start: int = 0, read_len: int | None = None,
                      rope=None, last_only: bool = False) -> torch.Tensor:
        """z [B, t, D] (P + previous-token embedding) -> [B, t, D] (or [B, 1, D] for the last position alone, see
        `Backbone.forward`), the input of `lm_head`."""
        h = self.crq_transformer(self.input_matching(z), positions, mask, cache, cache_start, read_len, rope=rope,
                                 last_only=last_only)
        return self.output_matching(h)

    def decode(self, z, positions, mask, cache=None, cache_start: int = 0, read_len: int | None = None, rope=None):
        """z [B, t, D] -> speech logits [B, t, V]."""
        return self.lm_head(self.decode_hidden(z, positions, mask, cache, cache_start, read_len, rope))

    def forward_train(self, u: torch.Tensor, label_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                      position_ids: torch.Tensor | None, pending: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits [B, 5L, V].

        u [B, L, D]: LLM last hidden + text embeddings; label_embeds [B, 5L, D]: embeddings of the speech labels
        (-100 replaced by pad). Mask and positions follow the released code: the LLM mask repeated 5x and positions
        5p+k, zeroed after the last non-zero LLM position (the packing tail). pending [B, 5L, W]: the units pending
        at each fine position (required when the head has the pending-units view).
        """
        b, l, _ = u.shape
        k = self.group_size
        z = self.ungroup(u) + self.token_scale * torch.roll(label_embeds, shifts=-(k - 1), dims=1)
        if self.pending_width:
            z = z + self.pending_view(pending)
        mask2d = attention_mask.repeat_interleave(k, dim=1) if attention_mask is not None else None
        if position_ids is None:
            positions = torch.arange(l * k, device=u.device)[None].expand(b, -1)
        else:
            positions = (position_ids[..., None] * k + torch.arange(k, device=u.device)).reshape(b, l * k)
            nonzero = position_ids != 0
            last = l - nonzero.flip(-1).long().argmax(-1)  # one past the last non-zero position
            last = torch.where(nonzero.any(-1), last, torch.zeros_like(last))
            tail = torch.arange(l, device=u.device)[None] >= last[:, None]
            positions = positions.masked_fill(tail.repeat_interleave(k, dim=1), 0)
        mask = attention_mask_4d(mask2d, l * k, l * k, 0, b, u.device)
        return self.decode(z, positions, mask)
