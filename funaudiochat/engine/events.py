"""The streaming API: one generation turn as an iterator of frozen events that a CLI or a server consumes.

    for event in stream_turn(engine, prompt, gen, tokenizer, detokenizer_session):
        TextDelta   -> new text (decoded incrementally; never splits a UTF-8 character)
        SpeechGroup -> the k speech tokens appended this step (raw ids) and their codes (< num_codes, for a vocoder)
        AudioChunk  -> 24 kHz samples, as soon as a hop of speech tokens is decodable (when a detokenizer is given)
        SpeechEnd   -> the speech stream ended (speech EOS)
        TurnEnd     -> final text, all codes, finish reason ("stop", "length", "cancelled"), usage and timings

The detokenizer session runs on a thread of its own (`DetokenizerThread`): audio is rendered while the next LLM steps
run (onnxruntime and torch release the GIL), and each chunk is handed out after the first step that follows it. But
the first chunk is handed out as soon as it is made (the engine waits for the detokenizer until then), and so is
every chunk while the audio handed out is less than `playback_margin_s` ahead of a listener playing it in real time
from its first sample: then the engine waits for each group's rendering instead of sharing the CPU with it (on a
small CPU a chunk rendered beside the decode steps took several times longer than the audio in hand, a gap in what
the listener hears; the engine runs several times faster than real time, so it can wait).

Cancellation: set the `threading.Event` passed as `cancel`; the turn ends after the current step with
finish_reason "cancelled" (the detokenizer is finalized so no audio already generated is lost).
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from funaudiochat.engine.generate import Engine, GenerationConfig, PrefillJob
from funaudiochat.engine.prompt import Prompt
from funaudiochat.errors import InputError


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class SpeechGroup:
    tokens: tuple[int, ...]  # as generated (may hold the BOS delay / EOS specials)
    codes: tuple[int, ...]   # the real speech codes among them


@dataclass(frozen=True)
class AudioChunk:
    samples: np.ndarray
    sample_rate: int


@dataclass(frozen=True)
class SpeechEnd:
    pass


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    text_tokens: int
    speech_tokens: int
    prefill_s: float
    first_text_s: float | None
    first_audio_s: float | None
    total_s: float
    cached_tokens: int = 0  # leading prompt tokens whose keys and values were copied, not computed


@dataclass(frozen=True)
class TurnEnd:
    text: str
    text_ids: tuple[int, ...]
    speech_codes: tuple[int, ...]
    finish_reason: str
    usage: Usage
    audio: np.ndarray | None = field(default=None, repr=False)  # the whole answer, when a detokenizer ran


class IncrementalDecoder:
    """Decode a growing id list and hand out only the new, complete text."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], ""

    def push(self, token_id: int) -> str:
        if self.tokenizer.is_special(token_id):
            return ""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


class DetokenizerThread:
    """A streaming detokenizer session fed from one thread and run on another. `push(codes)` returns at once, or
    with `wait=True` once the session has taken those codes (and made any chunk they complete); `ready()` gives the
    chunks made so far, in order; `finish()` finalizes the session (when codes came) and gives the rest; `close()`
    stops it without finalizing. An error of the session is raised by the next call."""

    _FINISH, _CLOSE = object(), object()

    def __init__(self, session):
        self.session = session
        self.todo: queue.Queue = queue.Queue()
        self.made: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.pushed = self.taken = 0  # pushes sent / taken by the session (under `self.progress`)
        self.progress = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="detokenizer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while (item := self.todo.get()) not in (self._FINISH, self._CLOSE):
                codes, ahead = item
                for chunk in self.session.push(codes, ahead):
                    self.made.put(chunk)
                with self.progress:
                    self.taken += 1
                    self.progress.notify_all()
            if item is self._FINISH and self.pushed:
                self.made.put(self.session.finalize())
        except BaseException as err:  # handed to the caller's thread
            with self.progress:
                self.error = err
                self.progress.notify_all()

    def ready(self) -> list[np.ndarray]:
        if self.error is not None:
            raise self.error
        out = []
        while not self.made.empty():
            out.append(self.made.get())
        return out

    def push(self, codes, wait: bool = False, ahead: list[int] | None = None) -> None:
        """ahead: the units known to follow (`Engine.units_ahead`), for a session that takes them."""
        if self.error is not None:
            raise self.error
        self.pushed += 1
        self.todo.put((list(codes), ahead))
        if wait:
            with self.progress:
                self.progress.wait_for(lambda: self.taken >= self.pushed or self.error is not None)
            if self.error is not None:
                raise self.error

    def finish(self) -> list[np.ndarray]:
        self.todo.put(self._FINISH)
        self.thread.join()
        return self.ready()

    def close(self) -> None:
        if self.thread.is_alive():
            self.todo.put(self._CLOSE)


PLAYBACK_MARGIN_S = 0.5  # audio in hand (handed out, not yet played in real time) under which the engine waits for
                         # each speech group's rendering


def stream_turn(engine: Engine, prompt: Prompt, gen: GenerationConfig, tokenizer=None, detokenizer=None,
                cancel: threading.Event | None = None, prefill: PrefillJob | None = None,
                playback_margin_s: float = PLAYBACK_MARGIN_S) -> Iterator:
    """Run one batch-1 generation and yield events (see module docstring). `prefill`: a started prefill of
    `prompt` to finish (e.g. one that copies a conversation's cached keys and values, `Engine.steps`).
    `playback_margin_s`: see the module docstring (0: only the first chunk is waited for)."""
    if prompt.input_ids.shape[0] != 1:
        raise InputError("stream_turn streams one conversation; use Engine.generate for batches")
    if not playback_margin_s >= 0:
        raise InputError(f"playback_margin_s must be >= 0, got {playback_margin_s}")
    num_codes = engine.cfg.audio_config.num_codes
    decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else None
    t0 = time.perf_counter()
    first_text = first_audio = None
    codes: list[int] = []
    chunks: list[np.ndarray] = []
    reason = "stop"
    state = None
    audio = DetokenizerThread(detokenizer) if detokenizer is not None else None

    handed_s = 0.0  # seconds of audio handed out

    def hand_out(made):
        nonlocal first_audio, handed_s
        for chunk in made:
            first_audio = first_audio or time.perf_counter() - t0
            chunks.append(chunk)
            handed_s += len(chunk) / detokenizer.sample_rate
            yield AudioChunk(chunk, detokenizer.sample_rate)

    def in_hand() -> float:
        """Audio handed out and not yet played by a listener who started at the first chunk (once there is one)."""
        return handed_s - (time.perf_counter() - t0 - first_audio)

    try:
        for state, step in engine.steps(prompt, gen, prefill=prefill):
            if audio is not None:
                yield from hand_out(audio.ready())
            if decoder is not None:
                delta = decoder.push(int(step.text[0]))
                if delta:
                    first_text = first_text or time.perf_counter() - t0
                    yield TextDelta(delta)
            if step.speech is not None and bool(step.speech_mask[0]):
                group = tuple(int(t) for t in step.speech[0])
                new_codes = tuple(t for t in group if 0 <= t < num_codes)
                codes.extend(new_codes)
                yield SpeechGroup(group, new_codes)
                if audio is not None and new_codes:
                    # until the first chunk, and while little audio is in hand, wait for the detokenizer to take
                    # each group: the chunk they complete goes out now, rendered on every core
                    ahead = engine.units_ahead(state, gen)
                    if first_audio is None or in_hand() < playback_margin_s:
                        audio.push(new_codes, wait=True, ahead=ahead)
                        yield from hand_out(audio.ready())
                    else:
                        audio.push(new_codes, ahead=ahead)
                if bool(step.speech_ended[0]):
                    yield SpeechEnd()
            if cancel is not None and cancel.is_set():
                reason = "cancelled"
                break
    except BaseException:  # an error, or the consumer stopped early: stop the detokenizer's thread
        if audio is not None:
            audio.close()
        raise
    hit_limit = len(state.tokens) >= gen.max_new_tokens and int(state.tokens[-1][0]) not in gen.eos_ids
    if reason != "cancelled" and hit_limit:
        reason = "length"
    if audio is not None:
        yield from hand_out(chunk for chunk in audio.finish() if chunk.size)
    ids = tuple(int(t[0]) for t in state.tokens)
    text = tokenizer.decode(ids) if tokenizer is not None else ""
    usage = Usage(int(prompt.input_ids.shape[1]), len(ids), len(state.speech[0]), state.timings["prefill_s"],
                  first_text, first_audio, time.perf_counter() - t0, prefill.cached if prefill else 0)
    yield TurnEnd(text, ids, tuple(codes), reason, usage, np.concatenate(chunks) if chunks else None)
