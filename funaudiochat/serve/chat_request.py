"""Validate an OpenAI chat-completions body and turn it into a scheduler `Request` (one validation layer).

Every problem becomes a 400 `APIError` naming the offending field (`param`, e.g. "messages[2].content[0]"). What is
supported and what is ignored is listed in docs/serve.md; `IGNORED` fields are accepted and have no effect.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass, field

import numpy as np

from funaudiochat.serve.api_errors import APIError, bad_request
from funaudiochat.serve.scheduler import Request
from funaudiochat.text.tokenizer import AUDIO_TEMPLATE

INPUT_FORMATS = ("wav", "mp3", "flac", "ogg", "opus", "webm", "m4a", "aac", "pcm16")
OUTPUT_FORMATS = ("wav", "pcm16")
PCM16_RATE = 24000  # raw pcm16 in and out: 24 kHz mono little-endian, as the OpenAI APIs use
SPECIAL_STRINGS = ("<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|endoftext|>",
                   "<|sil|>", "<|audio_pad|>")
KNOWN = {"model", "messages", "modalities", "audio", "stream", "stream_options", "max_tokens",
         "max_completion_tokens", "temperature", "top_p", "seed", "stop", "tools", "tool_choice", "n"}
IGNORED = {"frequency_penalty", "presence_penalty", "logit_bias", "user", "metadata", "store", "parallel_tool_calls",
           "service_tier", "response_format", "logprobs", "top_logprobs", "reasoning_effort", "prediction",
           "prompt_cache_key", "safety_identifier", "verbosity", "web_search_options"}


@dataclass
class Limits:
    max_messages: int = 256
    max_audio_seconds: float = 600.0
    max_text_chars: int = 100_000


@dataclass
class ChatCall:
    """A validated chat-completions call."""

    request: Request
    model: str
    stream: bool
    include_usage: bool
    audio_format: str | None          # None: text only
    tools: bool                       # tool calls are parsed from the answer
    audio_parts: list = field(default_factory=list)   # (param, raw bytes, format): decoded by `decode_audios`
    forced_tool: str | None = None    # tool_choice names this function (or "required" with one tool): the answer
                                      # starts with its call (`request.answer_prefix`) and is text only


def _type_name(x) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
            type(None): "null"}.get(type(x), type(x).__name__)


def _expect(value, types, param: str, what: str):
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise bad_request(f"'{param}' must be {what}, got a boolean", param, "invalid_type")
    if not isinstance(value, types):
        raise bad_request(f"'{param}' must be {what}, got {_type_name(value)}", param, "invalid_type")
    return value


def _number(body, key, lo, hi, integer=False, lo_open=False):
    value = body.get(key)
    if value is None:
        return None
    _expect(value, int if integer else (int, float), key, "an integer" if integer else "a number")
    if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise bad_request(f"'{key}' must be in {rng}, got {value}", key, "invalid_value")
    return value


def _text(value: str, param: str, limits: Limits) -> str:
    if len(value) > limits.max_text_chars:
        raise bad_request(f"'{param}' is {len(value)} characters long; at most {limits.max_text_chars} are accepted",
                          param, "string_above_max_length")
    for s in SPECIAL_STRINGS:
        if s in value:
            raise bad_request(f"'{param}' contains the reserved token string {s!r}; remove it", param,
                              "invalid_value")
    return value


def parse_chat(body, served_models: list[str], limits: Limits, voices, audio_store, can_speak: bool) -> ChatCall:
    """The JSON body -> ChatCall. `voices.resolve(name)` checks a voice; `audio_store.transcript(id)` looks up an
    earlier answer's audio id; `can_speak`: the server can produce audio answers."""
    _expect(body, dict, "body", "a JSON object")
    unknown = sorted(set(body) - KNOWN - IGNORED)
    if unknown:
        raise bad_request(f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0],
                          "unknown_parameter")
    model = body.get("model")
    if model is None:
        raise bad_request("'model' is required", "model", "missing_required_parameter")
    _expect(model, str, "model", "a string")
    if model not in served_models:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {', '.join(served_models)}",
                       "model", "model_not_found")
    n = _number(body, "n", 1, 1, integer=True)
    if n is not None and n != 1:
        raise bad_request("only n=1 is supported", "n")

    modalities = body.get("modalities") or ["text"]
    _expect(modalities, list, "modalities", "an array")
    if not all(isinstance(m, str) for m in modalities) or not set(modalities) <= {"text", "audio"} \
            or "text" not in modalities:
        raise bad_request(f"'modalities' must be [\"text\"] or [\"text\", \"audio\"], got {modalities!r}",
                          "modalities", "invalid_value")
    speak = "audio" in modalities
    audio_format, voice = None, None
    audio_opts = body.get("audio")
    if audio_opts is not None:
        _expect(audio_opts, dict, "audio", "an object")
        extra = set(audio_opts) - {"voice", "format"}
        if extra:
            raise bad_request(f"unrecognized field(s) in 'audio': {', '.join(sorted(extra))}", "audio")
    if speak:
        if not can_speak:
            raise bad_request("this server cannot produce audio (no speech head or no --detokenizer); ask for "
                              "modalities [\"text\"]", "modalities", "unsupported_value")
        audio_opts = audio_opts or {}
        stream = body.get("stream") is True
        audio_format = audio_opts.get("format", "pcm16" if stream else "wav")
        _expect(audio_format, str, "audio.format", "a string")
        if audio_format not in OUTPUT_FORMATS:
            raise bad_request(f"audio.format {audio_format!r} is not supported; use one of "
                              f"{', '.join(OUTPUT_FORMATS)}", "audio.format", "unsupported_value")
        if stream and audio_format != "pcm16":  # as OpenAI: streamed audio chunks are raw pcm16
            raise bad_request(f"Unsupported value: 'audio.format' does not support {audio_format!r} when "
                              f"stream=true. Supported values are: 'pcm16'.", "audio.format", "unsupported_value")
        name = audio_opts.get("voice")
        if name is not None:
            _expect(name, str, "audio.voice", "a string")
            voice = voices.resolve(name)  # raises a 400 naming the known voices

    stream = body.get("stream", False)
    _expect(stream, bool, "stream", "a boolean")
    include_usage = False
    if body.get("stream_options") is not None:
        opts = _expect(body["stream_options"], dict, "stream_options", "an object")
        include_usage = _expect(opts.get("include_usage", False), bool, "stream_options.include_usage", "a boolean")

    generation = {}
    for key in ("max_completion_tokens", "max_tokens"):
        value = _number(body, key, 1, 1 << 20, integer=True)
        if value is not None:
            generation.setdefault("max_new_tokens", value)
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1, lo_open=True)
    seed = _number(body, "seed", -(1 << 63), (1 << 63) - 1, integer=True)
    if temperature == 0:
        generation.update(do_sample=False, text_greedy=True)
    elif temperature is not None or top_p is not None:  # sampling asked for: text is sampled too
        generation.update(do_sample=True, text_greedy=False)
        if temperature is not None:
            generation["temperature"] = float(temperature)
        if top_p is not None:
            generation["top_p"] = float(top_p)
    if seed is not None:
        generation["seed"] = int(seed) % (1 << 63)

    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        _expect(stop, list, "stop", "a string or an array of strings")
        if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise bad_request("'stop' must be a non-empty string or up to 4 of them", "stop", "invalid_value")

    tools, forced = _tools(body)
    messages, audio_parts = _messages(body.get("messages"), limits, audio_store)
    prefix = ""
    if forced is not None:  # the answer starts with the call, as the tools prompt spells it; the model writes the
        prefix = f'<tool_call>\n{{"name": {json.dumps(forced)}, "arguments": '  # arguments; text only
        speak, audio_format = False, None
    mode = "s2s" if speak else "s2t"
    request = Request(messages, [], mode=mode, tools=tools, generation=generation, stop=tuple(stop or ()),
                      voice=voice, audio_out=speak, answer_prefix=prefix)
    return ChatCall(request, model, stream, include_usage, audio_format, bool(tools), audio_parts, forced)


def _tools(body) -> tuple[list | None, str | None]:
    """-> (the tools, the name of the function the answer must call or None)."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise bad_request("'tool_choice' needs 'tools'", "tool_choice")
        return None, None
    _expect(tools, list, "tools", "an array")
    if not tools or len(tools) > 128:
        raise bad_request("'tools' must hold 1 to 128 function definitions", "tools", "invalid_value")
    for i, t in enumerate(tools):
        p = f"tools[{i}]"
        _expect(t, dict, p, "an object")
        if t.get("type") != "function":
            raise bad_request(f"'{p}.type' must be \"function\"", f"{p}.type", "invalid_value")
        fn = _expect(t.get("function"), dict, f"{p}.function", "an object")
        name = fn.get("name")
        if not isinstance(name, str) or not name or len(name) > 64 or not all(c.isalnum() or c in "_-" for c in name):
            raise bad_request(f"'{p}.function.name' must be 1-64 letters, digits, '_' or '-'", f"{p}.function.name",
                              "invalid_value")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise bad_request(f"'{p}.function.parameters' must be a JSON Schema object", f"{p}.function.parameters",
                              "invalid_type")
        if "description" in fn and not isinstance(fn["description"], str):
            raise bad_request(f"'{p}.function.description' must be a string", f"{p}.function.description",
                              "invalid_type")
    if choice == "none":
        return None, None
    if choice in (None, "auto"):
        return tools, None
    if choice == "required":
        if len(tools) > 1:  # the call's name would have to be constrained to the list: not supported
            raise bad_request("tool_choice \"required\" is supported with one tool only; name the function to "
                              "call ({\"type\": \"function\", \"function\": {\"name\": ...}}) or use \"auto\"",
                              "tool_choice", "unsupported_value")
        return tools, tools[0]["function"]["name"]
    _expect(choice, dict, "tool_choice", "\"none\", \"auto\", \"required\" or a function choice object")
    name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
    if choice.get("type") != "function" or name not in [t["function"]["name"] for t in tools]:
        raise bad_request("'tool_choice' must name one of the given tools", "tool_choice", "invalid_value")
    return tools, name


def _messages(messages, limits: Limits, audio_store) -> tuple[list[dict], list]:
    """OpenAI messages -> ChatML messages (one audio template per audio part) + the audio parts to decode."""
    if messages is None:
        raise bad_request("'messages' is required", "messages", "missing_required_parameter")
    _expect(messages, list, "messages", "an array")
    if not messages:
        raise bad_request("'messages' must hold at least one message", "messages", "empty_array")
    if len(messages) > limits.max_messages:
        raise bad_request(f"'messages' holds {len(messages)} messages; at most {limits.max_messages} are accepted",
                          "messages", "array_above_max_length")
    out, parts = [], []
    for i, m in enumerate(messages):
        p = f"messages[{i}]"
        _expect(m, dict, p, "an object")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise bad_request(f"'{p}.role' must be one of system, developer, user, assistant, tool; got {role!r}",
                              f"{p}.role", "invalid_value")
        content = m.get("content")
        if role == "assistant":
            text = _assistant_text(m, p, limits, audio_store)
            out.append({"role": "assistant", "content": text})
            continue
        if content is None:
            raise bad_request(f"'{p}.content' is required", f"{p}.content", "missing_required_parameter")
        if isinstance(content, str):
            text = _text(content, f"{p}.content", limits)
        else:
            _expect(content, list, f"{p}.content", "a string or an array of content parts")
            text = ""
            for j, part in enumerate(content):
                q = f"{p}.content[{j}]"
                _expect(part, dict, q, "an object")
                kind = part.get("type")
                if kind == "text":
                    text += _text(_expect(part.get("text"), str, f"{q}.text", "a string"), f"{q}.text", limits)
                elif kind == "input_audio" and role == "user":
                    audio = _expect(part.get("input_audio"), dict, f"{q}.input_audio", "an object")
                    data = _expect(audio.get("data"), str, f"{q}.input_audio.data", "a base64 string")
                    fmt = _expect(audio.get("format", "wav"), str, f"{q}.input_audio.format", "a string")
                    if fmt not in INPUT_FORMATS:
                        raise bad_request(f"'{q}.input_audio.format' {fmt!r} is not supported; use one of "
                                          f"{', '.join(INPUT_FORMATS)}", f"{q}.input_audio.format",
                                          "unsupported_value")
                    try:
                        raw = base64.b64decode(data, validate=True)
                    except (binascii.Error, ValueError):
                        raise bad_request(f"'{q}.input_audio.data' is not valid base64", f"{q}.input_audio.data",
                                          "invalid_base64") from None
                    parts.append((f"{q}.input_audio", raw, fmt))
                    text += AUDIO_TEMPLATE
                else:
                    allowed = "text or input_audio" if role == "user" else "text"
                    raise bad_request(f"'{q}.type' {kind!r} is not supported in a {role} message; use {allowed}",
                                      f"{q}.type", "unsupported_value")
        if role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"})
        else:
            out.append({"role": "system" if role == "developer" else role, "content": text})
    if out[-1]["role"] == "assistant":
        raise bad_request("the last message must not be the assistant's: there is nothing to answer", "messages",
                          "invalid_value")
    # ChatML allows one leading system turn; later system messages are kept as system turns too (the model sees them)
    return out, parts


def _assistant_text(m: dict, p: str, limits: Limits, audio_store) -> str:
    """An earlier answer as text: its content, else its audio's transcript (by id), plus its tool calls."""
    content = m.get("content")
    text = ""
    if isinstance(content, str):
        text = _text(content, f"{p}.content", limits)
    elif isinstance(content, list):
        for j, part in enumerate(content):
            q = f"{p}.content[{j}]"
            _expect(part, dict, q, "an object")
            if part.get("type") not in ("text", "refusal"):
                raise bad_request(f"'{q}.type' must be text in an assistant message", f"{q}.type",
                                  "unsupported_value")
            text += _text(_expect(part.get(part["type"]), str, f"{q}.{part['type']}", "a string"), q, limits)
    elif content is not None:
        _expect(content, (str, list), f"{p}.content", "a string, an array of parts or null")
    audio = m.get("audio")
    if audio is not None:
        _expect(audio, dict, f"{p}.audio", "an object")
        audio_id = _expect(audio.get("id"), str, f"{p}.audio.id", "a string")
        transcript = audio_store.transcript(audio_id)
        if transcript is None:
            raise bad_request(f"'{p}.audio.id' {audio_id!r} is unknown or expired; send the answer as text instead",
                              f"{p}.audio.id", "invalid_value")
        text = text or transcript
    calls = m.get("tool_calls")
    if calls is not None:
        _expect(calls, list, f"{p}.tool_calls", "an array")
        for j, call in enumerate(calls):
            q = f"{p}.tool_calls[{j}]"
            fn = _expect(_expect(call, dict, q, "an object").get("function"), dict, f"{q}.function", "an object")
            name = _expect(fn.get("name"), str, f"{q}.function.name", "a string")
            args = _expect(fn.get("arguments", "{}"), str, f"{q}.function.arguments", "a JSON string")
            try:
                parsed = json.loads(args)
            except json.JSONDecodeError:
                raise bad_request(f"'{q}.function.arguments' is not valid JSON", f"{q}.function.arguments",
                                  "invalid_value") from None
            call_json = json.dumps({"name": name, "arguments": parsed}, ensure_ascii=False)
            text += f"\n<tool_call>\n{call_json}\n</tool_call>"
    if not text.strip() and content is None and audio is None and calls is None:
        raise bad_request(f"'{p}' needs content, audio or tool_calls", f"{p}.content", "missing_required_parameter")
    return text.strip()


def decode_audio(param: str, raw: bytes, fmt: str, max_seconds: float) -> np.ndarray:
    """One audio part -> 16 kHz float32; too long, empty, NaN, not audio: a 400 naming the part."""
    from funaudiochat.audio.io import load_audio
    from funaudiochat.errors import InputError

    try:
        if fmt == "pcm16":
            if len(raw) % 2:
                raise InputError(f"{param}: pcm16 data must hold whole 16-bit samples (an even byte count)")
            samples = np.frombuffer(raw, dtype="<i2")
            if samples.size > max_seconds * PCM16_RATE:
                raise _too_long(param, samples.size / PCM16_RATE, max_seconds)
            wav = load_audio(samples, source_rate=PCM16_RATE, name=param)
        else:
            seconds = _header_seconds(raw)
            if seconds is not None and seconds > max_seconds:
                raise _too_long(param, seconds, max_seconds)
            wav = load_audio(raw, name=param)
    except InputError as err:
        raise bad_request(str(err), param, "invalid_audio") from None
    if wav.size > max_seconds * 16000:
        raise _too_long(param, wav.size / 16000, max_seconds)
    return wav


def _header_seconds(raw: bytes) -> float | None:
    """The duration a wav/flac/ogg header declares (before decoding anything), or None."""
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(raw))
        return info.frames / info.samplerate if info.samplerate else None
    except Exception:  # not a libsndfile format (mp3, m4a, ...) or not audio: decoding will say which
        return None


def _too_long(param: str, seconds: float, max_seconds: float) -> APIError:
    return bad_request(f"'{param}' is {seconds:.0f} s long; at most {max_seconds:g} s of audio is accepted",
                       param, "audio_too_long")
