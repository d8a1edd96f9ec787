"""Multi-turn conversations: history, prompt building and the turn stream in one object.

History policy (documented, as released where the release has one):
- earlier assistant turns are kept as plain text (special tokens removed); earlier user audio is kept as audio;
- at most `max_turns` user turns are kept (released MAX_HISTORY_TURNS = 8); older ones are dropped first;
- if the prompt plus `max_new_tokens` would not fit the engine's context, the oldest turns are dropped one by one;
  if the newest user turn alone does not fit, the turn is refused with a ContextLengthError (nothing is dropped).

A turn changes the history only when it completes (TurnEnd with finish_reason "stop" or "length"). A turn that is
refused (bad audio or text: InputError when `ask` is called, before anything runs), raises while generating, is
cancelled, or is abandoned by its consumer leaves the history as it was, so the next turn answers as if it never
happened.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from funaudiochat.engine.events import TurnEnd, stream_turn
from funaudiochat.engine.generate import Engine, GenerationConfig
from funaudiochat.engine.inputs import check_trained, typed_text, user_audio
from funaudiochat.engine.prompt import build_prompt
from funaudiochat.errors import ContextLengthError, InputError, SessionClosedError
from funaudiochat.text.chat import user_content


@dataclass
class Turn:
    role: str
    content: str
    audios: list[np.ndarray] = field(default_factory=list)


class ChatSession:
    def __init__(self, engine: Engine, tokenizer, gen: GenerationConfig, system: str | None = None,
                 max_turns: int = 8, detokenizer=None, frontend=None, allow_untrained: bool = False):
        if max_turns < 1:
            raise InputError("max_turns must be >= 1")
        self.allow_untrained = allow_untrained
        if not check_trained(engine.cfg, False, not gen.disable_speech, allow_untrained):
            gen = gen.with_(disable_speech=True, force_text_abos=False)
        self.engine, self.tokenizer, self.gen = engine, tokenizer, gen
        self.system, self.max_turns = system, max_turns
        self.detokenizer, self.frontend = detokenizer, frontend
        self.history: list[Turn] = []
        self.closed = False

    def _messages(self, turns: list[Turn]) -> tuple[list[dict], list[np.ndarray]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs += [{"role": t.role, "content": t.content} for t in turns]
        return msgs, [a for t in turns for a in t.audios]

    def _fit(self, turns: list[Turn]):
        """Drop the oldest (user, assistant) pairs until the prompt fits; -> (prompt, kept turns)."""
        users = [i for i, t in enumerate(turns) if t.role == "user"]
        if len(users) > self.max_turns:
            turns = turns[users[-self.max_turns]:]
        while True:
            msgs, audios = self._messages(turns)
            prompt = build_prompt(self.tokenizer, self.engine.cfg, msgs, audios, self.frontend)
            if prompt.input_ids.shape[1] + self.gen.max_new_tokens <= self.engine.max_seq_len:
                return prompt, turns
            users = [i for i, t in enumerate(turns) if t.role == "user"]
            if len(users) <= 1:
                raise ContextLengthError(
                    f"this turn needs {prompt.input_ids.shape[1]} prompt tokens + max_new_tokens "
                    f"{self.gen.max_new_tokens}, more than the context of {self.engine.max_seq_len}; send shorter audio "
                    f"or lower max_new_tokens")
            turns = turns[users[1]:]

    def ask(self, audio=None, text: str | None = None, cancel: threading.Event | None = None):
        """Check one user turn and return the stream of its answer's events.

        audio: 16 kHz samples (1-D, or 2-D with channels on the shorter axis; numpy or torch), a file path or file
        bytes; other rates go through `load_audio(x, source_rate=RATE)` first. text: a str. Bad input raises
        InputError here, before anything runs; the history is updated when the stream reaches a completed TurnEnd.
        """
        if self.closed:
            raise SessionClosedError("this chat session is closed")
        if text is not None:
            text = typed_text(self.tokenizer, text)
        if audio is None and not text:
            raise InputError("a user turn needs audio or text")
        audios = [user_audio(audio)] if audio is not None else []
        if audios:
            check_trained(self.engine.cfg, True, False, self.allow_untrained)
        user = Turn("user", user_content(len(audios), text), audios)
        prompt, kept = self._fit(self.history + [user])
        return self._stream(prompt, kept, cancel)

    def _stream(self, prompt, kept: list[Turn], cancel: threading.Event | None):
        detok = self.detokenizer.stream() if self.detokenizer is not None else None
        for event in stream_turn(self.engine, prompt, self.gen, self.tokenizer, detok, cancel):
            if isinstance(event, TurnEnd) and event.finish_reason != "cancelled":
                self.history = kept + [Turn("assistant", event.text.strip())]
            yield event

    def reset(self) -> None:
        self.history = []

    def close(self) -> None:
        self.closed = True
