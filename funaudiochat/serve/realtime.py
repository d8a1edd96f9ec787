"""The realtime voice protocol on `GET /v1/realtime`: OpenAI Realtime events over a WebSocket.

One `RealtimeSession` per connection holds the session settings, the input audio buffer, the conversation and
at most one running response. It is independent of the web framework: the framework glue feeds it text and binary
frames (`on_text`, `on_binary`), drains `outbox` to the socket and calls `close()` when the socket ends.

Client events: session.update (instructions, voice, tools, tool_choice, modalities / output_modalities,
turn_detection {type: server_vad, threshold, silence_duration_ms, prefix_padding_ms, create_response,
interrupt_response} or null for push-to-talk, input_audio_transcription, temperature, max_response_output_tokens;
the GA nested `audio.input.turn_detection` / `audio.output.voice` are read too), input_audio_buffer.append / commit /
clear, conversation.item.create (user text or audio, function_call_output), conversation.item.truncate,
conversation.item.delete, response.create (with per-response overrides), response.cancel.

Server events: session.created / updated, input_audio_buffer.speech_started / speech_stopped / committed / cleared,
conversation.item.added (beta: conversation.item.created), conversation.item.truncated / deleted,
conversation.item.input_audio_transcription.completed, response.created, response.output_item.added / done,
response.content_part.added / done, response.output_audio.delta / done, response.output_audio_transcript.delta /
done, response.output_text.delta / done, response.function_call_arguments.done, response.done (status completed,
cancelled, failed or incomplete), error. A client that connects with the `OpenAI-Beta: realtime=v1` header (or
the `openai-beta.realtime-v1` subprotocol) gets the beta names instead: response.audio.delta,
response.audio_transcript.delta, response.text.delta (and their .done).

Audio is base64 pcm16 mono 24 kHz both ways; the model hears 16 kHz (resampled here).

Barge-in (server VAD): speech that starts while an answer is being produced or played cancels the response (the
scheduler stops it at its next engine step) and truncates the assistant item to what the client can have played:
the audio sent, capped by the wall time since its first chunk went out (played in real time). A client that knows
better sends conversation.item.truncate with audio_end_ms. The kept text is the text the model had produced by the
engine step whose speech was the last heard (each speech token is 40 ms of audio; text and speech are produced
together, one text token per step, the speech `text_lead` steps after its text where the model has a text lead), so
the history holds what the user could have heard, to the model's own text-speech alignment.

Early answers (server VAD with create_response; `serve --early-answer-ms`, default EARLY_ANSWER_MS, 0 turns them
off): a turn ends that far into the silence that ends it (the committed audio stops there, wherever the VAD decides;
the rest of the silence carries nothing). As soon as that much silence is heard, the answer is started on the audio
so far while the VAD waits out `silence_duration_ms`; its events are held until the turn ends, and it is dropped if
the user speaks on or anything else changes the prompt. So the prefill (encoding, the word reader, the LLM) runs
during the silence, and the answer starts streaming when the VAD commits, exactly as the same audio committed without
it would (`/metrics`: early answers used and dropped).

Each answer's request names the conversation (the session id), so the scheduler reuses the keys and values of its
last completed turn and prefills only the new part (docs/serve.md, "Conversation cache"); closing the socket drops
them. When the conversation no longer fits the model's context, the oldest user turns are left out of the prompt at
once, down to the newest half (the client's items stay), so the prompt is prefilled whole once per trim, not every
turn; past 200 items the oldest are dropped at once down to 100, for the same reason.

Bad input never ends the session: each bad event gets an `error` event (with the client's event_id) and the
session goes on. A client that does not read (the bounded outbox overflows) is disconnected and its response
cancelled.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass, fields

import numpy as np

from funaudiochat.audio.io import resample
from funaudiochat.engine.events import AudioChunk, SpeechGroup, TextDelta, TurnEnd
from funaudiochat.errors import ContextLengthError, FunAudioChatError, InputError
from funaudiochat.serve.realtime_state import (MAX_BUFFER_S, MIN_COMMIT_MS, RATE, Item, RealtimeError,
                                               SessionConfig, conversation_messages, decode_pcm16, encode_pcm16,
                                               heard_text, new_id, number, parse_max_tokens, parse_modalities,
                                               parse_tools, parse_turn_detection)
from funaudiochat.serve.scheduler import Request, Scheduler, ServerBusyError
from funaudiochat.serve.ws_pump import pump
from funaudiochat.text.chat import ASR_INSTRUCTION, user_content

log = logging.getLogger(__name__)

MODEL_RATE = 16000  # what the model hears
MAX_EVENT_BYTES = 16 * 1024 * 1024  # one client event (OpenAI's limit is 15 MiB of audio per append)
MAX_ITEMS = 200  # conversation items kept; past it, the oldest are dropped at once down to half
OUTBOX_SIZE = 1024  # server events waiting for a slow client before it is disconnected
AUDIO_DELTA_SAMPLES = RATE // 5  # audio deltas of at most 200 ms
EARLY_ANSWER_MS = 200  # trailing silence a VAD turn keeps; an answer starts once it is heard (see above)

BETA_NAMES = {
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
}


# ---------------------------------------------------------------------------------------------- one response
@dataclass
class Response:
    id: str
    item: Item
    modalities: tuple[str, ...]
    task: asyncio.Task | None = None
    engine: object = None  # the scheduler's session, once admitted
    status: str = "in_progress"
    truncate_ms: int | None = None  # barge-in: the audio the client can have played
    error_code: str = "response_failed"
    error_type: str = "server_error"  # "invalid_request_error": the request was refused (e.g. audio it cannot hear)
    audio_samples_sent: int = 0
    first_audio_at: float | None = None  # monotonic time of the first audio delta sent

    def played_ms(self) -> int:
        """What the client can have played: the audio sent, capped by real time since the first chunk."""
        if self.first_audio_at is None:
            return 0
        elapsed = (time.monotonic() - self.first_audio_at) * 1000
        return int(min(self.audio_samples_sent * 1000 / RATE, elapsed))


@dataclass
class EarlyAnswer:
    """An answer started during the silence that may end the user's turn (see the module docstring)."""
    item: Item            # the user turn it answers, not in the conversation yet
    cut: int              # stream sample where that turn's audio ends
    request: Request
    task: asyncio.Task    # -> the scheduler's session

    def drop(self, tasks: set) -> None:
        """Stop it (the scheduler frees its row at the next step) and let its events go unread."""
        if not self.task.done():
            self.task.cancel()
        elif not self.task.cancelled() and self.task.exception() is None:
            session = self.task.result()
            session.cancel()
            drain = asyncio.create_task(_drain(session))
            tasks.add(drain)
            drain.add_done_callback(tasks.discard)


async def _drain(session) -> None:
    async for _ in session:
        pass


def _same_request(a: Request, b: Request) -> bool:
    """Whether two answers' requests ask the same (audios compared by content, a voice's x-vector by identity)."""
    for f in fields(Request):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if x is y:
            continue
        if f.name == "audios":
            if len(x) != len(y) or not all(u is v or np.array_equal(u, v) for u, v in zip(x, y)):
                return False
        elif f.name == "voice":
            if not (isinstance(x, str) and x == y):
                return False
        elif x != y:
            return False
    return True


# ---------------------------------------------------------------------------------------------- the session
class RealtimeSession:
    def __init__(self, scheduler: Scheduler, voices, beta: bool = False, can_speak: bool = True,
                 early_answer_ms: int = EARLY_ANSWER_MS):
        self.scheduler, self.beta = scheduler, beta
        self.early_answer_ms = early_answer_ms  # 0: VAD turns keep their whole silence and answers start at their end
        self.voices = voices  # funaudiochat.serve.voices.Voices: names() a client may pick, resolve(name)
        self.id = new_id("sess")
        # voice None: the server's default speaker (--speaker, else the detokenizer's default)
        self.config = SessionConfig(modalities=("text", "audio") if can_speak else ("text",))
        self.can_speak = can_speak
        self.outbox: asyncio.Queue = asyncio.Queue(OUTBOX_SIZE)
        self.closed = asyncio.Event()  # set when the session must end (slow client, close())
        self.items: list[Item] = []
        self.context_from: str | None = None  # the first item the prompt holds, once the context was full
        self.response: Response | None = None
        self.played: Response | None = None  # the last answer whose audio was sent
        self.tasks: set[asyncio.Task] = set()  # transcriptions
        # input audio: the buffer holds samples from absolute stream sample `buffer_start` on
        self.buffer: list[np.ndarray] = []
        self.buffer_len = 0
        self.buffer_start = 0
        self.stream_samples = 0  # samples appended since the session began
        self.vad = None
        self.speech_item_id: str | None = None
        self.speech_start_sample = 0
        self.early: EarlyAnswer | None = None  # an answer started before the end of the user's turn
        self._reset_vad()

    # ------------------------------------------------------------------ output
    def emit(self, event: dict) -> None:
        if self.closed.is_set():
            return
        event = {"event_id": new_id("event"), **event}
        if self.beta and event["type"] in BETA_NAMES:
            event["type"] = BETA_NAMES[event["type"]]
        try:
            self.outbox.put_nowait(event)
        except asyncio.QueueFull:
            log.warning("realtime session %s: the client does not read its events; disconnecting", self.id)
            self.closed.set()
            self._cancel_response()

    def emit_error(self, message: str, code: str = "invalid_event", param: str | None = None,
                   event_id: str | None = None, kind: str = "invalid_request_error") -> None:
        self.emit({"type": "error", "error": {"type": kind, "code": code, "message": message, "param": param,
                                               "event_id": event_id}})

    def start(self) -> None:
        self.emit({"type": "session.created", "session": self.config.as_dict(self.id)})

    # ------------------------------------------------------------------ input
    async def on_text(self, raw: str) -> None:
        event_id = None
        try:
            if len(raw) > MAX_EVENT_BYTES:
                raise RealtimeError(f"event is {len(raw)} bytes, more than the {MAX_EVENT_BYTES} allowed",
                                    "event_too_large")
            try:
                event = json.loads(raw)
            except ValueError as err:
                raise RealtimeError(f"event is not valid JSON ({err})", "invalid_json") from None
            if not isinstance(event, dict):
                raise RealtimeError("event must be a JSON object with a \"type\"", "invalid_event")
            event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
            kind = event.get("type")
            handler = self.HANDLERS.get(kind) if isinstance(kind, str) else None
            if handler is None:
                raise RealtimeError(f"unknown event type {kind!r}", "unknown_event_type", "type")
            if kind != "input_audio_buffer.append":  # (it may change what the early answer was asked)
                self._drop_early()
            await handler(self, event)
        except RealtimeError as err:
            self.emit_error(str(err), err.code, err.param, event_id)
        except FunAudioChatError as err:
            self.emit_error(str(err), "invalid_value", None, event_id)

    async def on_binary(self, data: bytes) -> None:
        self.emit_error(f"binary frames are not accepted ({len(data)} bytes); send JSON events as text frames, "
                        "audio as base64 in input_audio_buffer.append", "binary_not_supported")

    async def close(self) -> None:
        self.closed.set()
        self._drop_early()
        tasks = list(self.tasks) + ([self.response.task] if self.response and self.response.task else [])
        for task in tasks:  # the scheduler frees their batch rows at its next step
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # (after the answer's cancellation: a cancelled turn commits nothing, so the entry stays dropped)
        self.scheduler.forget_conversation(self.id)

    # ------------------------------------------------------------------ session.update
    async def on_session_update(self, event: dict) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            raise RealtimeError("session.update needs a \"session\" object", "invalid_value", "session")
        cfg = self.config
        new = SessionConfig(**cfg.__dict__)
        audio = session.get("audio") if isinstance(session.get("audio"), dict) else {}
        audio_in = audio.get("input") if isinstance(audio.get("input"), dict) else {}
        audio_out = audio.get("output") if isinstance(audio.get("output"), dict) else {}
        if "instructions" in session:
            if session["instructions"] is not None and not isinstance(session["instructions"], str):
                raise RealtimeError("instructions must be a string", "invalid_value", "instructions")
            new.instructions = session["instructions"] or None
        voice = session.get("voice", audio_out.get("voice"))
        if voice is not None:
            if voice not in self.voices.names():
                raise RealtimeError(f"unknown voice {voice!r}; available: {', '.join(self.voices.names()) or 'none'}",
                                    "invalid_value", "voice")
            new.voice = voice
        for key in ("modalities", "output_modalities"):
            if key in session:
                new.modalities = parse_modalities(session[key], key)
        if "audio" in new.modalities and not self.can_speak:
            raise RealtimeError("this server has no detokenizer: only [\"text\"] answers are possible",
                                "invalid_value", "modalities")
        for fmt_key in ("input_audio_format", "output_audio_format"):
            if fmt_key in session and session[fmt_key] != "pcm16":
                raise RealtimeError(f"{fmt_key} must be \"pcm16\" (mono, 24 kHz)", "invalid_value", fmt_key)
        for fmt in (audio_in.get("format"), audio_out.get("format")):
            if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "audio/pcm"
                                    or fmt.get("rate", RATE) != RATE):
                raise RealtimeError("audio format must be {\"type\": \"audio/pcm\", \"rate\": 24000}",
                                    "invalid_value", "audio.format")
        if "turn_detection" in session or "turn_detection" in audio_in:
            new.turn_detection = parse_turn_detection(session.get("turn_detection", audio_in.get("turn_detection")))
        if "tools" in session:
            new.tools = parse_tools(session["tools"])
        if "tool_choice" in session:
            if session["tool_choice"] not in ("auto", "none", "required"):
                raise RealtimeError("tool_choice must be \"auto\", \"none\" or \"required\"", "invalid_value",
                                    "tool_choice")
            new.tool_choice = session["tool_choice"]
        if "temperature" in session:
            new.temperature = number(session["temperature"], "temperature", 0.0, 2.0)
        for key in ("max_response_output_tokens", "max_output_tokens"):
            if key in session:
                new.max_output_tokens = parse_max_tokens(session[key], key)
        transcription = session.get("input_audio_transcription", audio_in.get("transcription", ...))
        if transcription is not ...:
            if transcription is not None and not isinstance(transcription, dict):
                raise RealtimeError("input_audio_transcription must be an object or null", "invalid_value",
                                    "input_audio_transcription")
            new.transcribe_input = transcription is not None
        vad_changed = (new.turn_detection is None) != (cfg.turn_detection is None) or (
            new.turn_detection and cfg.turn_detection and new.turn_detection.__dict__ != cfg.turn_detection.__dict__)
        self.config = new
        if vad_changed:
            self._reset_vad()
        self.emit({"type": "session.updated", "session": new.as_dict(self.id)})

    # ------------------------------------------------------------------ input audio buffer
    def _reset_vad(self) -> None:
        from funaudiochat.audio.vad import StreamingVad

        td = self.config.turn_detection
        self.vad = None if td is None else StreamingVad(RATE, threshold=td.threshold,
                                                        min_silence_ms=td.silence_duration_ms)
        self.vad_origin = self.stream_samples  # stream sample where the VAD's clock starts
        self.speech_item_id = None
        self._drop_early()

    def _clear_buffer(self) -> None:
        self.buffer, self.buffer_len, self.buffer_start = [], 0, self.stream_samples

    def _buffer_audio(self, start: int | None = None) -> np.ndarray:
        audio = np.concatenate(self.buffer) if self.buffer else np.zeros(0, np.float32)
        return audio[max(0, (start or self.buffer_start) - self.buffer_start):]

    async def on_append(self, event: dict) -> None:
        samples = decode_pcm16(event.get("audio"))
        if self.buffer_len + samples.shape[0] > MAX_BUFFER_S * RATE:
            raise RealtimeError(f"the input audio buffer is full ({MAX_BUFFER_S:.0f} s); commit or clear it",
                                "input_audio_buffer_full")
        self.buffer.append(samples)
        self.buffer_len += samples.shape[0]
        self.stream_samples += samples.shape[0]
        if self.vad is None:
            return
        for vad_event in self.vad.push(samples):
            at = self.vad_origin + int(round(vad_event.time_s * RATE))
            if vad_event.kind == "speech_start":
                self._on_speech_start(at)
            else:
                await self._on_speech_end(at)
        self._answer_early()
        if not self.vad.in_speech:  # keep only the prefix padding while nobody speaks
            keep = int(self.config.turn_detection.prefix_padding_ms * RATE / 1000) + RATE // 2
            if self.buffer_len > 4 * keep:
                audio = self._buffer_audio()[-keep:]
                self.buffer, self.buffer_len, self.buffer_start = [audio], keep, self.stream_samples - keep

    def _on_speech_start(self, at: int) -> None:
        self.speech_item_id = new_id("item")
        self.speech_start_sample = at
        self.emit({"type": "input_audio_buffer.speech_started", "audio_start_ms": at * 1000 // RATE,
                   "item_id": self.speech_item_id})
        if not self.config.turn_detection.interrupt_response:
            return
        if self.response is not None:
            self._barge_in(self.response)
        elif self.played is not None:  # the answer is complete but may still be playing
            heard = self.played.played_ms()
            if heard < self.played.item.audio_ms and self.played.item in self.items:
                self._truncate(self.played.item, heard)
            self.played = None

    async def _on_speech_end(self, at: int) -> None:
        item_id = self.speech_item_id or new_id("item")
        self.speech_item_id = None
        self.emit({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": at * 1000 // RATE,
                   "item_id": item_id})
        cut = self._turn_cut(at)
        early, self.early = self.early, None
        if early is not None and (early.cut != cut or early.item.id != item_id):
            self._discard(early)
            early = None
        # (an early answer's item holds the same samples, cut at the same sample)
        item = early.item if early is not None else Item(item_id, "user", audio=self._turn_audio(cut))
        self._clear_buffer()
        try:
            self._commit_item(item)
        except RealtimeError:
            if early is not None:
                self._discard(early)
            raise
        if self.config.turn_detection.create_response:
            old = self.response
            if old is not None:  # an answer to earlier speech is still running: the new turn replaces it
                self._cancel_response()
                await asyncio.gather(old.task, return_exceptions=True)
            self._start_response({}, early)

    def _turn_cut(self, speech_end: int) -> int:
        """The stream sample where a VAD turn whose speech ended at `speech_end` ends: `early_answer_ms` later (all
        the audio so far without early answers)."""
        if not self.early_answer_ms:
            return self.stream_samples
        return min(speech_end + self.early_answer_ms * RATE // 1000, self.stream_samples)

    def _turn_audio(self, cut: int) -> np.ndarray:
        """The VAD turn's audio at the model's rate: from its speech start less the prefix padding to `cut`."""
        start = self.speech_start_sample - int(self.config.turn_detection.prefix_padding_ms * RATE / 1000)
        audio = self._buffer_audio(start)  # (from the later of `start` and the buffer's first sample)
        return resample(audio[:max(0, cut - max(start, self.buffer_start))], RATE, MODEL_RATE)

    def _answer_early(self) -> None:
        """Start the answer to the turn that the current silence may end, once EARLY_ANSWER_MS of it is heard;
        drop a started one whose silence was broken."""
        td, vad = self.config.turn_detection, self.vad
        end_s = vad.pause_end_s
        end = None if end_s is None else self.vad_origin + int(round(end_s * RATE))
        if self.early is not None and (end is None or self._turn_cut(end) != self.early.cut):
            self._drop_early()  # the user spoke on
        if (self.early is not None or end is None or not td.create_response or self.response is not None
                or not 0 < self.early_answer_ms < td.silence_duration_ms
                or vad.heard_s < end_s + self.early_answer_ms / 1000
                or self.speech_item_id is None or self.closed.is_set()):
            return
        cut = self._turn_cut(end)
        item = Item(self.speech_item_id, "user", audio=self._turn_audio(cut))
        try:
            self.scheduler.check_hearing()
            request, _ = self._answer_request({}, self._prompt_items() + [item])
        except (InputError, RealtimeError):
            return  # (the turn's end says so, the usual way)
        task = asyncio.create_task(self.scheduler.submit(request))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # (a refusal is seen at the turn's end)
        self.early = EarlyAnswer(item, cut, request, task)

    def _drop_early(self) -> None:
        if self.early is not None:
            self._discard(self.early)
            self.early = None

    def _discard(self, early: EarlyAnswer) -> None:
        early.drop(self.tasks)
        self.scheduler.metrics.early_answers_dropped.inc()

    def _check_hearing(self) -> None:
        """Audio input on a checkpoint that cannot hear yet is refused before it enters the conversation (so the
        history stays usable for typed turns)."""
        try:
            self.scheduler.check_hearing()
        except InputError as err:
            raise RealtimeError(str(err), "audio_input_untrained") from None

    def _commit(self, audio: np.ndarray, item_id: str) -> Item:
        return self._commit_item(Item(item_id, "user", audio=resample(audio, RATE, MODEL_RATE)))

    def _commit_item(self, item: Item) -> Item:
        self._check_hearing()
        previous = self.items[-1].id if self.items else None
        self._add_item(item)
        self.emit({"type": "input_audio_buffer.committed", "previous_item_id": previous, "item_id": item.id})
        self._emit_item_created(item, previous)
        if self.config.transcribe_input:
            task = asyncio.create_task(self._transcribe(item))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return item

    async def on_commit(self, event: dict) -> None:
        if self.buffer_len < MIN_COMMIT_MS * RATE // 1000:
            raise RealtimeError(f"the input audio buffer holds {self.buffer_len * 1000 // RATE} ms; at least "
                                f"{MIN_COMMIT_MS} ms is needed to commit", "input_audio_buffer_commit_empty")
        audio = self._buffer_audio()
        self._clear_buffer()
        self._reset_vad()
        self._commit(audio, new_id("item"))

    async def on_clear(self, event: dict) -> None:
        self._clear_buffer()
        self._reset_vad()
        self.emit({"type": "input_audio_buffer.cleared"})

    # ------------------------------------------------------------------ conversation
    def _add_item(self, item: Item) -> None:
        self.items.append(item)
        if len(self.items) > MAX_ITEMS:  # at once, not one per turn: the prompt's start moves once per trim
            del self.items[:len(self.items) - MAX_ITEMS // 2]

    def _prompt_items(self) -> list[Item]:
        """The items the model sees: all of them, or those from `context_from` on once the context was full."""
        ids = [item.id for item in self.items]
        return self.items[ids.index(self.context_from):] if self.context_from in ids else self.items

    def _trim_context(self) -> bool:
        """The conversation no longer fits the model's context: leave the oldest user turns out of the prompt, down
        to the newest half of them, at once (the client's items stay). The prompt then starts at the same item until
        the next trim, so it is prefilled whole once and the conversation cache serves the turns after it.
        -> False when there is nothing left to leave out."""
        items = self._prompt_items()
        users = [i for i, item in enumerate(items) if item.role == "user" and item.type == "message"]
        if len(users) < 2:
            return False
        self.context_from = items[users[-(len(users) // 2)]].id
        log.info("realtime session %s: the conversation fills the context; the prompt now starts at item %s",
                 self.id, self.context_from)
        return True

    def _emit_item_created(self, item: Item, previous: str | None) -> None:
        kind = "conversation.item.created" if self.beta else "conversation.item.added"
        self.emit({"type": kind, "previous_item_id": previous, "item": item.as_dict()})

    def _find(self, item_id) -> Item:
        for item in self.items:
            if item.id == item_id:
                return item
        raise RealtimeError(f"no conversation item with id {item_id!r}", "item_not_found", "item_id")

    async def on_item_create(self, event: dict) -> None:
        spec = event.get("item")
        if not isinstance(spec, dict):
            raise RealtimeError("conversation.item.create needs an \"item\" object", "invalid_value", "item")
        kind = spec.get("type", "message")
        item_id = spec.get("id") if isinstance(spec.get("id"), str) else new_id("item")
        if kind == "function_call_output":
            if not isinstance(spec.get("call_id"), str) or not isinstance(spec.get("output"), str):
                raise RealtimeError("a function_call_output item needs a string call_id and output",
                                    "invalid_value", "item")
            item = Item(item_id, "user", "function_call_output", text=spec["output"], call_id=spec["call_id"])
        elif kind == "message":
            role = spec.get("role")
            if role not in ("user", "assistant", "system"):
                raise RealtimeError(f"item.role must be user, assistant or system, got {role!r}", "invalid_value",
                                    "item.role")
            content = spec.get("content")
            if not isinstance(content, list) or not content:
                raise RealtimeError("item.content must be a non-empty list of content parts", "invalid_value",
                                    "item.content")
            texts, audio = [], None
            for part in content:
                ptype = part.get("type") if isinstance(part, dict) else None
                if ptype in ("input_text", "text", "output_text") and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif ptype == "input_audio" and role == "user" and audio is None:
                    self._check_hearing()
                    audio = decode_pcm16(part.get("audio"))
                    if audio.shape[0] < MIN_COMMIT_MS * RATE // 1000:
                        raise RealtimeError(f"input_audio holds {audio.shape[0] * 1000 // RATE} ms; at least "
                                            f"{MIN_COMMIT_MS} ms is needed", "invalid_value", "item.content")
                    if audio.shape[0] > MAX_BUFFER_S * RATE:
                        raise RealtimeError(f"input_audio is longer than {MAX_BUFFER_S:.0f} s", "invalid_value",
                                            "item.content")
                else:
                    raise RealtimeError(f"unsupported content part {str(part)[:80]!r}", "invalid_value",
                                        "item.content")
            item = Item(item_id, role, text=" ".join(texts),
                        audio=None if audio is None else resample(audio, RATE, MODEL_RATE))
        else:
            raise RealtimeError(f"item.type {kind!r} is not supported; use message or function_call_output",
                                "invalid_value", "item.type")
        previous = self.items[-1].id if self.items else None
        self._add_item(item)
        self._emit_item_created(item, previous)

    async def on_item_truncate(self, event: dict) -> None:
        item = self._find(event.get("item_id"))
        if item.role != "assistant" or item.type != "message":
            raise RealtimeError("only assistant message items can be truncated", "invalid_value", "item_id")
        end_ms = event.get("audio_end_ms")
        if isinstance(end_ms, bool) or not isinstance(end_ms, int) or end_ms < 0:
            raise RealtimeError("audio_end_ms must be a non-negative integer", "invalid_value", "audio_end_ms")
        if end_ms > item.audio_ms:
            raise RealtimeError(f"audio_end_ms {end_ms} is past the item's {item.audio_ms} ms of audio",
                                "invalid_value", "audio_end_ms")
        self._truncate(item, end_ms)

    def _truncate(self, item: Item, end_ms: int) -> None:
        if item.marks:
            item.text, item.marks = heard_text(item.raw, item.marks, end_ms), []
        item.audio_ms = end_ms
        self.emit({"type": "conversation.item.truncated", "item_id": item.id, "content_index": 0,
                   "audio_end_ms": end_ms})

    async def on_item_delete(self, event: dict) -> None:
        item = self._find(event.get("item_id"))
        self.items.remove(item)
        self.emit({"type": "conversation.item.deleted", "item_id": item.id})

    # ------------------------------------------------------------------ responses
    async def on_response_create(self, event: dict) -> None:
        if self.response is not None:
            raise RealtimeError(f"a response ({self.response.id}) is already in progress; cancel it first",
                                "conversation_already_has_active_response")
        spec = event.get("response", {})
        if spec is None:
            spec = {}
        if not isinstance(spec, dict):
            raise RealtimeError("response must be an object", "invalid_value", "response")
        if not any(i.role == "user" for i in self.items) and not spec.get("instructions"):
            raise RealtimeError("there is nothing to answer yet: commit audio or create a user item first",
                                "conversation_empty")
        self._start_response(spec)

    async def on_response_cancel(self, event: dict) -> None:
        response = self.response
        wanted = event.get("response_id")
        if response is None or (wanted is not None and wanted != response.id):
            raise RealtimeError("there is no response in progress to cancel", "response_cancel_not_active")
        self._cancel_response()

    def _cancel_response(self) -> None:
        """Stop the running answer: the scheduler ends it at its next engine step (TurnEnd "cancelled")."""
        response = self.response
        if response is None or response.status == "cancelled" or response.task is None or response.task.done():
            return
        response.status = "cancelled"
        if response.engine is not None:
            response.engine.cancel()
        else:  # still waiting for a batch row
            response.task.cancel()

    def _barge_in(self, response: Response) -> None:
        """The user spoke over the answer: stop it and keep in the history only what was heard."""
        self._cancel_response()
        response.item.audio_ms = max(response.item.audio_ms, response.audio_samples_sent * 1000 // RATE)
        response.truncate_ms = response.played_ms() if "audio" in response.modalities else None

    def _start_response(self, spec: dict, early: EarlyAnswer | None = None) -> None:
        request, modalities = self._answer_request(spec, self._prompt_items())
        engine = None
        if early is not None and _same_request(early.request, request):
            engine = early.task  # the answer started during the silence: its events were held until now
            self.scheduler.metrics.early_answers.inc()
        elif early is not None:
            self._discard(early)
        item = Item(new_id("item"), "assistant", status="in_progress")
        response = Response(new_id("resp"), item, modalities if request.mode == "s2s" else ("text",))
        self.response = response
        response.task = asyncio.create_task(self._run_response(response, request, engine))

    def _answer_request(self, spec: dict, items: list[Item]) -> tuple[Request, tuple[str, ...]]:
        """The scheduler request answering `items` with the session's settings and `spec`'s overrides."""
        cfg = self.config
        modalities = cfg.modalities
        for key in ("modalities", "output_modalities"):
            if key in spec:
                modalities = parse_modalities(spec[key], key)
        if "audio" in modalities and not self.can_speak:
            raise RealtimeError("this server has no detokenizer: only [\"text\"] answers are possible",
                                "invalid_value", "modalities")
        voice = spec.get("voice", cfg.voice)
        if voice is not None and voice not in self.voices.names():
            raise RealtimeError(f"unknown voice {voice!r}", "invalid_value", "voice")
        instructions = spec.get("instructions", cfg.instructions)
        if instructions is not None and not isinstance(instructions, str):
            raise RealtimeError("instructions must be a string", "invalid_value", "instructions")
        tools = parse_tools(spec["tools"]) if "tools" in spec else cfg.tools
        tool_choice = spec.get("tool_choice", cfg.tool_choice)
        max_tokens = cfg.max_output_tokens
        for key in ("max_output_tokens", "max_response_output_tokens"):
            if key in spec:
                max_tokens = parse_max_tokens(spec[key], key)
        temperature = number(spec["temperature"], "temperature", 0.0, 2.0) if "temperature" in spec \
            else cfg.temperature
        use_tools = tools if tools and tool_choice != "none" else None
        msgs, audios = conversation_messages(items, None)
        generation = {"max_new_tokens": max_tokens, "temperature": temperature}
        request = Request(msgs, audios, "s2s" if "audio" in modalities and not use_tools else "s2t",
                          system=instructions, tools=use_tools,
                          voice=self.voices.resolve(voice) if voice is not None else None,
                          generation={k: v for k, v in generation.items() if v is not None},
                          conversation=self.id)  # its last completed turn's keys and values are reused
        return request, modalities

    async def _run_response(self, response: Response, request: Request, early: asyncio.Task | None = None) -> None:
        item, audio_out = response.item, "audio" in response.modalities
        base = {"response_id": response.id, "item_id": item.id, "output_index": 0, "content_index": 0}
        self.emit({"type": "response.created", "response": self._response_dict(response)})
        previous = self.items[-1].id if self.items else None
        self.emit({"type": "response.output_item.added", "response_id": response.id, "output_index": 0,
                   "item": item.as_dict()})
        self._emit_item_created(item, previous)
        part_type = "audio" if audio_out else "text"
        self.emit({"type": "response.content_part.added", **base, "part": {"type": part_type}})
        self._add_item(item)
        text_kind = "response.output_audio_transcript.delta" if audio_out else "response.output_text.delta"
        text, usage, reason, error = "", None, "stop", None
        hidden = False  # a tool call is being written: its text is not streamed as an answer
        pending = np.zeros(0, np.float32)
        codes = 0  # speech tokens produced so far
        try:
            if early is not None:
                try:
                    response.engine = await early
                except (ServerBusyError, ContextLengthError):  # the early start was refused: ask the usual way
                    pass
            if response.engine is None:
                response.engine = await self._submit(request)
            if response.status == "cancelled":  # cancelled while waiting for a row
                response.engine.cancel()
            async for event in response.engine:
                if response.status == "cancelled" and not isinstance(event, TurnEnd):
                    continue  # the client stopped listening: wait for the engine's TurnEnd only
                if isinstance(event, SpeechGroup):
                    codes += len(event.codes)
                elif isinstance(event, TextDelta):
                    text += event.text
                    # with a text lead the text of a step is said `text_lead` groups later: its mark counts those
                    ahead = self.scheduler.speech_trails_text(response.engine)
                    item.marks.append((codes + ahead, len(text)))
                    if request.tools and "<tool_call>" in text:
                        hidden = True
                    if not hidden:
                        self.emit({"type": text_kind, **base, "delta": event.text})
                elif isinstance(event, AudioChunk) and audio_out:
                    samples = event.samples if event.sample_rate == RATE else resample(event.samples,
                                                                                       event.sample_rate, RATE)
                    pending = np.concatenate([pending, samples])
                    while pending.shape[0] >= AUDIO_DELTA_SAMPLES:
                        self._send_audio(response, base, pending[:AUDIO_DELTA_SAMPLES])
                        pending = pending[AUDIO_DELTA_SAMPLES:]
                elif isinstance(event, TurnEnd):
                    usage, reason = event.usage, event.finish_reason
        except asyncio.CancelledError:
            reason = "cancelled"
            if self.closed.is_set():
                raise
        except ServerBusyError as err:
            reason, error = "failed", f"{err} (retry in {err.retry_after} s)"
            response.error_code = "server_busy"
        except InputError as err:  # refused before it ran: a prompt that does not fit, audio it cannot hear
            reason, error = "failed", str(err)
            response.error_code, response.error_type = "invalid_request", "invalid_request_error"
        except FunAudioChatError as err:  # an engine failure
            reason, error = "failed", str(err)
        except Exception as err:  # noqa: BLE001 - a failed answer must not take the session down
            log.exception("realtime response %s failed", response.id)
            reason, error = "failed", f"the answer failed: {type(err).__name__}: {err}"
        if pending.size and response.status != "cancelled":
            self._send_audio(response, base, pending)
        try:
            self._finish(response, request, base, text, reason, error, usage)
        except Exception:  # noqa: BLE001 - the session must stay usable
            log.exception("realtime response %s: finishing failed", response.id)
            if self.response is response:
                self.response = None
            self.emit_error("the answer failed while it was being finished", "response_failed", kind="server_error")

    async def _submit(self, request: Request):
        """The scheduler's session for this answer; a conversation too long for the context is trimmed (see
        `_trim_context`) until it fits, or the ContextLengthError of its newest turn alone goes to the client."""
        while True:
            try:
                return await self.scheduler.submit(request)
            except ContextLengthError:
                if not self._trim_context():
                    raise
                request.messages, request.audios = conversation_messages(self._prompt_items(), None)

    def _send_audio(self, response: Response, base: dict, samples: np.ndarray) -> None:
        if response.first_audio_at is None:
            response.first_audio_at = time.monotonic()
            self.played = response
        response.audio_samples_sent += samples.shape[0]
        response.item.audio_ms = response.audio_samples_sent * 1000 // RATE
        self.emit({"type": "response.output_audio.delta", **base, "delta": encode_pcm16(samples)})

    def _finish(self, response: Response, request: Request, base: dict, text: str, reason: str,
                error: str | None, usage) -> None:
        item, audio_out = response.item, "audio" in response.modalities
        calls = []
        if request.tools and reason != "cancelled":
            from funaudiochat.text.tools import parse_tool_calls

            parsed = parse_tool_calls(text)
            calls, text = parsed.calls, parsed.text
        item.raw, item.text = text, text.strip()
        status = {"stop": "completed", "cancelled": "cancelled", "length": "incomplete"}.get(reason, "failed")
        if response.status == "cancelled":
            status = "cancelled"
        item.status = "completed" if status == "completed" else "incomplete"
        if response.truncate_ms is not None:  # barge-in: keep what was heard
            self._truncate(item, min(response.truncate_ms, item.audio_ms))
        if audio_out:
            self.emit({"type": "response.output_audio.done", **base})
            self.emit({"type": "response.output_audio_transcript.done", **base, "transcript": item.text})
        else:
            self.emit({"type": "response.output_text.done", **base, "text": item.text})
        part = {"type": "audio", "transcript": item.text} if audio_out else {"type": "text", "text": item.text}
        self.emit({"type": "response.content_part.done", **base, "part": part})
        self.emit({"type": "response.output_item.done", "response_id": response.id, "output_index": 0,
                   "item": item.as_dict()})
        outputs = [item]
        for i, call in enumerate(calls, start=1):
            call_item = Item(new_id("item"), "assistant", "function_call", call_id=new_id("call"), name=call.name,
                             arguments=json.dumps(call.arguments, ensure_ascii=False))
            self._add_item(call_item)
            outputs.append(call_item)
            self.emit({"type": "response.output_item.added", "response_id": response.id, "output_index": i,
                       "item": call_item.as_dict()})
            self.emit({"type": "response.function_call_arguments.done", "response_id": response.id,
                       "item_id": call_item.id, "output_index": i, "call_id": call_item.call_id,
                       "name": call.name, "arguments": call_item.arguments})
            self.emit({"type": "response.output_item.done", "response_id": response.id, "output_index": i,
                       "item": call_item.as_dict()})
        if not item.text and not item.audio_ms and item in self.items and (calls or status != "completed"):
            self.items.remove(item)  # nothing was said: keep the history clean
        response.status = status
        details = {"type": status}
        if status == "cancelled":
            details["reason"] = "turn_detected" if response.truncate_ms is not None else "client_cancelled"
        elif status == "incomplete":
            details["reason"] = "max_output_tokens"
        elif status == "failed":
            details["error"] = {"type": response.error_type, "code": response.error_code,
                                "message": error or "the answer failed"}
            self.emit_error(error or "the answer failed", response.error_code, kind=response.error_type)
        body = self._response_dict(response, [o.as_dict() for o in outputs], details)
        if usage is not None:
            body["usage"] = {"input_tokens": usage.prompt_tokens,
                             "output_tokens": usage.text_tokens + usage.speech_tokens,
                             "total_tokens": usage.prompt_tokens + usage.text_tokens + usage.speech_tokens,
                             "input_token_details": {"cached_tokens": usage.cached_tokens},
                             "output_token_details": {"text_tokens": usage.text_tokens,
                                                      "audio_tokens": usage.speech_tokens}}
        if self.response is response:
            self.response = None
        self.emit({"type": "response.done", "response": body})

    def _response_dict(self, response: Response, output=None, details=None) -> dict:
        return {"id": response.id, "object": "realtime.response", "status": response.status,
                "status_details": details, "output": output or [], "modalities": list(response.modalities),
                "output_modalities": list(response.modalities), "usage": None}

    # ------------------------------------------------------------------ input transcription
    async def _transcribe(self, item: Item) -> None:
        """The user's words for the page: the model's ASR task on the committed audio."""
        request = Request([{"role": "user", "content": user_content(1, ASR_INSTRUCTION)}], [item.audio], "s2t",
                          generation={"max_new_tokens": 128})
        text = ""
        try:
            async for event in await self.scheduler.submit(request):
                if isinstance(event, TurnEnd):
                    text = event.text.strip()
        except FunAudioChatError as err:
            self.emit({"type": "conversation.item.input_audio_transcription.failed", "item_id": item.id,
                       "content_index": 0, "error": {"type": "transcription_error", "message": str(err)}})
            return
        self.emit({"type": "conversation.item.input_audio_transcription.completed", "item_id": item.id,
                   "content_index": 0, "transcript": text})

    HANDLERS = {
        "session.update": on_session_update,
        "input_audio_buffer.append": on_append,
        "input_audio_buffer.commit": on_commit,
        "input_audio_buffer.clear": on_clear,
        "conversation.item.create": on_item_create,
        "conversation.item.truncate": on_item_truncate,
        "conversation.item.delete": on_item_delete,
        "response.create": on_response_create,
        "response.cancel": on_response_cancel,
    }


def wants_beta(headers, subprotocols) -> bool:
    """OpenAI's beta clients say so in a header or a WebSocket subprotocol."""
    beta = (headers.get("openai-beta") or "").lower()
    return "realtime=v1" in beta or any(p.lower() == "openai-beta.realtime-v1" for p in subprotocols or ())


# ---------------------------------------------------------------------------------------------- the WebSocket
async def serve_realtime(websocket, scheduler: Scheduler, voices, can_speak: bool, api_key: str | None = None,
                         early_answer_ms: int = EARLY_ANSWER_MS) -> None:
    """One realtime connection, from handshake to close (Starlette WebSocket)."""
    offered = [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    key = next((p[len("openai-insecure-api-key."):] for p in offered if p.startswith("openai-insecure-api-key.")),
               None)
    auth = websocket.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        key = auth[7:].strip()
    await websocket.accept(subprotocol="realtime" if "realtime" in offered else None)
    if api_key and not hmac.compare_digest((key or "").encode(), api_key.encode()):
        message = "missing or wrong API key: send 'Authorization: Bearer KEY'"
        await websocket.send_text(json.dumps({"type": "error", "event_id": new_id("event"), "error": {
            "type": "invalid_request_error", "code": "invalid_api_key", "message": message, "param": None}}))
        await websocket.close(code=1008, reason="invalid API key")
        return
    session = RealtimeSession(scheduler, voices, wants_beta(websocket.headers, offered), can_speak, early_answer_ms)
    session.start()
    await pump(websocket, session, lambda event: websocket.send_text(json.dumps(event, ensure_ascii=False)))


def routes(ctx) -> list:
    """`/v1/realtime` for the server's app (funaudiochat.serve.app.ROUTE_MODULES)."""
    from starlette.routing import WebSocketRoute

    async def realtime(websocket):
        await serve_realtime(websocket, ctx.scheduler, ctx.voices, ctx.can_speak, ctx.api_key, ctx.early_answer_ms)

    return [WebSocketRoute("/v1/realtime", realtime)]
