"""A model-ready prompt: token ids plus the audio inputs for its `<|AUDIO|>` placeholders.

Shape legend: B batch, P prompt length (left padded), A audios in order of appearance, N speech tokens,
M mel bins, T mel frames.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Prompt:
    input_ids: torch.Tensor                              # [B, P] left padded
    attention_mask: torch.Tensor | None = None           # [B, P] 1 token / 0 pad
    speech_ids: torch.Tensor | None = None               # [A, N] (pad ids for user audio at inference)
    speech_attention_mask: torch.Tensor | None = None    # [A, N]
    input_features: torch.Tensor | None = None           # [A_c, M, T] log-mel of audios with features
    feature_attention_mask: torch.Tensor | None = None   # [A_c, T]
    feature_exist_mask: torch.Tensor | None = None       # [A] audio has continuous features
    audio_groups: list | None = None                     # [A] an audio's 5 Hz vectors [G, D] encoded ahead, or None

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "Prompt":
        """From a dict named like the released `generate` inputs (e.g. a golden inputs.safetensors)."""
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in tensors.items() if k in names})


TOKEN_RATE = 25  # speech tokens per second (S3 codes; one <|AUDIO|> group = 5 tokens = 200 ms)
SAMPLE_RATE = 16000


def speech_token_count(n_samples: int) -> int:
    """Placeholder speech tokens for a user wav, as the released processor counts them: int(seconds * 25)."""
    return int(n_samples / SAMPLE_RATE * TOKEN_RATE)


def user_audio_tokens(n: int, cfg) -> int:
    """The placeholder speech tokens a model gives a user audio of n (speech_token_count): n as released, more where
    its word reader gives the audio more slots a second (word_reader.slot_rate)."""
    reader = cfg.audio_config.word_reader
    if reader is None:
        return n
    from funaudiochat.model.word_reader import WordReaderConfig

    return WordReaderConfig.from_dict(reader).placeholders(n)


def prompt_ids(tokenizer, cfg, messages: list[dict], audios: list,
               add_generation_prompt: bool = True) -> tuple[list[int], list[int]]:
    """Chat messages + their audios -> (the prompt's ids, each `<|AUDIO|>` expanded to ceil(n/5) copies for an audio
    of n placeholder speech tokens; n per audio). Only the tokenizer runs: no audio features."""
    from funaudiochat.errors import InputError
    from funaudiochat.text.chat import render_chatml

    text = render_chatml(messages, add_generation_prompt)
    ids = tokenizer.encode(text)
    sp = tokenizer.special
    n_slots = sum(1 for i in ids if i == sp.audio)
    if n_slots != len(audios):
        raise InputError(f"the conversation has {n_slots} audio placeholder(s) but {len(audios)} audio(s) were given")
    k = cfg.audio_config.group_size
    counts = []
    for i, wav in enumerate(audios):
        n = speech_token_count(len(wav))
        if n < 1:
            raise InputError(f"audio {i + 1} is {len(wav) / SAMPLE_RATE * 1000:.0f} ms long; at least "
                             f"{1000 / TOKEN_RATE:.0f} ms of speech is needed")
        counts.append(user_audio_tokens(n, cfg))
    expanded, audio_i = [], 0
    for i in ids:
        if i == sp.audio:
            expanded += [sp.audio] * -(-counts[audio_i] // k)
            audio_i += 1
        else:
            expanded.append(i)
    return expanded, counts


def build_prompt(tokenizer, cfg, messages: list[dict], audios: list, frontend=None,
                 add_generation_prompt: bool = True, cached_audios: int = 0, encoded: dict | None = None) -> Prompt:
    """Chat messages + their audios (16 kHz float32 arrays, in order) -> a batch-1 `Prompt`.

    Each `<|AUDIO|>` of the rendered text is expanded to ceil(n/5) copies for an audio of n placeholder speech
    tokens; user audio enters through the continuous encoder (speech ids are all pad), as the released processor does.
    `cached_audios` = j: the first j audios get their placeholders but no audio inputs, for a prefill that copies
    their positions from cached keys and values (`PrefillJob` prefix) and so never encodes them again.
    `encoded` = {audio index: its 5 Hz vectors [G, D]} for audios encoded ahead (`IncrementalAudio`): they get no
    features here (`feature_exist_mask` False) and `audio_groups` carries their vectors to the prefill.
    """
    from funaudiochat.audio.mel import WhisperFrontend

    ids, counts = prompt_ids(tokenizer, cfg, messages, audios, add_generation_prompt)
    a_cfg = cfg.audio_config
    k = a_cfg.group_size
    prompt = Prompt(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    audios, counts = list(audios)[cached_audios:], counts[cached_audios:]
    if audios:
        width = -(-max(counts) // k) * k
        prompt.speech_ids = torch.full((len(audios), width), a_cfg.pad_token_id, dtype=torch.long)
        prompt.speech_attention_mask = torch.zeros(len(audios), width, dtype=torch.long)
        for row, n in enumerate(counts):
            prompt.speech_attention_mask[row, :n] = 1
        encoded = {i - cached_audios: g for i, g in (encoded or {}).items() if i >= cached_audios}
        fresh = [w for i, w in enumerate(audios) if i not in encoded]  # the audios encoded by the prefill
        if fresh:
            frontend = frontend or WhisperFrontend(a_cfg.num_mel_bins)
            longest = max(len(w) for w in fresh) / SAMPLE_RATE
            if longest > frontend.n_samples / SAMPLE_RATE:  # keep every frame: pad to whole 30 s windows, not truncate
                frontend = WhisperFrontend(a_cfg.num_mel_bins, chunk_length=30 * math.ceil(longest / 30))
            prompt.input_features, prompt.feature_attention_mask = frontend(fresh, padding="max_length")
        prompt.feature_exist_mask = torch.tensor([i not in encoded for i in range(len(audios))])
        if encoded:
            prompt.audio_groups = [encoded.get(i) for i in range(len(audios))]
    return prompt


def stack_prompts(prompts: list[Prompt], pad_id: int, speech_pad_id: int) -> Prompt:
    """Left-pad several batch-1 prompts into one batch; their audios are concatenated in row order."""
    width = max(p.input_ids.shape[1] for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        n = p.input_ids.shape[1]
        ids[row, width - n:] = p.input_ids[0]
        mask[row, width - n:] = 1 if p.attention_mask is None else p.attention_mask[0]
    out = Prompt(ids, mask)
    with_audio = [p for p in prompts if p.speech_ids is not None]
    if with_audio:
        n_tok = max(p.speech_ids.shape[1] for p in with_audio)
        out.speech_ids = torch.cat([_pad_right(p.speech_ids, n_tok, speech_pad_id) for p in with_audio])
        out.speech_attention_mask = torch.cat([_pad_right(p.speech_attention_mask, n_tok, 0) for p in with_audio])
        with_features = [p for p in with_audio if p.input_features is not None]
        if with_features:
            n_frames = max(p.input_features.shape[-1] for p in with_features)
            out.input_features = torch.cat([_pad_right(p.input_features, n_frames, 0.0) for p in with_features])
            out.feature_attention_mask = torch.cat([_pad_right(p.feature_attention_mask, n_frames, 0)
                                                    for p in with_features])
        out.feature_exist_mask = torch.cat([p.feature_exist_mask for p in with_audio])
        if any(p.audio_groups is not None for p in with_audio):
            out.audio_groups = [g for p in with_audio for g in (p.audio_groups or [None] * p.speech_ids.shape[0])]
    return out


def _pad_right(x: torch.Tensor, n: int, value) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, n - x.shape[-1]), value=value)
