"""Keys and values computed once and copied into later prompts that start with the same content (copy-on-start).

- `PrefixStore`: system turns (LRU, keyed by ids and whether the speech head ran): a new conversation copies its
  system turn's keys and values instead of computing them. The server's scheduler keeps one; every `Engine` keeps
  one (`engine.prefixes`) for the `ChatSession`s on it.
- `system_prefix_len`: how many leading ids of a prompt are its system turn alone (the shareable prefix).
- `ConversationCache`: a conversation's last committed turn (its finished `DecodeState`), so the next turn, whose
  prompt repeats most of the last one, prefills only what follows their longest common prefix. Each cached position
  is named by its content: the text id, or (audio, group) for an `<|AUDIO|>` placeholder, so equal ids of different
  audio never match. A position counts only if its keys and values are what a prefill of the new prompt computes
  there: prompt positions (but the last with the speech head on: its SRH slots hold the first sampled speech group)
  and, text only, the answer ids fed back while decoding (equal to the history's re-rendered answer when the
  tokenizer splits the answer's text as the model wrote it).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from funaudiochat.engine.generate import DecodeState, PrefixKV, cached_prefix
from funaudiochat.text.chat import render_chatml


class PrefixStore:
    def __init__(self, max_entries: int = 8):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, PrefixKV] = OrderedDict()
        self._lock = threading.Lock()  # (sessions of one engine may run on several threads)

    def get(self, ids: tuple, speech: bool) -> PrefixKV | None:
        with self._lock:
            prefix = self._entries.get((ids, speech))
            if prefix is not None:
                self._entries.move_to_end((ids, speech))
            return prefix

    def put(self, prefix: PrefixKV) -> None:
        with self._lock:
            self._entries[(prefix.ids, prefix.srh_k is not None)] = prefix
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def system_prefix_len(tokenizer, cfg, system: dict, ids: list[int]) -> int:
    """How many leading `ids` are the system turn `system` alone (text only), or 0 when they are not."""
    if system.get("role") != "system" or not isinstance(system.get("content"), str):
        return 0
    sys_ids = tokenizer.encode(render_chatml([system], False))
    n = len(sys_ids)
    if not 0 < n < len(ids) or list(ids[:n]) != sys_ids or cfg.audio_token_index in sys_ids:
        return 0
    return n


def position_keys(ids: list[int], audios: list, counts: list[int], audio_token: int, k: int) -> list:
    """What each prompt position holds: its id, or (id of its audio, group) for an audio placeholder."""
    keys, audio_i, group = [], -1, 0
    for pos, i in enumerate(ids):
        if i != audio_token:
            keys.append(i)
            continue
        if pos == 0 or ids[pos - 1] != audio_token or group == -(-counts[audio_i] // k):
            audio_i, group = audio_i + 1, 0  # (a new audio: placeholders of two adjacent audios are told apart)
        keys.append((id(audios[audio_i]), group))
        group += 1
    return keys


@dataclass
class ConversationCache:
    keys: list                # content of each reusable cached position (see the module docstring)
    state: DecodeState        # the committed turn's finished state (its caches are written no more)
    audios: list = field(default_factory=list)  # the audios named in `keys` (kept alive: keys hold their id())

    @classmethod
    def commit(cls, state: DecodeState, keys: list, audios: list) -> "ConversationCache":
        """The cache of a completed turn whose prompt positions had `keys`."""
        if state.srh_cache is not None:
            keys = keys[:-1]
        else:
            keys = keys + [int(t[0]) for t in state.tokens[:-1]]  # the last answer id was never fed back
        return cls(keys, state, audios)

    def prefix(self, ids: list[int], keys: list, k: int) -> PrefixKV | None:
        """The cached keys and values of the longest common prefix with a prompt of `ids` whose positions have
        `keys` (never its last position, never part of an audio), as views; None when nothing is shared."""
        n = 0
        limit = min(len(self.keys), len(keys) - 1)
        while n < limit and self.keys[n] == keys[n]:
            n += 1
        while n > 0 and isinstance(keys[n], tuple) and keys[n][1] > 0:  # (do not split an audio)
            n -= 1
        return cached_prefix(self.state, tuple(ids[:n]), 0, k) if n else None
