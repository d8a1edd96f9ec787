"""Keys and values computed once and copied into later prompts that start with the same content (copy-on-start).

- `PrefixStore`: shared prefixes (LRU, keyed by ids and whether the speech head ran): a new conversation copies the
  keys and values of its system turn and its first user turn's opening instead of computing them. The server's
  scheduler keeps one; every `Engine` keeps one (`engine.prefixes`) for the `ChatSession`s on it.
- `shared_prefix_len`: how many leading ids of a prompt every new conversation with its system turn starts with
  (the shareable prefix); `shared_prefix`: their stored keys and values on an engine (`engine.prefixes`), or how
  many ids to save.
- `ConversationCache`: a conversation's last committed turn (its finished `DecodeState`), so the next turn, whose
  prompt repeats most of the last one, prefills only what follows their longest common prefix. Each cached position
  is named by its content: the text id, or (audio, group) for an `<|AUDIO|>` placeholder, so equal ids of different
  audio never match. A position counts only if its keys and values are what a prefill of the new prompt computes
  there: prompt positions (but the last with the speech head on: its SRH slots hold the first sampled speech group)
  and, text only, the answer ids fed back while decoding (equal to the history's re-rendered answer when the
  tokenizer splits the answer's text as the model wrote it).
- `ConversationStore`: the server's per-conversation caches (issue 13 part 5, issue 15 item 2): each conversation's
  last completed turn as one-row keys and values (`snapshot_row` of its batch row) named by content as above (audio
  named by a hash of its samples: the server gets new arrays each turn), LRU bounded in entries and in bytes.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from funaudiochat.engine.generate import DecodeState, PrefixKV, cached_prefix
from funaudiochat.text.chat import render_chatml

USER_OPENING = "<|im_start|>user\n"  # how a user turn starts in ChatML (`render_chatml`)


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


def shared_prefix_len(tokenizer, cfg, system: dict, ids: list[int]) -> int:
    """How many leading `ids` every new conversation with the system turn `system` starts with: that turn (text
    only), then the first user turn's opening `<|im_start|>user\n` when `ids` go on with it (the same for a spoken
    or a typed first turn: 3 positions fewer to compute in each new conversation's first prompt); 0 when `ids` do
    not start with the system turn. Never the whole of `ids`."""
    if system.get("role") != "system" or not isinstance(system.get("content"), str):
        return 0
    sys_ids = tokenizer.encode(render_chatml([system], False))
    n = len(sys_ids)
    if not 0 < n < len(ids) or list(ids[:n]) != sys_ids or cfg.audio_token_index in sys_ids:
        return 0
    opening = tokenizer.encode(USER_OPENING)
    if n + len(opening) < len(ids) and list(ids[n:n + len(opening)]) == opening:
        n += len(opening)
    return n


def shared_prefix(engine, tokenizer, system: dict, ids: list[int], speech: bool) -> tuple[PrefixKV | None, int]:
    """(the engine's stored keys and values of the shared prefix (`shared_prefix_len`) of the prompt `ids`, whose
    system turn is `system`, or None; how many leading ids to save as that prefix when none is stored yet, else 0)."""
    n = shared_prefix_len(tokenizer, engine.cfg, system, ids)
    if not n:
        return None, 0
    prefix = engine.prefixes.get(tuple(ids[:n]), speech)
    return prefix, 0 if prefix is not None else n


def position_keys(ids: list[int], audios: list, counts: list[int], audio_token: int, k: int,
                  names: list | None = None) -> list:
    """What each prompt position holds: its id, or (id of its audio, group) for an audio placeholder; with `names`
    (one per audio, e.g. `audio_name`), (name of its audio, group)."""
    keys, audio_i, group = [], -1, 0
    for pos, i in enumerate(ids):
        if i != audio_token:
            keys.append(i)
            continue
        if pos == 0 or ids[pos - 1] != audio_token or group == -(-counts[audio_i] // k):
            audio_i, group = audio_i + 1, 0  # (a new audio: placeholders of two adjacent audios are told apart)
        keys.append((names[audio_i] if names is not None else id(audios[audio_i]), group))
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
        n = common_prefix(self.keys, keys)
        return cached_prefix(self.state, tuple(ids[:n]), 0, k) if n else None


def audio_name(audio) -> bytes:
    """A name for an audio's content (its float32 samples): equal clips get equal names, whatever array holds them."""
    samples = np.ascontiguousarray(np.asarray(audio, dtype=np.float32))
    return hashlib.blake2b(samples.tobytes(), digest_size=16).digest() + len(samples).to_bytes(8, "little")


def common_prefix(cached: list, keys: list) -> int:
    """How many leading positions of a prompt whose positions have `keys` can come from cached positions `cached`:
    their longest common prefix, never the prompt's last position, never ending inside an audio."""
    n = 0
    limit = min(len(cached), len(keys) - 1)
    while n < limit and cached[n] == keys[n]:
        n += 1
    while n > 0 and isinstance(keys[n], tuple) and keys[n][1] > 0:  # (do not split an audio)
        n -= 1
    return n


def audios_in(keys: list) -> int:
    """How many audios start among these position keys."""
    return sum(1 for key in keys if isinstance(key, tuple) and key[1] == 0)


def snapshot_row(state: DecodeState, row: int, start: int, ids: tuple, k: int) -> PrefixKV:
    """Row `row`'s cache slots [start, start + len(ids)) (LLM, and SRH when it ran) copied as the PrefixKV of `ids`."""
    a, b = start, start + len(ids)
    srh = state.srh_cache

    def part(xs, lo, hi):
        return [x[row:row + 1, :, lo:hi].clone() for x in xs]

    return PrefixKV(ids, part(state.llm_cache.k, a, b), part(state.llm_cache.v, a, b),
                    part(srh.k, k * a, k * b) if srh is not None else None,
                    part(srh.v, k * a, k * b) if srh is not None else None)


def head(prefix: PrefixKV, n: int, k: int) -> PrefixKV:
    """The first n positions of a prefix, as views."""
    def part(xs, m):
        return [x[:, :, :m] for x in xs] if xs is not None else None

    return PrefixKV(prefix.ids[:n], part(prefix.llm_k, n), part(prefix.llm_v, n), part(prefix.srh_k, k * n),
                    part(prefix.srh_v, k * n))


def prefix_bytes(prefix: PrefixKV) -> int:
    return sum(x.numel() * x.element_size() for xs in (prefix.llm_k, prefix.llm_v, prefix.srh_k or [],
                                                        prefix.srh_v or []) for x in xs)


@dataclass
class ConversationEntry:
    keys: list          # content of each cached position (see the module docstring)
    prefix: PrefixKV    # their keys and values (one row, owned)
    speech: bool        # computed with the speech head on (its SRH keys and values are there)
    nbytes: int = 0


class ConversationStore:
    """The last completed turn of each conversation, LRU, at most `max_entries` and `max_bytes` in all (an entry
    larger than that is not kept). Thread-safe: the engine thread commits, the prompt builders look up."""

    def __init__(self, max_entries: int = 64, max_bytes: int = 512 << 20):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[str, ConversationEntry] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0

    def lookup(self, conversation: str, ids: list[int], keys: list, speech: bool, k: int) -> PrefixKV | None:
        """The cached keys and values of the longest common prefix of this conversation's last turn with a prompt
        of `ids` / `keys` (views, see `common_prefix`); None when nothing is shared or the speech head differs."""
        with self._lock:
            entry = self._entries.get(conversation)
            if entry is None or entry.speech != speech:
                return None
            self._entries.move_to_end(conversation)
        n = common_prefix(entry.keys, keys)
        if not n:
            return None
        prefix = head(entry.prefix, n, k)
        return PrefixKV(tuple(ids[:n]), prefix.llm_k, prefix.llm_v, prefix.srh_k, prefix.srh_v)

    def commit(self, conversation: str, entry: ConversationEntry, still_wanted=lambda: True) -> bool:
        """Keep `entry` as the conversation's last turn (replacing the one before) if `still_wanted()` holds when the
        lock is held (a conversation dropped meanwhile stays dropped); evict the least recently used to fit."""
        entry.nbytes = prefix_bytes(entry.prefix)
        with self._lock:
            if not still_wanted() or entry.nbytes > self.max_bytes or self.max_entries < 1:
                return False
            self._pop(conversation)
            self._entries[conversation] = entry
            self.nbytes += entry.nbytes
            while len(self._entries) > self.max_entries or self.nbytes > self.max_bytes:
                self._pop(next(iter(self._entries)))
            return True

    def drop(self, conversation: str) -> None:
        with self._lock:
            self._pop(conversation)

    def _pop(self, conversation: str) -> None:
        entry = self._entries.pop(conversation, None)
        if entry is not None:
            self.nbytes -= entry.nbytes

    def __contains__(self, conversation: str) -> bool:
        return conversation in self._entries

    def __len__(self) -> int:
        return len(self._entries)
