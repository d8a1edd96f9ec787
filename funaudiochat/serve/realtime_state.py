"""The state of a realtime session that is plain data: its settings (`session.update`), its conversation items,
and the pcm16 audio of the wire. Parsing raises `RealtimeError` (an `error` event for the client).
"""
from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass, field

import numpy as np

from funaudiochat.errors import InputError, ProtocolError
from funaudiochat.text.chat import user_content

RATE = 24000  # the wire's sample rate
MAX_BUFFER_S = 600.0  # the input audio buffer (a turn) holds at most 10 minutes
MIN_COMMIT_MS = 100  # OpenAI refuses to commit less than 100 ms
CODE_MS = 40  # one speech token: 25 Hz


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class RealtimeError(ProtocolError):
    """A client event that cannot be applied; becomes an `error` event."""

    def __init__(self, message: str, code: str = "invalid_event", param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param


# ---------------------------------------------------------------------------------------------- session settings
@dataclass
class TurnDetection:
    threshold: float = 0.5
    silence_duration_ms: int = 500
    prefix_padding_ms: int = 300
    create_response: bool = True
    interrupt_response: bool = True

    def as_dict(self) -> dict:
        return {"type": "server_vad", **self.__dict__}


def number(value, name: str, lo: float, hi: float, integer: bool = False):
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise RealtimeError(f"{name} must be {kind} in [{lo}, {hi}], got {value!r}", "invalid_value", name)
    return value


@dataclass
class SessionConfig:
    instructions: str | None = None
    voice: str | None = None
    modalities: tuple[str, ...] = ("text", "audio")
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)
    tools: list[dict] = field(default_factory=list)
    tool_choice: str = "auto"
    temperature: float | None = None
    max_output_tokens: int | None = None
    transcribe_input: bool = False

    def as_dict(self, session_id: str) -> dict:
        return {"id": session_id, "object": "realtime.session", "type": "realtime", "model": "funaudiochat",
                "instructions": self.instructions or "", "voice": self.voice,
                "modalities": list(self.modalities), "output_modalities": list(self.modalities),
                "input_audio_format": "pcm16", "output_audio_format": "pcm16",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE},
                                    "turn_detection": self.turn_detection and self.turn_detection.as_dict()},
                          "output": {"format": {"type": "audio/pcm", "rate": RATE}, "voice": self.voice}},
                "turn_detection": self.turn_detection and self.turn_detection.as_dict(),
                "input_audio_transcription": {"model": "funaudiochat"} if self.transcribe_input else None,
                "tools": self.tools, "tool_choice": self.tool_choice, "temperature": self.temperature,
                "max_response_output_tokens": self.max_output_tokens or "inf"}


def parse_modalities(value, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(v in ("text", "audio") for v in value):
        raise RealtimeError(f'{name} must be ["text"], ["audio"] or ["text", "audio"], got {value!r}',
                            "invalid_value", name)
    return ("text", "audio") if "audio" in value else ("text",)


def parse_tools(value) -> list[dict]:
    from funaudiochat.text.tools import normalize_tools

    if value == []:
        return []
    try:
        normalize_tools(value)
    except InputError as err:
        raise RealtimeError(f"session.tools: {err}", "invalid_value", "tools") from None
    return value


def parse_max_tokens(value, name: str) -> int | None:
    if value == "inf" or value is None:
        return None
    return number(value, name, 1, 4096, integer=True)


def parse_turn_detection(value) -> TurnDetection | None:
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type", "server_vad") != "server_vad":
        raise RealtimeError(f"turn_detection must be null or {{\"type\": \"server_vad\", ...}}, got {value!r}",
                            "invalid_value", "turn_detection")
    td = TurnDetection()
    if "threshold" in value:
        td.threshold = number(value["threshold"], "turn_detection.threshold", 0.05, 0.95)
    if "silence_duration_ms" in value:
        td.silence_duration_ms = number(value["silence_duration_ms"], "turn_detection.silence_duration_ms",
                                         50, 10000, integer=True)
    if "prefix_padding_ms" in value:
        td.prefix_padding_ms = number(value["prefix_padding_ms"], "turn_detection.prefix_padding_ms", 0, 5000,
                                       integer=True)
    for flag in ("create_response", "interrupt_response"):
        if flag in value:
            if not isinstance(value[flag], bool):
                raise RealtimeError(f"turn_detection.{flag} must be true or false", "invalid_value",
                                    f"turn_detection.{flag}")
            setattr(td, flag, value[flag])
    return td


# ---------------------------------------------------------------------------------------------- conversation
@dataclass
class Item:
    id: str
    role: str  # "user", "assistant" or "system"
    type: str = "message"  # or "function_call", "function_call_output"
    text: str = ""
    audio: np.ndarray | None = None  # user audio at 16 kHz
    audio_ms: int = 0  # assistant audio produced
    marks: list = field(default_factory=list)  # (speech tokens produced before it, text length after it) per delta
    raw: str = ""  # the text as produced (marks index into it)
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    status: str = "completed"

    def as_dict(self) -> dict:
        if self.type == "function_call":
            return {"id": self.id, "object": "realtime.item", "type": "function_call", "status": self.status,
                    "call_id": self.call_id, "name": self.name, "arguments": self.arguments}
        if self.type == "function_call_output":
            return {"id": self.id, "object": "realtime.item", "type": "function_call_output",
                    "call_id": self.call_id, "output": self.text}
        if self.role == "user":
            content = ([{"type": "input_audio", "transcript": None}] if self.audio is not None else [])
            content += [{"type": "input_text", "text": self.text}] if self.text else []
        elif self.audio_ms:
            content = [{"type": "output_audio", "transcript": self.text}]
        else:
            content = [{"type": "output_text", "text": self.text}]
        return {"id": self.id, "object": "realtime.item", "type": "message", "role": self.role,
                "status": self.status, "content": content}


def conversation_messages(items: list[Item], instructions: str | None) -> tuple[list[dict], list[np.ndarray]]:
    """Items -> chat messages + the user audios in order (assistant turns as text, as the released demo keeps them)."""
    msgs = [{"role": "system", "content": instructions}] if instructions else []
    audios = []
    for item in items:
        if item.type == "function_call":
            msgs.append({"role": "assistant", "content": f'<tool_call>\n{{"name": {json.dumps(item.name)}, '
                                                         f'"arguments": {item.arguments}}}\n</tool_call>'})
        elif item.type == "function_call_output":
            msgs.append({"role": "user", "content": f"<tool_response>\n{item.text}\n</tool_response>"})
        elif item.role == "user":
            n = 1 if item.audio is not None else 0
            msgs.append({"role": "user", "content": user_content(n, item.text or None)})
            audios += [item.audio] if n else []
        elif item.role == "system":
            msgs.append({"role": "system", "content": item.text})
        elif item.text:
            msgs.append({"role": "assistant", "content": item.text})
    return msgs, audios


def heard_text(text: str, marks: list[tuple[int, int]], heard_ms: int) -> str:
    """The part of an answer's text produced by the step whose speech was the last one heard."""
    heard_tokens = heard_ms / CODE_MS
    kept = max([end for before, end in marks if before < heard_tokens] + [0]) if heard_ms > 0 else 0
    return text[:kept].strip()


def decode_pcm16(data) -> np.ndarray:
    """base64 pcm16 mono -> float32 samples."""
    if not isinstance(data, str):
        raise RealtimeError("audio must be a base64 string of pcm16 samples", "invalid_value", "audio")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RealtimeError("audio is not valid base64", "invalid_value", "audio") from None
    if len(raw) % 2:
        raise RealtimeError(f"audio has {len(raw)} bytes; pcm16 needs an even count", "invalid_value", "audio")
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


def encode_pcm16(samples: np.ndarray) -> str:
    pcm = np.clip(np.nan_to_num(samples), -1.0, 1.0 - 1.0 / 32768)
    return base64.b64encode((pcm * 32768.0).astype("<i2").tobytes()).decode("ascii")
