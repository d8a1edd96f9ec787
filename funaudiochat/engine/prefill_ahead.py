"""Prefill a user's audio while they speak: the LLM keys and values of the audio positions whose vectors are final.

The LLM is causal, so once `IncrementalAudio` has the vectors of its complete chunks, the prompt's positions up to
those placeholders (history, the user turn's start, the audio so far) can be prefilled before the end of speech. After
each encoded chunk, `prefill_ahead` runs the conversation's prompt cut after the audio's ready placeholders (from the
cached keys and values of the conversation or its system turn, or of the previous ahead prefill) and keeps its keys and
values as a `PrefixKV`; `ask` then prefills only the rest (the last chunk's placeholders and the closing template).

The kept prefix never includes the last ready placeholder (with the speech head on, a prompt's last position holds
sampled speech in its SRH slots, which no later prompt has there), and it is dropped when the audio's maximum rose
and chunks were re-encoded (`IncrementalAudio.recomputed_chunks` changed: the vectors under it are stale). Ahead
prefills are skipped when an earlier audio of the kept history would need encoding (no cached keys cover it) or the
turn would not fit the context; `ask` then runs as without them. The answers equal those without (float rounding:
tests/test_incremental_audio.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from funaudiochat.engine.generate import PrefixKV, cached_prefix
from funaudiochat.engine.prefix_cache import position_keys
from funaudiochat.engine.prompt import Prompt
from funaudiochat.errors import ContextLengthError
from funaudiochat.text.chat import user_content

_SAMPLES_PER_TOKEN = 640  # 16 kHz / 25 speech tokens per second


@dataclass
class AheadPrefix:
    audio: object        # the IncrementalAudio it was computed for
    version: int         # its recomputed_chunks then
    prefix: PrefixKV     # keys and values of the prompt up to `groups` of the audio's placeholders
    groups: int          # how many of the audio's placeholders the prefix covers


def with_audio_groups(prompt: Prompt, groups: torch.Tensor, k: int, pad_id: int) -> Prompt:
    """Give a prompt whose only uncached audio is `groups` [G, D] (vectors encoded ahead) its audio inputs."""
    n = groups.shape[0] * k
    prompt.speech_ids = torch.full((1, n), pad_id, dtype=torch.long)
    prompt.speech_attention_mask = torch.ones(1, n, dtype=torch.long)
    prompt.feature_exist_mask = torch.zeros(1, dtype=torch.bool)
    prompt.audio_groups = [groups]
    return prompt


def prefill_ahead(session, audio) -> None:
    """Prefill the conversation up to `audio`'s final placeholders (see the module docstring); kept on the session."""
    groups = audio.ready_groups()
    engine, cfg, k = session.engine, session.engine.cfg, session.engine.k
    last = session.ahead
    if last is not None and (last.audio is not audio or last.version != audio.recomputed_chunks):
        session.ahead = last = None
    if groups is None or groups.shape[0] - 1 <= (last.groups if last is not None else 0):
        return
    from funaudiochat.engine.session import Turn  # (the session module imports this one)

    stand_in = np.zeros(groups.shape[0] * k * _SAMPLES_PER_TOKEN, np.float32)  # as many placeholders as groups
    user = Turn("user", user_content(1, None), [stand_in])
    try:
        _, msgs, audios, ids, counts = session._fit(session.history + [user])
    except ContextLengthError:
        return
    end = max(i for i, t in enumerate(ids) if t == cfg.audio_token_index) + 1  # after the ready placeholders
    ids = ids[:end]
    gen = engine.usable(session.gen)
    if last is not None and tuple(ids[:len(last.prefix)]) == last.prefix.ids:
        prefix, start = last.prefix, last.groups
    else:
        keys = position_keys(ids, audios, counts, cfg.audio_token_index, k)
        prefix, _ = session.lookup_prefix(msgs, ids, keys, gen)
        n = len(prefix) if prefix is not None else 0
        if cfg.audio_token_index in ids[n:end - groups.shape[0]]:  # an earlier audio would need encoding: skip
            return
        start = 0
    prompt = Prompt(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    with_audio_groups(prompt, groups[start:], k, cfg.audio_config.pad_token_id)
    job = engine.start_prefill(prompt, gen, prefix=prefix)
    while not job.advance():
        pass
    kept = len(ids) - 1  # never the last position
    session.ahead = AheadPrefix(audio, audio.recomputed_chunks,
                                cached_prefix(job.state, tuple(ids[:kept]), 0, k, clone=True), groups.shape[0] - 1)


def take_ahead(session, audio, ids: list[int]) -> AheadPrefix | None:
    """The session's ahead prefix for `audio` when it still holds (same vectors, a prefix of the final `ids`)."""
    ahead, session.ahead = session.ahead, None
    if ahead is None or ahead.audio is not audio or ahead.version != audio.recomputed_chunks:
        return None
    if len(ahead.prefix) >= len(ids) or tuple(ids[:len(ahead.prefix)]) != ahead.prefix.ids:
        return None
    return ahead
