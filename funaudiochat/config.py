"""Model configuration: one dataclass tree that reads and writes the released `config.json` format.

Released layout (SPEC.md §1):
    {model_type: "funaudiochat", audio_token_index, ignore_index, hidden_size,
     text_config:  {model_type: qwen3 | qwen3_moe | llama | qwen2, ..., audio_bos_index, audio_eos_index, sil_index},
     audio_config: {encoder fields ..., codebook_size, bos/eos/pad_token_id, group_size, continuous_features_mode,
                    enable_audio_invert_tower, crq_transformer_config: {qwen3 decoder fields}}}

Fields we do not model are kept in `extra` so a read → write round trip loses nothing.
Defaults are the Fun-Audio-Chat-8B values (SPEC.md §1.2), so a default config is usable (SPEC §13 item 6).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from funaudiochat import fileio
from funaudiochat.errors import ConfigError

SUPPORTED_BACKBONES = ("qwen3", "qwen3_moe", "llama", "qwen2")

# What the released code (transformers' config classes) assumes for a field a config.json leaves out.
# Reading a file fills gaps from these, so we build exactly the model the released code builds.
_COMMON = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=None, hidden_act="silu", max_position_embeddings=32768,
               rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=None,
               attention_bias=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
FILE_DEFAULTS = {
    "qwen3": {**_COMMON, "head_dim": 128},
    "qwen2": {**_COMMON, "head_dim": None},
    "qwen3_moe": {**_COMMON, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24,
                  "num_key_value_heads": 4, "head_dim": None, "num_experts": 128},
    "llama": {**_COMMON, "vocab_size": 32000, "intermediate_size": 11008, "max_position_embeddings": 2048,
              "bos_token_id": 1, "eos_token_id": 2, "head_dim": None},
}


def _split_known(cls, data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known = {k: v for k, v in data.items() if k in names}
    extra = {k: v for k, v in data.items() if k not in names}
    return known, extra


class _JsonMixin:
    """from_dict / to_dict for flat dataclasses with an `extra` dict of unknown fields."""

    @classmethod
    def _fill_defaults(cls, data: dict[str, Any]) -> dict[str, Any]:
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = ""):
        if not isinstance(data, dict):
            raise ConfigError(f"{where or cls.__name__}: expected an object, got {type(data).__name__}")
        data = cls._fill_defaults(data)
        known, extra = _split_known(cls, data)
        try:
            obj = cls(**known, extra=extra)
        except TypeError as err:  # pragma: no cover - dataclass arg errors
            raise ConfigError(f"{where or cls.__name__}: {err}") from err
        obj.validate(where or cls.__name__)
        return obj

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        return dict(sorted(out.items()))


def _check(cond: bool, where: str, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}.{name}: {msg}")


@dataclass
class BackboneConfig(_JsonMixin):
    """A decoder-only transformer: the text LLM (`text_config`) or the SRH stack (`crq_transformer_config`)."""

    model_type: str = "qwen3"
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = 128  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5e6
    rope_scaling: dict | None = None
    max_position_embeddings: int = 262144
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 151643
    eos_token_id: int | list | None = 151643
    pad_token_id: int | None = None
    # Fun-Audio-Chat's extra text_config fields (undeclared in the released code, SPEC §13 item 6)
    audio_bos_index: int = 151670
    audio_eos_index: int = 151671
    sil_index: int = 151673
    # Qwen3-MoE
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    extra: dict = field(default_factory=dict)

    @classmethod
    def _fill_defaults(cls, data: dict[str, Any]) -> dict[str, Any]:
        base = FILE_DEFAULTS.get(data.get("model_type", "qwen3"), {})
        merged = {**base, **data}
        if merged.get("num_key_value_heads") is None and "num_attention_heads" in merged:
            merged["num_key_value_heads"] = merged["num_attention_heads"]
        return merged

    @property
    def qk_norm(self) -> bool:
        """Qwen3 (dense and MoE) normalises q and k per head."""
        return self.model_type in ("qwen3", "qwen3_moe")

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    _MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                   "decoder_sparse_step", "mlp_only_layers", "output_router_logits", "router_aux_loss_coef")
    _TEXT_ONLY_FIELDS = ("audio_bos_index", "audio_eos_index", "sil_index")

    def to_dict(self, role: str = "text") -> dict[str, Any]:
        """Released layout: MoE fields only for MoE backbones, the audio ids only in `text_config`."""
        out = super().to_dict()
        drop = (() if self.model_type == "qwen3_moe" else self._MOE_FIELDS) + \
               (() if role == "text" else self._TEXT_ONLY_FIELDS)
        return {k: v for k, v in out.items() if k not in drop}

    def is_moe_layer(self, i: int) -> bool:
        return (self.model_type == "qwen3_moe" and self.num_experts > 0 and i not in self.mlp_only_layers
                and (i + 1) % self.decoder_sparse_step == 0)

    def validate(self, where: str) -> None:
        _check(self.model_type in SUPPORTED_BACKBONES, where, "model_type",
               f"{self.model_type!r} is not supported (supported: {', '.join(SUPPORTED_BACKBONES)})")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, where, name, f"must be a positive integer, got {v!r}")
        _check(self.num_attention_heads % self.num_key_value_heads == 0, where, "num_key_value_heads",
               f"{self.num_key_value_heads} does not divide num_attention_heads={self.num_attention_heads}")
        if self.head_dim is None:
            _check(self.hidden_size % self.num_attention_heads == 0, where, "head_dim",
                   "is null and hidden_size is not divisible by num_attention_heads")
        _check(self.dim_head % 2 == 0, where, "head_dim", f"must be even for rotary embeddings, got {self.dim_head}")
        _check(self.hidden_act == "silu", where, "hidden_act", f"only 'silu' is supported, got {self.hidden_act!r}")
        if self.rope_scaling not in (None, {}):
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            _check(kind in ("default", "llama3", "linear"), where, "rope_scaling",
                   f"rope type {kind!r} is not supported (default, linear, llama3)")
        _check(not self.extra.get("use_sliding_window"), where, "use_sliding_window",
               "sliding-window attention is not supported (no released model uses it)")
        _check(not self.extra.get("mlp_bias"), where, "mlp_bias", "MLP biases are not supported")
        if self.model_type == "qwen3_moe":
            _check(self.num_experts > 0, where, "num_experts", "a qwen3_moe backbone needs num_experts > 0")
            _check(0 < self.num_experts_per_tok <= self.num_experts, where, "num_experts_per_tok",
                   f"must be in 1..num_experts={self.num_experts}, got {self.num_experts_per_tok}")
            _check(self.decoder_sparse_step >= 1, where, "decoder_sparse_step", "must be >= 1")


@dataclass
class AudioConfig(_JsonMixin):
    """`audio_config`: continuous encoder, grouping adapter and SRH settings (SPEC.md §1.2, §3)."""

    model_type: str = "funaudiochat_audio_encoder"
    num_mel_bins: int = 128
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    activation_function: str = "gelu"
    max_source_positions: int = 1500
    n_window: int = 100  # chunked attention window: chunks of 2*n_window mel frames
    output_dim: int = 4096
    scale_embedding: bool = False
    codebook_size: int = 6565
    bos_token_id: int = 6561
    eos_token_id: int = 6562
    pad_token_id: int = 6563
    group_size: int = 5
    continuous_features_mode: str = "replace"
    enable_audio_invert_tower: bool = True
    # Training feeds user-audio features at full scale, as inference does. Off (the released behaviour, SPEC §13 item
    # 5): training averages them with a zero transcript embedding, so they enter at half scale in training only.
    # On for a model trained here from a fresh adapter (fun-audio-chat-mini), which would otherwise hear at inference
    # features twice the scale it learned. Written to config.json only when on.
    full_scale_user_audio: bool = False
    # How the adapter groups k continuous 25 Hz frames into one 5 Hz vector before `continual_output_matching`:
    # "mean" (released: their average, [D] -> [D]) or "concat" (the k frames side by side, [k*D] -> [D], which keeps
    # their order; tried for fun-audio-chat-mini, docs/mini.md). A mean matrix W is the concat matrix
    # [W/k ... W/k], so a mean-grouping checkpoint converts exactly (model.adapter.regroup_continuous_weight).
    # Written to config.json only when "concat".
    continuous_grouping: str = "mean"
    # When set, each continuous 5 Hz vector is RMS-normalised to this per-element RMS (no learned gain): a fresh
    # adapter trained into a frozen LLM otherwise grows its outputs ~80x past the text embeddings' scale (docs/mini.md).
    # Released: None (not written to config.json).
    continuous_output_rms: float | None = None
    # The SRH's input at each fine position is the ungrouped LLM state plus this times the previous speech token's
    # embedding. Released: 1.0 (not written to config.json). A fresh SRH on a small LLM starts with the state ~50x
    # louder than the embeddings and never learns to use the token it just said (docs/mini.md, "Speaking").
    srh_token_scale: float = 1.0
    # Pending-units view (fun-audio-chat-mini): the SRH's input also gets the embeddings of the
    # next this-many Piper units not yet started (speech/pending_units.py). Released: 0 (off, not written).
    srh_pending_units: int = 0
    # Whether the LLM's input at an assistant speech position fuses the speech said so far with the text token,
    # (E_text(t) + Enc(g)) / 2, as released (True, not written). False (fun-audio-chat-mini): the LLM reads its own
    # text alone at full scale, so a frozen LLM's text stream is its text answer and only the SRH learns to speak.
    speech_feedback: bool = True
    # fun-audio-chat-mini: the LLM's input at the assistant's `<|audio_bos|>` (the token that opens a spoken answer) is
    # a learned vector, `audio_tower.speech_opener`, instead of that token's embedding, which the hearing LLM reads as
    # "user audio follows". With it, a frozen LLM answers a spoken turn as it answers in text. Released: False.
    speech_opener: bool = False
    # fun-audio-chat-mini: the LLM state at that opener, projected (`audio_invert_tower.answer_style`, zero at the
    # start), is added to the SRH's input at every position of the answer it opens: how to say it (slower, louder)
    # is read where the answer starts and fades from the later states (docs/mini.md). Released: False.
    srh_answer_style: bool = False
    # fun-audio-chat-mini: the answer's style also reads the user's last words: the mean input embedding of the text
    # since the last <|audio_eos|> (the user audio's: "Please say it slowly." and the turn's template), projected
    # (`audio_invert_tower.answer_cue`, zero at the start; needs srh_answer_style). The instruction fades from the
    # LLM's state by the opener (docs/mini.md). Released: False.
    srh_answer_cue: bool = False
    # fun-audio-chat-mini: the answer's style in force also sets a bias on the head's logits
    # (`audio_invert_tower.answer_prosody`, zero at the start; needs srh_answer_style): one added to every Piper token
    # that starts a unit (the speaking rate) and one per loudness level (GAINS), so an instruction moves when units
    # start and how loud the answer is, not only what the head reads. Released: False.
    srh_answer_prosody: bool = False
    # fun-audio-chat-mini: the loudness levels' biases of `srh_answer_prosody` times this (the rate bias as learned).
    # Release 5 ships 2: its level biases learn from one target per answer (the first frame's level, which the whole
    # answer keeps) and left 3 of 11 "quieter" answers at the normal level; doubled, all 11 (docs/mini.md). Released:
    # 1.0 (not written to config.json).
    srh_level_scale: float = 1.0
    # fun-audio-chat-mini: the rate bias of `srh_answer_prosody` times this where it is positive (an answer asked to be
    # quicker), as learned where it is not (plain and slower answers stay token for token the same). The mini's
    # head says its "faster" answers at 0.94 of the pace its data teaches (the voice at speed 1.5); 1.25 brings it
    # to 1.04 (docs/mini.md). Released: 1.0 (not written to config.json).
    srh_speedup_scale: float = 1.0
    # fun-audio-chat-mini: the SRH reads the Piper tokens it said back at the normal loudness, so the loudness of every
    # frame is read from the answer's style (`srh_answer_style`), not copied from the frame before. Released: False.
    srh_blind_gain: bool = False
    # fun-audio-chat-mini: Whisper's decoder reads the user's words into the 5 Hz slots (model/word_reader.py;
    # WordReaderConfig's fields). The encoder then sees Whisper's own 30 s windows. Released: None (not written).
    word_reader: dict | None = None
    crq_transformer_config: BackboneConfig = field(default_factory=lambda: BackboneConfig(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, rope_theta=1e6, max_position_embeddings=32768,
        tie_word_embeddings=True))
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "audio_config"):
        data = dict(data)
        crq = data.pop("crq_transformer_config", None)
        known, extra = _split_known(cls, data)
        if "num_hidden_layers" in extra and "encoder_layers" not in known:
            known["encoder_layers"] = extra["num_hidden_layers"]
        obj = cls(**known, extra=extra)
        if crq is not None:
            obj.crq_transformer_config = BackboneConfig.from_dict(crq, f"{where}.crq_transformer_config")
        obj.validate(where)
        return obj

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["crq_transformer_config"] = self.crq_transformer_config.to_dict(role="srh")
        out["num_hidden_layers"] = self.encoder_layers  # the released class mirrors it
        if not self.full_scale_user_audio:
            del out["full_scale_user_audio"]  # released configs round-trip unchanged
        if self.continuous_grouping == "mean":
            del out["continuous_grouping"]
        if self.continuous_output_rms is None:
            del out["continuous_output_rms"]
        if self.srh_token_scale == 1.0:
            del out["srh_token_scale"]
        if self.srh_pending_units == 0:
            del out["srh_pending_units"]
        if self.speech_feedback:
            del out["speech_feedback"]
        if not self.speech_opener:
            del out["speech_opener"]
        if not self.srh_answer_style:
            del out["srh_answer_style"]
        if not self.srh_answer_cue:
            del out["srh_answer_cue"]
        if not self.srh_answer_prosody:
            del out["srh_answer_prosody"]
        if not self.srh_blind_gain:
            del out["srh_blind_gain"]
        if self.srh_level_scale == 1.0:
            del out["srh_level_scale"]
        if self.srh_speedup_scale == 1.0:
            del out["srh_speedup_scale"]
        if self.word_reader is None:
            del out["word_reader"]
        return dict(sorted(out.items()))

    def validate(self, where: str) -> None:
        for name in ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                     "output_dim", "codebook_size", "group_size", "n_window", "max_source_positions"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, where, name, f"must be a positive integer, got {v!r}")
        _check(self.d_model % self.encoder_attention_heads == 0, where, "encoder_attention_heads",
               f"{self.encoder_attention_heads} does not divide d_model={self.d_model}")
        _check(self.activation_function in ("gelu", "gelu_new", "relu", "silu"), where, "activation_function",
               f"unsupported activation {self.activation_function!r}")
        _check(self.continuous_features_mode in ("replace", "add"), where, "continuous_features_mode",
               f"must be 'replace' or 'add', got {self.continuous_features_mode!r}")
        _check(self.continuous_grouping in ("mean", "concat"), where, "continuous_grouping",
               f"must be 'mean' or 'concat', got {self.continuous_grouping!r}")
        rms = self.continuous_output_rms
        _check(rms is None or (isinstance(rms, (int, float)) and not isinstance(rms, bool) and 0 < rms < math.inf),
               where, "continuous_output_rms", f"must be a positive number or null, got {rms!r}")
        for name in ("srh_token_scale", "srh_level_scale", "srh_speedup_scale"):
            scale = getattr(self, name)
            _check(isinstance(scale, (int, float)) and not isinstance(scale, bool) and 0 < scale < math.inf,
                   where, name, f"must be a positive number, got {scale!r}")
        width = self.srh_pending_units
        _check(isinstance(width, int) and not isinstance(width, bool) and 0 <= width <= 16, where,
               "srh_pending_units", f"must be an integer in [0, 16], got {width!r}")
        _check(isinstance(self.speech_feedback, bool), where, "speech_feedback",
               f"must be true or false, got {self.speech_feedback!r}")
        _check(isinstance(self.speech_opener, bool), where, "speech_opener",
               f"must be true or false, got {self.speech_opener!r}")
        for name in ("srh_answer_style", "srh_answer_cue", "srh_answer_prosody", "srh_blind_gain"):
            _check(isinstance(getattr(self, name), bool), where, name,
                   f"must be true or false, got {getattr(self, name)!r}")
        _check(self.srh_answer_style or not self.srh_answer_cue, where, "srh_answer_cue",
               "is part of the answer's style: it needs srh_answer_style true")
        _check(self.srh_answer_style or not self.srh_answer_prosody, where, "srh_answer_prosody",
               "is read from the answer's style: it needs srh_answer_style true")
        if self.word_reader is not None:
            from funaudiochat.model.word_reader import WordReaderConfig  # the reader's own checks
            _check(isinstance(self.word_reader, dict), where, "word_reader", "must be an object or null")
            reader = WordReaderConfig.from_dict(self.word_reader, f"{where}.word_reader")
            _check(reader.width == self.d_model, where, "word_reader", f"width {reader.width} is not the "
                   f"encoder's d_model {self.d_model}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            _check(isinstance(v, int) and 0 <= v < self.codebook_size, where, name,
                   f"must be a speech id in [0, codebook_size={self.codebook_size}), got {v!r}")
        self.crq_transformer_config.validate(f"{where}.crq_transformer_config")

    @property
    def num_codes(self) -> int:
        """Real speech codes (ids below the specials), e.g. 6561 for the released tokenizer."""
        return min(self.bos_token_id, self.eos_token_id, self.pad_token_id)


# Parts of the model that a checkpoint may not have trained yet, by parameter-name prefix. "hearing": the audio
# encoder and the adapter's feature projection that bring user audio into the LLM; "speaking": the Speech Refined
# Head and the speech-token embedding (tied to the SRH output) + projection that feed its groups back to the LLM.
TRAINABLE_PARTS = {"hearing": ("continuous_audio_tower.", "audio_tower.continual_output_matching."),
                   "speaking": ("audio_invert_tower.", "audio_tower.embed_tokens.", "audio_tower.output_matching.")}


@dataclass
class FunAudioChatConfig:
    """The whole model (`config.json` of a released checkpoint).

    `trained` (our field, absent from released configs): {"hearing": bool, "speaking": bool}, which parts have been
    trained. `funaudiochat assets smollm2` writes both false (fresh random adapter and SRH); a training stage sets
    a part true when it trains any of its parameters. None (no field, e.g. a released checkpoint): fully trained.
    """

    text_config: BackboneConfig = field(default_factory=BackboneConfig)
    audio_config: AudioConfig = field(default_factory=AudioConfig)
    audio_token_index: int = 151669
    ignore_index: int = -100
    trained: dict | None = None
    extra: dict = field(default_factory=dict)

    def untrained_parts(self) -> list[str]:
        """Names of the `TRAINABLE_PARTS` this checkpoint marks as never trained."""
        return [part for part in TRAINABLE_PARTS if self.trained is not None and not self.trained.get(part, True)]

    def mark_trained(self, parameter_names) -> None:
        """Record that a training stage trained these parameters (their parts become trained)."""
        if self.trained is None:
            return
        names = list(parameter_names)
        for part, prefixes in TRAINABLE_PARTS.items():
            if any(n.startswith(prefixes) for n in names):
                self.trained[part] = True
        if self.audio_config.word_reader is not None:  # Whisper's pretrained decoder hears
            self.trained["hearing"] = True

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FunAudioChatConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"config: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        mt = data.get("model_type", "funaudiochat")
        if mt != "funaudiochat":
            raise ConfigError(f"config.model_type: expected 'funaudiochat', got {mt!r}")
        for key in ("text_config", "audio_config"):
            if key not in data:
                raise ConfigError(f"config.{key}: missing (a Fun-Audio-Chat config.json has text_config and "
                                  f"audio_config)")
        text = BackboneConfig.from_dict(data.pop("text_config"), "text_config")
        audio = AudioConfig.from_dict(data.pop("audio_config"), "audio_config")
        audio_token_index = data.pop("audio_token_index", data.pop("audio_token_id", 151669))
        ignore_index = data.pop("ignore_index", -100)
        trained = data.pop("trained", None)
        data.pop("hidden_size", None)  # derived from text_config
        cfg = cls(text, audio, audio_token_index, ignore_index, dict(trained) if isinstance(trained, dict) else trained,
                  extra=data)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update(model_type="funaudiochat", audio_token_index=self.audio_token_index, ignore_index=self.ignore_index,
                   hidden_size=self.hidden_size, text_config=self.text_config.to_dict(),
                   audio_config=self.audio_config.to_dict())
        if self.trained is not None:
            out["trained"] = dict(self.trained)
        return dict(sorted(out.items()))

    def validate(self) -> None:
        t, a = self.text_config, self.audio_config
        if a.output_dim != t.hidden_size:
            raise ConfigError(f"audio_config.output_dim: {a.output_dim} must equal text_config.hidden_size "
                              f"{t.hidden_size} (audio features are fed to the LLM)")
        for name in ("audio_bos_index", "audio_eos_index", "sil_index"):
            v = getattr(t, name)
            _check(isinstance(v, int) and 0 <= v < t.vocab_size, "text_config", name,
                   f"must be a text id in [0, vocab_size={t.vocab_size}), got {v!r}")
        _check(0 <= self.audio_token_index < t.vocab_size, "config", "audio_token_index",
               f"must be a text id in [0, {t.vocab_size}), got {self.audio_token_index}")
        if self.trained is not None:
            ok = isinstance(self.trained, dict) and set(self.trained) <= set(TRAINABLE_PARTS) and \
                all(isinstance(v, bool) for v in self.trained.values())
            _check(ok, "config", "trained", f"must be an object of booleans with keys among "
                   f"{', '.join(TRAINABLE_PARTS)}, got {self.trained!r}")

    @classmethod
    def load(cls, path: str | Path) -> "FunAudioChatConfig":
        """Read `config.json` (or the config.json inside a checkpoint directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path}: no config.json (a checkpoint directory holds config.json + *.safetensors)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from err
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        fileio.write_text(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
