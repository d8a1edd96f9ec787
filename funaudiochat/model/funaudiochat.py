"""The composite Fun-Audio-Chat model: audio encoder + grouping adapter + LLM + Speech Refined Head.

This file holds the input merge (audio groups into `<|AUDIO|>` positions, text/speech fusion) and the training
forward with its losses, exactly as SPEC.md §6 describes (including the released training-only halving of user
audio features, §13 item 5). Generation lives in `funaudiochat.engine`.

Shape legend: B batch, L tokens, A audios, N speech tokens per audio (padded to a multiple of k), G = N/k groups,
k group size (5), D LLM width, V text vocab, Vs speech codebook.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from funaudiochat.config import FunAudioChatConfig
from funaudiochat.errors import InputError
from funaudiochat.model.adapter import GroupingAdapter
from funaudiochat.model.backbone import CausalLM, attention_mask_4d, load_balancing_loss
from funaudiochat.model.encoder import AudioEncoder, conv_output_lengths
from funaudiochat.model.quantize import Int8Linear
from funaudiochat.model.srh import SpeechRefinedHead
from funaudiochat.model.word_reader import WordReader, WordReaderConfig
from funaudiochat.speech.pending_units import PAD, pending_from_labels


@dataclass
class ModelOutput:
    text_logits: torch.Tensor                  # [B, L, V]; [N, V] at the N text targets with text_logits="targets"
    speech_logits: torch.Tensor | None = None  # [B, kL, Vs]
    loss: torch.Tensor | None = None           # text_loss + speech_loss
    text_loss: torch.Tensor | None = None      # includes router_aux_loss_coef * aux_loss for MoE, as released
    speech_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None       # raw MoE load-balancing loss
    last_hidden: torch.Tensor | None = None    # [B, L, D] post-norm


@dataclass
class AudioGroups:
    """Per-audio 5 Hz vectors ready to be scattered into `<|AUDIO|>` positions."""

    features: torch.Tensor         # [A, G, D]
    n_groups: torch.Tensor         # [A] groups kept per audio = ceil(valid speech tokens / k)
    speech_ids: torch.Tensor       # [A, N] padded to a multiple of k
    speech_labels: torch.Tensor    # [A, N] valid ids, -100 elsewhere
    text_features: torch.Tensor | None = None  # [A, G, D] transcript embeddings (training), zero rows without text
    text_labels: torch.Tensor | None = None    # [A, G]
    has_text: torch.Tensor | None = None       # [A] bool: rows with a transcript (assistant speech), with text_ids

    @property
    def kept(self) -> torch.Tensor:
        """[A, G] bool: which groups are real (the first n_groups of each audio)."""
        g = self.features.shape[1]
        return torch.arange(g, device=self.n_groups.device)[None] < self.n_groups[:, None]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy over non-ignored targets, in fp32 (as HF's causal-LM loss).

    With no target at all (e.g. a text-only batch has no speech labels) the loss is 0, not NaN."""
    if not bool((targets != ignore_index).any()):
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=ignore_index)


class FunAudioChatModel(nn.Module):
    def __init__(self, cfg: FunAudioChatConfig):
        super().__init__()
        self.cfg = cfg
        a = cfg.audio_config
        self.continuous_audio_tower = AudioEncoder(a)
        self.audio_tower = GroupingAdapter(a)
        self.audio_invert_tower = SpeechRefinedHead(a) if a.enable_audio_invert_tower else None
        self.word_reader = (WordReader(WordReaderConfig.from_dict(a.word_reader))
                            if a.word_reader is not None else None)
        self.language_model = CausalLM(cfg.text_config)
        self.tie_weights()
        # training only (`train.text_stream_targets`): "released" trains a spoken answer's text stream as laid out
        # (its text, <|sil|> padding, <|audio_eos|>); "text" as a text answer (its text, then the end of turn)
        self.text_stream_targets = "released"

    def tie_weights(self) -> None:
        """The SRH output layer shares the adapter's speech embedding table (released `tie_weights`). An int8 head
        (model/quantize.py) keeps its own int8 copy."""
        if self.audio_invert_tower is not None and not isinstance(self.audio_invert_tower.lm_head, Int8Linear):
            self.audio_invert_tower.lm_head.weight = self.audio_tower.embed_tokens.weight
        if self.cfg.text_config.tie_word_embeddings and not isinstance(self.language_model.lm_head, Int8Linear):
            self.language_model.lm_head.weight = self.language_model.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, modules: list[nn.Module] | None = None) -> None:
        """The released initialisation: Linear/Conv/Embedding ~ N(0, std), zero biases, zero speech pad row,
        LayerNorm 1/0 (RMSNorm weights stay 1). Applies to `modules` (default: the whole model)."""
        for root in modules or [self]:
            for m in root.modules():
                if isinstance(m, (nn.Linear, nn.Conv1d, nn.Embedding)):
                    m.weight.normal_(0.0, std)
                    if getattr(m, "bias", None) is not None:
                        m.bias.zero_()
                    if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                        m.weight[m.padding_idx].zero_()
                elif isinstance(m, nn.LayerNorm):
                    m.weight.fill_(1.0)
                    m.bias.zero_()

    def drop_speech_head(self) -> None:
        """Turn into a speech-to-text model (no SRH), e.g. for a checkpoint saved without one."""
        self.audio_invert_tower = None
        self.cfg.audio_config.enable_audio_invert_tower = False

    @property
    def group_size(self) -> int:
        return self.cfg.audio_config.group_size

    # ------------------------------------------------------------------ audio -> 5 Hz groups
    def encode_audio(self, speech_ids: torch.Tensor, speech_attention_mask: torch.Tensor,
                     input_features: torch.Tensor | None = None, feature_attention_mask: torch.Tensor | None = None,
                     feature_exist_mask: torch.Tensor | None = None, text_ids: torch.Tensor | None = None,
                     text_attention_mask: torch.Tensor | None = None, trace: dict | None = None) -> AudioGroups:
        """Speech tokens [A, S] (+ encoder features of the rows in `feature_exist_mask`, + transcripts) -> groups."""
        cfg, a_cfg, k = self.cfg, self.cfg.audio_config, self.group_size
        speech_attention_mask = speech_attention_mask.to(speech_ids.device)
        labels = torch.where(speech_attention_mask == 1, speech_ids, cfg.ignore_index)
        pad = (-speech_ids.shape[-1]) % k
        if pad:
            speech_ids = F.pad(speech_ids, (0, pad), value=a_cfg.pad_token_id)
            labels = F.pad(labels, (0, pad), value=cfg.ignore_index)
        n_tokens = speech_ids.shape[-1]
        n_groups = (speech_attention_mask.sum(-1) + k - 1) // k

        continuous = read = None
        if input_features is not None:
            if feature_attention_mask is None:
                raise InputError("input_features were given without feature_attention_mask")
            lengths = feature_attention_mask.sum(-1)
            if self.word_reader is not None:
                continuous, read = self._read_words(input_features, lengths, n_tokens)
            else:
                continuous = self.continuous_audio_tower(input_features, lengths, n_tokens)
            if trace is not None:
                trace["cont_audio_features"] = continuous
            if feature_exist_mask is None:
                feature_exist_mask = torch.ones(speech_ids.shape[0], dtype=torch.bool, device=speech_ids.device)
            if int(feature_exist_mask.sum()) != continuous.shape[0]:
                raise InputError(f"feature_exist_mask marks {int(feature_exist_mask.sum())} audios with features but "
                                 f"{continuous.shape[0]} feature rows were given")
        groups = self.audio_tower(speech_ids, continuous, feature_exist_mask)
        if read is not None:
            groups = groups.clone()
            groups[feature_exist_mask] = groups[feature_exist_mask] + read.to(groups.dtype)
        if trace is not None:
            trace["audio_tower_fused"] = groups
        out = AudioGroups(groups, n_groups, speech_ids, labels)

        if text_ids is not None and text_ids.numel() > 0:
            out.text_features, out.text_labels = self._transcripts(text_ids, text_attention_mask,
                                                                   speech_attention_mask, n_tokens // k)
            # Released training fuses every audio row with its transcript embedding, zero for user audio:
            # user features enter the LLM halved in training only (SPEC §13 item 5, reproduced on purpose).
            out.features = (out.text_features + groups) / 2
            has_text = text_attention_mask.bool() if text_attention_mask is not None \
                else torch.ones(groups.shape[0], dtype=torch.bool, device=groups.device)
            out.has_text = has_text
            if self.cfg.audio_config.full_scale_user_audio:  # rows without a transcript (user audio) unaveraged
                out.features = torch.where(has_text[:, None, None], out.features, groups)
            if not self.cfg.audio_config.speech_feedback:  # the assistant's speech is not fed back: its text alone
                out.features = torch.where(has_text[:, None, None], out.text_features, out.features)
        return out

    def _read_words(self, features: torch.Tensor, lengths: torch.Tensor, n_tokens: int):
        """With a word reader: the encoder runs on Whisper's padded windows once, for both the continuous features
        [F, n_tokens, D] and the reader's words [F, n_tokens / k, D]."""
        tower = self.continuous_audio_tower
        windows = tower.window_frames(features, lengths, self.word_reader.cfg.window_frames)  # per audio [W, T, C]
        valid = conv_output_lengths(lengths)[0].tolist()
        continuous = tower.project([w.flatten(0, 1)[:n] for w, n in zip(windows, valid)], n_tokens)
        read = self.word_reader([tower.ln_post(w) for w in windows], n_tokens // self.group_size,
                                self.language_model.model.embed_tokens.weight)
        return continuous, read

    def reader_memory(self, features: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """Log-mel features [F, M, T] and their valid mel frames [F] -> per audio the encoder's output on the
        reader's padded windows [W, T', C], post-LN: what the word reader reads (as `_read_words` runs it)."""
        if self.word_reader is None:
            raise InputError("this model has no word reader (audio_config.word_reader)")
        tower = self.continuous_audio_tower
        return [tower.ln_post(w) for w in tower.window_frames(features, lengths, self.word_reader.cfg.window_frames)]

    def reader_logits(self, features: torch.Tensor, lengths: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Training the word reader (recipe `stage: reader`): log-mel features [N, M, T] of clips of one reader window
        each, their valid mel frames [N], and token sequences [N, L] -> logits [N, L, V] of each next token."""
        memory = self.reader_memory(features, lengths)  # per clip [W, T', C]
        if any(m.shape[0] != 1 for m in memory):
            raise InputError(f"reader training takes clips of one {self.word_reader.cfg.window_s} s window each")
        return self.word_reader.teacher_forced(torch.cat(memory), tokens)

    def _transcripts(self, text_ids, text_attention_mask, speech_attention_mask, n_groups: int):
        """Transcript ids [A, T] -> embeddings [A, G, D] and per-group text labels [A, G] (SPEC §6.1 step 6)."""
        t = self.cfg.text_config
        text_ids = text_ids.clone()
        if text_ids.shape[1] > n_groups:
            text_ids = text_ids[:, :n_groups]
        elif text_ids.shape[1] < n_groups:
            fill = t.pad_token_id if t.pad_token_id is not None else _first(t.eos_token_id)
            text_ids = F.pad(text_ids, (0, n_groups - text_ids.shape[1]), value=fill)
        for special in _as_list(t.eos_token_id) + _as_list(t.pad_token_id):
            text_ids[text_ids == special] = t.sil_index
        if text_attention_mask is None:
            text_attention_mask = torch.ones(text_ids.shape[0], dtype=torch.bool, device=text_ids.device)
        has_text = text_attention_mask.bool()
        labels = torch.where(speech_attention_mask[:, :: self.group_size] == 1, text_ids, self.cfg.ignore_index)
        labels = labels.masked_fill(~has_text[:, None], self.cfg.ignore_index)
        feats = self.language_model.embed(text_ids).masked_fill(~has_text[:, None, None], 0.0)
        return feats, labels

    # ------------------------------------------------------------------ input merge
    def embed_inputs(self, input_ids: torch.Tensor, openers: torch.Tensor | None) -> torch.Tensor:
        """Text ids [B, L] -> LLM input embeddings [B, L, D]; at `openers` [B, L] (assistant speech openers), the
        learned `audio_tower.speech_opener` where the model has one (config `speech_opener`)."""
        x = self.language_model.embed(input_ids)
        opener = self.audio_tower.speech_opener
        if opener is None or openers is None:
            return x
        return torch.where(openers[..., None], opener.to(x.dtype), x)

    def prompt_openers(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Inference: the `<|audio_bos|>` ids [B, L] that open an assistant's speech, i.e. those not followed by an
        `<|AUDIO|>` placeholder (user audio always is)."""
        follows_audio = F.pad(input_ids[:, 1:] == self.cfg.audio_token_index, (0, 1), value=False)
        return (input_ids == self.cfg.text_config.audio_bos_index) & ~follows_audio

    def _training_openers(self, input_ids: torch.Tensor, slots: torch.Tensor, audio: AudioGroups | None):
        """Training: the `<|audio_bos|>` ids [B, L] right before the placeholders of an audio with a transcript
        (the assistant's speech); None without transcripts."""
        if audio is None or audio.has_text is None:
            return None
        text_rows = audio.has_text[:, None].expand_as(audio.kept)  # [A, G]
        slot_text = torch.zeros_like(slots).masked_scatter(slots, text_rows[audio.kept])
        before_text = F.pad(slot_text[:, 1:], (0, 1), value=False)
        return (input_ids == self.cfg.text_config.audio_bos_index) & before_text

    def answer_styles(self, hidden: torch.Tensor, input_ids: torch.Tensor, openers: torch.Tensor,
                      carried: torch.Tensor | None = None, record_starts: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None):
        """The SRH's answer-style input (`SpeechRefinedHead.answer_styles`) of LLM positions with hidden states
        [B, L, D] and input ids [B, L]: a spoken answer opens at `openers` [B, L] and closes at its <|audio_eos|>
        (and at `record_starts` [B, L], packed records' first positions); `mask` [B, L] marks real positions (not
        padding) for the cue. -> (styles [B, L, D], the carried state after the last position [B, S]:
        `answer_state_size`)."""
        closes = self._answer_closes(input_ids)
        if record_starts is not None:
            closes = closes | record_starts
        srh = self.audio_invert_tower
        if srh.answer_cue is None:
            return srh.answer_styles(hidden, openers, closes, carried)
        # with the cue, the carried state is [B, 2D + 1]: the style in force, then the cue's running sum and count
        d = hidden.shape[-1]
        cues, cue_after = self._running_cue(input_ids, closes, mask, carried[:, d:] if carried is not None else None)
        styles, style_after = srh.answer_styles(hidden, openers, closes,
                                                carried[:, :d] if carried is not None else None, cues)
        return styles, torch.cat([style_after.float(), cue_after], dim=-1)

    def _answer_closes(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where a spoken answer closes and the cue starts again: <|audio_eos|>."""
        return input_ids == self.cfg.text_config.audio_eos_index

    def _running_cue(self, input_ids: torch.Tensor, resets: torch.Tensor, mask: torch.Tensor | None,
                     carried: torch.Tensor | None):
        """`SpeechRefinedHead.running_cue` over the input embeddings of these ids: the user audio's slots and padding
        (`mask` false) not counted."""
        counted = input_ids != self.cfg.audio_token_index
        if mask is not None:
            counted = counted & mask.bool()
        return self.audio_invert_tower.running_cue(self.language_model.embed(input_ids), counted, resets, carried)

    def answer_cue_after(self, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The cue's running sum and count [B, D + 1] after a prompt's first positions (ids [B, L]), from its start:
        what a prefill that copies those positions' keys from a cache carries into its first chunk."""
        return self._running_cue(input_ids, self._answer_closes(input_ids), mask, None)[1]

    def answer_state_size(self) -> int:
        """Width of the answer style's carried state (`DecodeState.answer_style`): the style in force [D], and with
        the cue its running sum and count [D + 1]."""
        d = self.cfg.text_config.hidden_size
        return 2 * d + 1 if self.audio_invert_tower.answer_cue is not None else d

    def merge_audio(self, input_ids: torch.Tensor, embeds: torch.Tensor, audio: AudioGroups) -> torch.Tensor:
        """Scatter the kept groups of every audio, in order, into the `<|AUDIO|>` positions of `embeds` [B, L, D]."""
        slots = input_ids == self.cfg.audio_token_index
        feats = audio.features[audio.kept]  # [sum n_groups, D]
        if int(slots.sum()) != feats.shape[0]:
            raise InputError(f"the prompt has {int(slots.sum())} <|AUDIO|> placeholders but the audios give "
                             f"{feats.shape[0]} groups (one placeholder per {self.group_size} speech tokens)")
        return embeds.masked_scatter(slots[..., None], feats.to(embeds.dtype))

    # ------------------------------------------------------------------ training forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                speech_ids: torch.Tensor | None = None, speech_attention_mask: torch.Tensor | None = None,
                input_features: torch.Tensor | None = None, feature_attention_mask: torch.Tensor | None = None,
                feature_exist_mask: torch.Tensor | None = None, text_ids: torch.Tensor | None = None,
                text_attention_mask: torch.Tensor | None = None, output_router_logits: bool | None = None,
                speech: bool = True, text_logits: str = "all", trace: dict | None = None) -> ModelOutput:
        """Full-sequence forward (training, scoring). Inputs are named as the released forward's (SPEC §6).

        `speech=False` skips the SRH (pure text/S2T). `text_logits="targets"` (with labels) computes the text head only
        where a text target is, the same loss for a fraction of the head's work and memory (a 49k-vocab head over every
        prompt position dominates a small model's step). `trace`, if a dict, receives named intermediates.
        """
        if text_logits not in ("all", "targets") or (text_logits == "targets" and labels is None):
            raise ValueError(f"text_logits must be 'all', or 'targets' with labels; got {text_logits!r}")
        cfg, k, ign = self.cfg, self.group_size, self.cfg.ignore_index
        b, l = input_ids.shape
        audio = None
        if speech_ids is not None and speech_ids.numel() > 0:
            if speech_attention_mask is None:
                speech_attention_mask = torch.ones_like(speech_ids)
            audio = self.encode_audio(speech_ids, speech_attention_mask, input_features, feature_attention_mask,
                                      feature_exist_mask, text_ids, text_attention_mask, trace)
        slots = input_ids == cfg.audio_token_index
        srh = self.audio_invert_tower if speech else None
        openers = None  # (looked for only where the model reads them)
        if self.audio_tower.speech_opener is not None or (srh is not None and srh.answer_style is not None):
            openers = self._training_openers(input_ids, slots, audio)
        text_embeds = self.embed_inputs(input_ids, openers)  # [B, L, D]
        embeds = self.merge_audio(input_ids, text_embeds, audio) if audio is not None else text_embeds

        speech_labels = None
        if labels is not None:
            labels = labels.clone()
            speech_labels, labels = self._labels(labels, slots, audio)
        if trace is not None:
            trace.update(lm_inputs_embeds=embeds, lm_labels=labels)

        positions = position_ids if position_ids is not None else torch.arange(l, device=embeds.device)[None].expand(b, -1)
        mask = attention_mask_4d(attention_mask, l, l, 0, b, embeds.device)
        want_router = cfg.text_config.output_router_logits if output_router_logits is None else output_router_logits
        router_logits = [] if want_router else None
        hidden = self.language_model.model(embeds, positions, mask, router_logits=router_logits)
        if text_logits == "targets":  # position i predicts label i + 1
            at = labels[:, 1:] != ign
            out = ModelOutput(text_logits=self.language_model.lm_head(hidden[:, :-1][at]), last_hidden=hidden)
            out.text_loss = cross_entropy(out.text_logits, labels[:, 1:][at], ign)
        else:
            out = ModelOutput(text_logits=self.language_model.lm_head(hidden), last_hidden=hidden)
            if labels is not None:
                out.text_loss = cross_entropy(out.text_logits[:, :-1], labels[:, 1:], ign)
        if trace is not None:
            trace["lm_last_hidden"] = hidden
        if router_logits:
            t = cfg.text_config
            out.aux_loss = load_balancing_loss(router_logits, t.num_experts, t.num_experts_per_tok, attention_mask)
            if out.text_loss is not None:
                out.text_loss = out.text_loss + t.router_aux_loss_coef * out.aux_loss

        if srh is not None:
            if audio is not None and audio.text_features is not None:
                text_embeds = text_embeds.masked_scatter(slots[..., None], audio.text_features[audio.kept])
            u = hidden + text_embeds.detach()
            styles = None
            if srh.answer_style is not None and openers is not None:  # a record's start closes any answer
                starts = position_ids == 0 if position_ids is not None else None
                styles = self.answer_styles(hidden, input_ids, openers, record_starts=starts, mask=attention_mask)[0]
                u = u + styles
            label_ids = (speech_labels if speech_labels is not None
                         else torch.full((b, l * k), ign, dtype=torch.long, device=embeds.device))
            read_back = srh.history_ids(label_ids.masked_fill(label_ids == ign, cfg.audio_config.pad_token_id))
            label_embeds = self.audio_tower.token_embeddings(read_back)
            if trace is not None:
                trace.update(crq_inputs_embeds=u, crq_speech_labels=speech_labels,
                             crq_audio_embeds=label_embeds.reshape(b, l, -1))
            pending = None
            if srh.pending_width:  # fine position q predicts token q + k: its pending units
                pending = pending_from_labels(label_ids, srh.pending_width, cfg.audio_config.bos_token_id)
                pending = F.pad(pending, (0, 0, 0, k), value=PAD)[:, k:]
            out.speech_logits = srh.forward_train(u, label_embeds, attention_mask, position_ids, pending)
            if srh.answer_prosody is not None and styles is not None:  # fine position 5p + j: position p's style
                bias = srh.prosody_bias(styles).repeat_interleave(k, dim=1)
                out.speech_logits = out.speech_logits + bias.to(out.speech_logits.dtype)
            if speech_labels is not None:
                targets = F.pad(speech_labels, (0, k), value=ign)[:, k:]  # token j+5 is predicted at fine index j
                out.speech_loss = cross_entropy(out.speech_logits, targets, ign)

        if out.text_loss is not None:
            out.loss = out.text_loss + (out.speech_loss if out.speech_loss is not None else 0.0)
        return out

    def _labels(self, labels: torch.Tensor, slots: torch.Tensor, audio: AudioGroups | None):
        """Speech labels [B, kL] and rewritten text labels [B, L] (SPEC §6.2)."""
        cfg, k, ign = self.cfg, self.group_size, self.cfg.ignore_index
        b, l = labels.shape
        prompt = labels == ign
        speech = torch.full((b, l, k), ign, dtype=labels.dtype, device=labels.device)
        if audio is not None:
            groups = audio.speech_labels.view(audio.speech_labels.shape[0], -1, k)[audio.kept]  # [sum n, k]
            speech = speech.masked_scatter(slots[..., None], groups.to(labels.dtype))
        speech = speech.masked_fill(prompt[..., None], ign)
        speech = speech.masked_fill((labels == cfg.text_config.audio_eos_index)[..., None],
                                    cfg.audio_config.eos_token_id)
        labels = labels.masked_fill(labels == cfg.audio_token_index, ign)
        if audio is not None and audio.text_labels is not None:
            labels = labels.masked_scatter(slots, audio.text_labels[audio.kept].to(labels.dtype))
            labels = labels.masked_fill(prompt, ign)
        if self.text_stream_targets == "text":
            labels = self._text_answer_targets(labels)
        return speech.reshape(b, l * k), labels

    def _text_answer_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Text labels [B, L] of spoken answers rewritten as a text answer's: the first <|sil|> (or <|audio_eos|>)
        after the text becomes the end of turn, and what follows it (<|sil|> padding, <|audio_eos|>, the turn's own
        end), which the engine writes itself (`speech_holds_turn`), gets no loss."""
        t, ign = self.cfg.text_config, self.cfg.ignore_index
        audio_eos = labels == t.audio_eos_index
        after_text = (labels == t.sil_index) | audio_eos
        first = after_text & ~F.pad(after_text[:, :-1], (1, 0))
        labels = labels.masked_fill(after_text | F.pad(audio_eos[:, :-1], (1, 0)), ign)
        return labels.masked_fill(first, _first(t.eos_token_id))


def _as_list(v) -> list[int]:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _first(v):
    return _as_list(v)[0] if _as_list(v) else None
