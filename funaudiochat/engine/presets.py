"""Released generation settings as named presets (SPEC.md §4): what `infer`, `chat` and the server use.

- s2s: examples/infer_s2s.py — DEFAULT_S2M_GEN_KWARGS (sampling: temperature 0.8, top-p 0.9, repetition penalty 1.2,
  shaping text and speech alike) with greedy text and forced <|audio_bos|>; system prompt SPOKEN_S2M_PROMPT.
- s2t: examples/infer_s2t.py — greedy text, speech head off; system prompt DEFAULT_S2T_PROMPT.
- server: the web demo — as s2s but sampled text, 512 new tokens, <|sil|> banned right after <|audio_bos|>.

A checkpoint may ship its own generation defaults (fun-audio-chat-mini: `text_loop_stop`), applied over the mode's.

s2s and server also keep a spoken answer to its stream format (`speech_holds_turn`, ours): once its text ends
(<|sil|>, or an end-of-turn id said mid-speech) it pads with <|sil|> until the speech ends, so the speech says the
whole text and the turn ends after <|audio_eos|>. A model that follows the format is unaffected.
"""
from __future__ import annotations

from dataclasses import fields

from funaudiochat.engine.generate import GenerationConfig
from funaudiochat.errors import ConfigError, InputError
from funaudiochat.text.chat import S2T_PROMPT, SPOKEN_S2M_PROMPT

MODES = ("s2s", "s2t", "server")
S2M_SAMPLING = dict(do_sample=True, temperature=0.8, top_p=0.9, top_k=0, repetition_penalty=1.2)


def generation_preset(mode: str, tokenizer, cfg=None, **overrides) -> GenerationConfig:
    """The mode's released settings, then the generation defaults `cfg`'s checkpoint ships (config.json
    `fun_audio_chat_mini.generation`, written by `assets mini`), then `overrides` (None values ignored)."""
    sp = tokenizer.special
    ids = dict(eos_token_id=sp.im_end, pad_token_id=sp.endoftext if sp.endoftext is not None else sp.im_end)
    if mode == "s2s":
        gen = GenerationConfig(max_new_tokens=2048, **S2M_SAMPLING, **ids, text_greedy=True, force_text_abos=True,
                               speech_holds_turn=True)
    elif mode == "s2t":
        gen = GenerationConfig(max_new_tokens=512, **ids, text_greedy=True, disable_speech=True)
    elif mode == "server":
        bad = ((sp.audio_bos, sp.sil),) if sp.sil is not None else ()
        gen = GenerationConfig(max_new_tokens=512, **S2M_SAMPLING, **ids, force_text_abos=True, bad_words_ids=bad,
                               speech_holds_turn=True)
    else:
        raise InputError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    shipped = ((cfg.extra.get("fun_audio_chat_mini") or {}).get("generation") or {}) if cfg is not None else {}
    unknown = sorted(set(shipped) - {f.name for f in fields(GenerationConfig)})
    if unknown:
        raise ConfigError(f"config.json fun_audio_chat_mini.generation: unknown settings {unknown}")
    return gen.with_(**{**shipped, **{k: v for k, v in overrides.items() if v is not None}})


def default_system(mode: str, cfg=None) -> str:
    """The system prompt `cfg`'s checkpoint was trained with (config.json `fun_audio_chat_mini.system`, written by
    `assets mini`, for every mode), else the mode's released one."""
    mini = (cfg.extra.get("fun_audio_chat_mini") or {}) if cfg is not None else {}
    return mini.get("system") or (S2T_PROMPT if mode == "s2t" else SPOKEN_S2M_PROMPT)
