"""One validation layer for what a user hands to the inference entry points (CLIs and the Python API).

- `user_audio`: a path (str / Path), file bytes, or an array / tensor of 16 kHz samples -> a checked mono float32
  waveform at 16 kHz. Everything goes through `load_audio`, so arrays meet the same rules as files: numeric, finite,
  non-empty, 1-D or 2-D with the channels on the shorter axis, floats within [-1, 1]-ish, and at least one speech
  token (40 ms) long.
- `user_text`: a str that is valid Unicode. Python decodes command-line bytes that are not UTF-8 into lone
  surrogates (PEP 383); the tokenizer cannot take those, so they are refused here with the offending byte.
  `typed_text` also refuses special tokens written out in a user's text.
- `untrained_parts_error` / `check_trained`: a checkpoint whose config marks its hearing or speaking parts as never
  trained (the fun-audio-chat-mini starting point) is refused audio input, and its speech output is switched off.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

from funaudiochat.engine.prompt import SAMPLE_RATE, TOKEN_RATE
from funaudiochat.errors import InputError

log = logging.getLogger(__name__)

MIN_AUDIO_SECONDS = 1 / TOKEN_RATE  # one speech token; anything shorter gives the model nothing to hear


def user_audio(audio, label: str = "audio") -> np.ndarray:
    """A user's audio for one turn -> validated 16 kHz mono float32 (see the module docstring)."""
    from funaudiochat.audio.io import load_audio

    if isinstance(audio, (np.ndarray, torch.Tensor)):
        return load_audio(audio, SAMPLE_RATE, source_rate=SAMPLE_RATE, min_seconds=MIN_AUDIO_SECONDS, name=label)
    if isinstance(audio, (str, os.PathLike, bytes, bytearray, memoryview)):
        return load_audio(audio, SAMPLE_RATE, min_seconds=MIN_AUDIO_SECONDS,
                          name=None if isinstance(audio, (str, os.PathLike)) else label)
    raise InputError(f"{label}: expected a 16 kHz waveform (numpy array or torch tensor), a file path or file bytes, "
                     f"got {type(audio).__name__}; for other sample rates use load_audio(x, source_rate=RATE)")


def user_text(text, label: str = "text") -> str:
    """A user's text -> the same str, refused when it is not a str or holds undecodable bytes."""
    if not isinstance(text, str):
        raise InputError(f"{label}: expected a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start]
        what = (f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF
                else f"lone surrogate U+{ord(bad):04X}")
        raise InputError(f"{label}: is not valid UTF-8 ({what} at character {err.start}); write it in UTF-8 (check "
                         f"the terminal's locale, e.g. LANG=C.UTF-8)") from None
    return text


def typed_text(tokenizer, text: str, label: str = "text") -> str:
    """`user_text`, and no special tokens written out (`<|im_end|>`, `<|AUDIO|>`, ...): the prompt builder places
    those itself, and a typed one would break the conversation's structure or its audio count."""
    text = user_text(text, label)
    special = [i for i in tokenizer.encode(text) if tokenizer.is_special(i)]
    if special:
        name = tokenizer.decode(special[:1], skip_special=False)
        raise InputError(f"{label}: contains the special token {name}, which typed text cannot hold")
    return text


def check_trained(cfg, audio_in: bool, speech_out: bool, allow_untrained: bool = False) -> bool:
    """Refuse audio input on a checkpoint whose hearing parts were never trained; return whether speech output
    stays on (it is switched off, with a warning, when the speech head was never trained)."""
    missing = set(cfg.untrained_parts())
    if allow_untrained or not missing:
        return speech_out
    if audio_in and "hearing" in missing:
        raise InputError("this checkpoint's audio adapter was never trained (config.json: trained.hearing is false), "
                         "so it cannot understand audio yet; train it (recipes/pre_align.yaml), use a released "
                         "checkpoint, or ask in text; --allow-untrained (allow_untrained=True) runs it anyway")
    if speech_out and "speaking" in missing:
        log.warning("this checkpoint's speech head was never trained (config.json: trained.speaking is false): "
                    "answering in text only (s2t); --allow-untrained generates speech tokens anyway")
        return False
    return speech_out
