"""The released web demo's protocol on `GET /api/chat` (SPEC §10.2), so the released client works unchanged.

Every WebSocket message is binary: one kind byte, then the payload.

    0x00 HANDSHAKE  [version, model]; the server sends 00 00 00 on connect
    0x01 AUDIO      Ogg/Opus at 24 kHz, mono (client: the recorder's stream; server: the spoken answer)
    0x02 TEXT       UTF-8, server -> client: "[Processing...]" when an answer starts, then the answer's text as it
                    is produced, and "\n[Final: ...]" when the cleaned text differs from what was streamed
    0x03 CONTROL    one byte: 0 start, 1 endTurn, 2 pause, 3 restart
    0x04 METADATA   UTF-8 JSON; {"system_prompt": "..."} replaces the session's system prompt
    0x05 ERROR      UTF-8, server -> client
    0x06 PING       empty

Turns (push-to-talk, as released): `start` stops a running answer, clears the recording and opens a new Opus
stream; audio is decoded and recorded until `pause` or `endTurn`, which resample the recording to 16 kHz, add it
to the history as a user turn (at most 8 turns are kept) and answer it: text and speech through the scheduler,
speech encoded to Ogg/Opus as it comes (one Ogg stream for the whole connection). The assistant's turn enters the
history as its cleaned text. `restart` stops a running answer and forgets the history.
As released, a malformed message falls back to the legacy meaning of its kind byte (1 audio, 2 pause, 3 start);
anything else gets an ERROR message and the connection goes on.
"""
from __future__ import annotations

import asyncio
import enum
import itertools
import json
import logging

import numpy as np

from funaudiochat.audio.io import resample
from funaudiochat.engine.events import AudioChunk, TextDelta, TurnEnd
from funaudiochat.engine.presets import default_system
from funaudiochat.errors import FunAudioChatError, ProtocolError
from funaudiochat.serve.opus import OPUS_RATE, OpusDecoder, OpusEncoder
from funaudiochat.serve.scheduler import Request, Scheduler
from funaudiochat.serve.ws_pump import pump
from funaudiochat.text.chat import user_content

log = logging.getLogger(__name__)

MAX_TURNS = 8  # user turns kept (released MAX_HISTORY_TURNS)
MAX_RECORDING_S = 300.0  # one spoken turn
MAX_NEW_TOKENS = 512  # the released server's generation limit
OUTBOX_SIZE = 1024
_CONVERSATIONS = itertools.count(1)
_SPECIAL_EDGES = ("<|audio_bos|>", "<|sil|>", "<|audio_eos|>", "<|im_end|>")


class Kind(enum.IntEnum):
    HANDSHAKE = 0
    AUDIO = 1
    TEXT = 2
    CONTROL = 3
    METADATA = 4
    ERROR = 5
    PING = 6
    COLOREDTEXT = 7


class Control(enum.IntEnum):
    START = 0
    END_TURN = 1
    PAUSE = 2
    RESTART = 3


def clean_text(text: str) -> str:
    """Strip the special tokens the released server strips from the ends of an answer."""
    text = text.strip()
    changed = True
    while changed:
        changed = False
        for tag in _SPECIAL_EDGES:
            if text.startswith(tag):
                text, changed = text[len(tag):].lstrip(), True
            if text.endswith(tag):
                text, changed = text[: -len(tag)].rstrip(), True
    return text


def parse_message(data: bytes) -> tuple[str, object]:
    """A client message -> (action, payload): ("audio", bytes), ("control", Control), ("metadata", dict),
    ("ping", None). Malformed messages fall back to the legacy kinds; otherwise ProtocolError."""
    if not data:
        raise ProtocolError("empty message: each message starts with a kind byte")
    kind, payload = data[0], data[1:]
    if kind == Kind.AUDIO:
        return "audio", payload
    if kind == Kind.CONTROL:
        if len(payload) == 1 and payload[0] in iter(Control):
            return "control", Control(payload[0])
        if not payload:
            return "control", Control.START  # legacy: kind 3 is start
        raise ProtocolError(f"control message must be one byte 0-3, got {payload[:8].hex()}")
    if kind == Kind.TEXT:
        return "control", Control.PAUSE  # legacy: kind 2 is pause (the client never sends text)
    if kind == Kind.METADATA:
        try:
            meta = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise ProtocolError(f"metadata must be UTF-8 JSON ({err})") from None
        if not isinstance(meta, dict):
            raise ProtocolError("metadata must be a JSON object")
        prompt = meta.get("system_prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise ProtocolError("metadata system_prompt must be a string")
        return "metadata", meta
    if kind in (Kind.PING, Kind.HANDSHAKE):
        return "ping", None
    raise ProtocolError(f"unknown message kind {kind}; expected 1 audio, 3 control, 4 metadata or 6 ping")


def message(kind: Kind, payload: bytes | str = b"") -> bytes:
    return bytes([kind]) + (payload.encode("utf-8") if isinstance(payload, str) else payload)


class ApiChatSession:
    """One /api/chat connection: recording, history and at most one answer in flight."""

    def __init__(self, scheduler: Scheduler, voice=None):
        self.scheduler, self.voice = scheduler, voice
        self.system_prompt = default_system("s2s", scheduler.engine.cfg)
        self.outbox: asyncio.Queue = asyncio.Queue(OUTBOX_SIZE)
        self.closed = asyncio.Event()
        self.history: list[dict] = []  # {"role", "content", "audio"?}
        self.recording = False
        self.decoder: OpusDecoder | None = None
        self.pcm: list[np.ndarray] = []
        self.pcm_len = 0
        self.answer: asyncio.Task | None = None
        self.conversation = f"api_chat_{next(_CONVERSATIONS)}"  # names its cached keys and values in the scheduler
        # one Ogg/Opus stream per connection, as the client's decoder opens it once
        self.encoder = OpusEncoder()

    def send(self, kind: Kind, payload: bytes | str = b"") -> None:
        if self.closed.is_set():
            return
        try:
            self.outbox.put_nowait(message(kind, payload))
        except asyncio.QueueFull:
            log.warning("/api/chat: the client does not read; disconnecting")
            self.closed.set()

    def error(self, text: str) -> None:
        self.send(Kind.ERROR, text)

    def start(self) -> None:
        self.send(Kind.HANDSHAKE, bytes([0, 0]))

    async def on_binary(self, data: bytes) -> None:
        try:
            action, payload = parse_message(data)
            if action == "audio":
                self._audio(payload)
            elif action == "control":
                await self._control(payload)
            elif action == "metadata":
                if payload.get("system_prompt") is not None:
                    self.system_prompt = payload["system_prompt"] or default_system("s2s", self.scheduler.engine.cfg)
        except FunAudioChatError as err:
            self.error(str(err))

    async def on_text(self, text: str) -> None:
        self.error("this endpoint speaks the binary protocol: send binary messages (a kind byte, then the payload)")

    def _audio(self, data: bytes) -> None:
        if not self.recording:
            return  # as released: audio outside start .. pause is not recorded
        pcm = self.decoder.push(data)
        if self.pcm_len + pcm.shape[0] > MAX_RECORDING_S * OPUS_RATE:
            self.recording = False
            raise ProtocolError(f"the recording is longer than {MAX_RECORDING_S:.0f} s; it was stopped, send "
                                "pause to have it answered or start to discard it")
        self.pcm.append(pcm)
        self.pcm_len += pcm.shape[0]

    async def _stop_answer(self) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.cancel()  # the scheduler frees the batch row at its next step
            await asyncio.gather(self.answer, return_exceptions=True)
        self.answer = None

    async def _control(self, control: Control) -> None:
        if control == Control.START:
            await self._stop_answer()
            self.decoder, self.pcm, self.pcm_len, self.recording = OpusDecoder(), [], 0, True
        elif control in (Control.PAUSE, Control.END_TURN):
            if not self.recording:
                raise ProtocolError("pause/endTurn without start: send control start (0) before the audio")
            self.recording = False
            audio = np.concatenate(self.pcm) if self.pcm else np.zeros(0, np.float32)
            self.pcm, self.pcm_len = [], 0
            if audio.shape[0] < OPUS_RATE // 10:
                raise ProtocolError(f"the recording holds {audio.shape[0] * 1000 // OPUS_RATE} ms of audio; at least "
                                    "100 ms is needed for an answer")
            await self._stop_answer()
            self.answer = asyncio.create_task(self._answer(resample(audio, OPUS_RATE, 16000)))
        elif control == Control.RESTART:
            await self._stop_answer()
            self.history, self.recording, self.pcm, self.pcm_len = [], False, [], 0

    async def _answer(self, audio16k: np.ndarray) -> None:
        user = {"role": "user", "content": user_content(1), "audio": audio16k}
        turns = self.history + [user]
        users = [i for i, t in enumerate(turns) if t["role"] == "user"]
        if len(users) > MAX_TURNS:  # drop the oldest turns at once, down to half (as ChatSession does): the kept
            turns = turns[users[-(MAX_TURNS // 2 + 1)]:]  # history is prefilled again once per trim, not every turn
        messages = [{"role": t["role"], "content": t["content"]} for t in turns]
        audios = [t["audio"] for t in turns if "audio" in t]
        request = Request(messages, audios, "s2s", system=self.system_prompt, voice=self.voice,
                          generation={"max_new_tokens": MAX_NEW_TOKENS}, max_new_tokens_is_ceiling=True,
                          conversation=self.conversation,
                          audio_out=self.scheduler.detokenizer is not None)
        if not self.scheduler.speech:
            request.mode = "s2t"
        self.send(Kind.TEXT, "[Processing...]")
        encoder, streamed = self.encoder, ""
        try:
            async for event in await self.scheduler.submit(request):
                if isinstance(event, TextDelta):
                    streamed += event.text
                    if not event.text.startswith("<|") and event.text.strip():
                        self.send(Kind.TEXT, event.text)
                elif isinstance(event, AudioChunk):
                    samples = event.samples if event.sample_rate == OPUS_RATE else resample(
                        event.samples, event.sample_rate, OPUS_RATE)
                    pages = encoder.push(samples)
                    if pages:
                        self.send(Kind.AUDIO, pages)
                elif isinstance(event, TurnEnd):
                    tail = encoder.flush()
                    if tail:
                        self.send(Kind.AUDIO, tail)
                    final = clean_text(event.text)
                    if final != streamed.strip():
                        self.send(Kind.TEXT, f"\n[Final: {final}]")
                    if event.finish_reason != "cancelled":
                        self.history = turns + [{"role": "assistant", "content": final}]
        except FunAudioChatError as err:
            self.error(f"the answer failed: {err}")
        except asyncio.CancelledError:  # interrupted: close the answer's last frame so the next one starts clean
            tail = encoder.flush()
            if tail:
                self.send(Kind.AUDIO, tail)
            raise
        except Exception as err:  # noqa: BLE001 - one failed answer must not end the connection
            log.exception("/api/chat answer failed")
            self.error(f"the answer failed: {type(err).__name__}: {err}")

    async def close(self) -> None:
        self.closed.set()
        await self._stop_answer()
        self.scheduler.forget_conversation(self.conversation)  # (its answer is cancelled: it commits nothing)


async def serve_api_chat(websocket, scheduler: Scheduler, voice=None) -> None:
    """One /api/chat connection (Starlette WebSocket)."""
    await websocket.accept()
    session = ApiChatSession(scheduler, voice)
    session.start()
    await pump(websocket, session, websocket.send_bytes)


def routes(ctx) -> list:
    """`/api/chat` for the server's app (funaudiochat.serve.app.ROUTE_MODULES)."""
    from starlette.routing import WebSocketRoute

    async def api_chat(websocket):
        await serve_api_chat(websocket, ctx.scheduler)

    return [WebSocketRoute("/api/chat", api_chat)]
