"""Multi-turn conversations: history, prompt building and the turn stream in one object.

History policy (documented, as released where the release has one):
- earlier assistant turns are kept as plain text (special tokens removed); earlier user audio is kept as audio;
- at most `max_turns` user turns are kept (released MAX_HISTORY_TURNS = 8). When a new turn would exceed it, the
  oldest turns are dropped at once down to `max_turns // 2` earlier user turns plus the new one, not one per turn,
  so the kept history is prefilled again once per trim instead of on every turn (a sliding window moves every
  position, so nothing cached could be reused);
- if the prompt plus `max_new_tokens` would not fit the engine's context, the oldest half of the earlier turns is
  dropped, then one more turn at a time until it fits; if the newest user turn alone does not fit, the turn is
  refused with a ContextLengthError (nothing is dropped).

Conversation KV reuse (`reuse_cache`, on by default): the session keeps the keys and values (LLM and speech head)
of its last completed turn, and a new turn prefills only what follows the longest common prefix of its prompt with
the cached one (`prefix_cache.ConversationCache`): the new user turn (its audio alone is encoded) and the previous
answer as the history renders it; with speech on, also the last position of the previous prompt, whose speech-head
keys hold the sampled speech. A session's first turn copies the keys and values of its system turn and of its user
turn's opening from the engine's `PrefixStore` (computed once per engine and system prompt). The answers are those
of a whole prefill of the same prompt (up to float rounding: different matrix shapes),
tests/test_conversation_cache.py.

Audio while it is spoken (`start_audio()`, issue 15 item 3): an `IncrementalAudio` encodes each complete encoder chunk
as it arrives and the session prefills the LLM positions of its final vectors (`prefill_ahead.py`), so at the end of
speech only the last chunk and the closing template remain; the answers are those of the whole clip.

A turn changes the history (and the cache) only when it completes (TurnEnd with finish_reason "stop" or "length").
A turn that is refused (bad audio or text: InputError when `ask` is called, before anything runs), raises while
generating, is cancelled, or is abandoned by its consumer leaves the history and the cache as they were (a turn
copies the cached keys and values, never writes them), so the next turn answers as if it never happened.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from funaudiochat.engine.events import TurnEnd, stream_turn
from funaudiochat.engine.generate import Engine, GenerationConfig
from funaudiochat.engine.incremental_audio import IncrementalAudio
from funaudiochat.engine.prefill_ahead import AheadPrefix, prefill_ahead, take_ahead, with_audio_groups
from funaudiochat.engine.inputs import check_trained, typed_text, user_audio
from funaudiochat.engine.prefix_cache import ConversationCache, position_keys, shared_prefix
from funaudiochat.engine.prompt import build_prompt, prompt_ids
from funaudiochat.errors import ContextLengthError, InputError, SessionClosedError
from funaudiochat.text.chat import user_content


@dataclass
class Turn:
    role: str
    content: str
    audios: list[np.ndarray] = field(default_factory=list)


class ChatSession:
    def __init__(self, engine: Engine, tokenizer, gen: GenerationConfig, system: str | None = None,
                 max_turns: int = 8, detokenizer=None, frontend=None, allow_untrained: bool = False,
                 reuse_cache: bool = True):
        if max_turns < 1:
            raise InputError("max_turns must be >= 1")
        self.allow_untrained = allow_untrained
        if not check_trained(engine.cfg, False, not gen.disable_speech, allow_untrained):
            gen = gen.with_(disable_speech=True, force_text_abos=False)
        self.engine, self.tokenizer, self.gen = engine, tokenizer, gen
        self.system, self.max_turns = system, max_turns
        self.detokenizer, self.frontend = detokenizer, frontend
        self.history: list[Turn] = []
        self.reuse_cache = reuse_cache
        self.cache: ConversationCache | None = None  # the last completed turn's keys and values
        self.ahead: AheadPrefix | None = None  # the speaking user's audio prefilled so far (prefill_ahead.py)
        self.closed = False

    def _messages(self, turns: list[Turn]) -> tuple[list[dict], list[np.ndarray]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs += [{"role": t.role, "content": t.content} for t in turns]
        return msgs, [a for t in turns for a in t.audios]

    def _fit(self, turns: list[Turn]):
        """Drop the oldest (user, assistant) pairs as the history policy says; -> (kept turns, messages, audios,
        prompt ids, speech tokens per audio)."""
        users = [i for i, t in enumerate(turns) if t.role == "user"]
        keep = len(users) - 1  # earlier user turns kept
        if len(users) > self.max_turns:
            keep = self.max_turns // 2
        trimmed = keep < len(users) - 1
        while True:
            kept = turns[users[len(users) - 1 - keep]:]
            msgs, audios = self._messages(kept)
            ids, counts = prompt_ids(self.tokenizer, self.engine.cfg, msgs, audios)
            if len(ids) + self.gen.max_new_tokens <= self.engine.max_seq_len:
                return kept, msgs, audios, ids, counts
            if keep == 0:
                raise ContextLengthError(
                    f"this turn needs {len(ids)} prompt tokens + max_new_tokens {self.gen.max_new_tokens}, more "
                    f"than the context of {self.engine.max_seq_len}; send shorter audio or lower max_new_tokens")
            keep = keep - 1 if trimmed else keep // 2
            trimmed = True

    def ask(self, audio=None, text: str | None = None, cancel: threading.Event | None = None):
        """Check one user turn and return the stream of its answer's events.

        audio: 16 kHz samples (1-D, or 2-D with channels on the shorter axis; numpy or torch), a file path or file
        bytes; other rates go through `load_audio(x, source_rate=RATE)` first; or an `IncrementalAudio`
        (`start_audio()`) fed while the user spoke, whose complete chunks are encoded already. text: a str. Bad input
        raises InputError here, before anything runs; the history is updated when the stream reaches a completed
        TurnEnd.
        """
        if self.closed:
            raise SessionClosedError("this chat session is closed")
        if text is not None:
            text = typed_text(self.tokenizer, text)
        if audio is None and not text:
            raise InputError("a user turn needs audio or text")
        encoded, incremental = None, audio if isinstance(audio, IncrementalAudio) else None
        if incremental is not None:  # encoded (and prefilled) while the user spoke: only its last chunk is left
            audio, encoded = audio.finish()
        audios = [user_audio(audio)] if audio is not None else []
        if audios:
            check_trained(self.engine.cfg, True, False, self.allow_untrained)
        user = Turn("user", user_content(len(audios), text), audios)
        kept, msgs, audios, ids, counts = self._fit(self.history + [user])
        prompt, job, keys = self._prefill(msgs, audios, ids, counts, encoded, incremental)
        return self._stream(prompt, job, keys, audios, kept, cancel)

    def start_audio(self, tolerance: float = 0.0, prefill: bool = True) -> IncrementalAudio:
        """A user turn's audio to `add(samples)` to as it arrives, then pass to `ask(audio=...)` at end of speech.
        Its complete chunks are encoded as they arrive and, with `prefill`, their LLM positions prefilled too."""
        audio = IncrementalAudio(self.engine.model, tolerance)
        if prefill:
            audio.listener = lambda: prefill_ahead(self, audio)
        return audio

    def _prefill(self, msgs: list[dict], audios: list, ids: list[int], counts: list[int], encoded=None,
                 incremental: IncrementalAudio | None = None):
        """The prompt and its started prefill, from the cached keys and values of this conversation or of its
        shared prefix when there are some (only the audio after them is encoded), or of the newest audio prefilled
        while it was spoken; -> (prompt, job, position keys)."""
        engine, cfg = self.engine, self.engine.cfg
        gen = engine.usable(self.gen)
        keys = position_keys(ids, audios, counts, cfg.audio_token_index, engine.k)
        prefix, save = self.lookup_prefix(msgs, ids, keys, gen)
        ahead = take_ahead(self, incremental, ids) if incremental is not None else None
        if ahead is not None:
            prefix, save = ahead.prefix, 0
        n = len(prefix) if prefix is not None else 0
        cached_audios = sum(1 for key in keys[:n] if isinstance(key, tuple) and key[1] == 0)
        prompt = build_prompt(self.tokenizer, cfg, msgs, audios, self.frontend, cached_audios=cached_audios,
                              encoded=None if encoded is None else {len(audios) - 1: encoded})  # the newest audio
        if ahead is not None:  # the newest audio's placeholders after the ahead prefix
            with_audio_groups(prompt, encoded[ahead.groups:], engine.k, cfg.audio_config.pad_token_id)
        return prompt, engine.start_prefill(prompt, gen, prefix=prefix, save_prefix=save), keys

    def lookup_prefix(self, msgs: list[dict], ids: list[int], keys: list, gen):
        """(cached keys and values the prompt `ids` starts with: this conversation's or the shared prefix of its
        system turn, or None; how many leading ids to save as that shared prefix when none is stored yet)."""
        engine = self.engine
        prefix, save = None, 0
        if self.reuse_cache and self.cache is not None:
            prefix = self.cache.prefix(ids, keys, engine.k)
        if self.reuse_cache and prefix is None and self.system:
            prefix, save = shared_prefix(engine, self.tokenizer, msgs[0], ids, not gen.disable_speech)
        return prefix, save

    def _stream(self, prompt, job, keys: list, audios: list, kept: list[Turn], cancel: threading.Event | None):
        detok = self.detokenizer.stream() if self.detokenizer is not None else None
        for event in stream_turn(self.engine, prompt, self.gen, self.tokenizer, detok, cancel, prefill=job):
            if isinstance(event, TurnEnd):
                if job.saved_prefix is not None:  # the shared prefix, for the next sessions on this engine
                    self.engine.prefixes.put(job.saved_prefix)
                if event.finish_reason != "cancelled":
                    self.history = kept + [Turn("assistant", event.text.strip())]
                    if self.reuse_cache:
                        self.cache = ConversationCache.commit(job.state, keys, audios)
            yield event

    def reset(self) -> None:
        self.history = []
        self.cache = self.ahead = None

    def close(self) -> None:
        self.closed = True
        self.cache = None
