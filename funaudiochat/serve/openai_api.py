"""OpenAI-compatible routes: chat completions (text and audio, streamed or not, tool calls), transcriptions, voices.

Shapes follow the official `openai` client; docs/serve.md lists the supported and the ignored fields.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import uuid

import numpy as np
from starlette.datastructures import UploadFile
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from funaudiochat.engine.events import AudioChunk, TextDelta, TurnEnd
from funaudiochat.serve.api_errors import APIError, bad_request, to_api_error
from funaudiochat.serve.app import ServerContext, read_body, read_json, watch_disconnect
from funaudiochat.serve.chat_request import ChatCall, decode_audio, parse_chat
from funaudiochat.serve.scheduler import Request
from funaudiochat.text.chat import ASR_INSTRUCTION, user_content
from funaudiochat.text.tools import parse_tool_calls

TOOL_OPEN = "<tool_call>"


def routes() -> list:
    return [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
            Route("/v1/voices", list_voices, methods=["GET"]),
            Route("/v1/voices", create_voice, methods=["POST"])]


def _ctx(request: HTTPRequest) -> ServerContext:
    return request.app.state.ctx


def _check_capacity(ctx: ServerContext) -> None:
    try:
        ctx.scheduler.check_capacity()
    except Exception as err:
        raise to_api_error(err) from None


async def _submit(ctx: ServerContext, request: Request):
    try:
        return await ctx.scheduler.submit(request)
    except Exception as err:  # busy, bad input found while building the prompt, engine down
        raise to_api_error(err) from None


async def _decode_audios(call: ChatCall, ctx: ServerContext) -> None:
    loop = asyncio.get_running_loop()
    total = 0.0
    for param, raw, fmt in call.audio_parts:
        wav = await loop.run_in_executor(None, decode_audio, param, raw, fmt, ctx.limits.max_audio_seconds)
        total += wav.size / 16000
        if total > ctx.limits.max_audio_seconds:
            raise bad_request(f"the request's audio adds up to {total:.0f} s; at most "
                              f"{ctx.limits.max_audio_seconds:g} s in all are accepted", param, "audio_too_long")
        call.request.audios.append(wav)


# ------------------------------------------------------------------------------------------------ chat completions
async def chat_completions(request: HTTPRequest):
    ctx = _ctx(request)
    body = await read_json(request, ctx.max_body_bytes)
    call = parse_chat(body, ctx.served_models, ctx.limits, ctx.voices, ctx.audio_store, ctx.can_speak)
    _check_capacity(ctx)
    await _decode_audios(call, ctx)
    session = await _submit(ctx, call.request)
    answer = _Answer(ctx, call, session)
    if call.stream:
        return StreamingResponse(answer.sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    watcher = asyncio.create_task(watch_disconnect(request, session))
    try:
        return JSONResponse(await answer.complete())
    finally:
        watcher.cancel()


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.asarray(samples, dtype=np.float32), sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


class _Answer:
    """One chat completion: runs the session and shapes its events as OpenAI responses."""

    def __init__(self, ctx: ServerContext, call: ChatCall, session):
        self.ctx, self.call, self.session = ctx, call, session
        self.id = "chatcmpl-" + uuid.uuid4().hex
        self.created = int(time.time())
        self.speak = call.audio_format is not None
        self.audio_id, self.expires_at = ctx.audio_store.new_id() if self.speak else (None, None)

    def usage(self, end: TurnEnd) -> dict:
        special = self.ctx.scheduler.tokenizer.special
        prompt_audio = int((self.session.prompt.input_ids == special.audio).sum())
        u = end.usage
        return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.text_tokens + u.speech_tokens,
                "total_tokens": u.prompt_tokens + u.text_tokens + u.speech_tokens,
                "prompt_tokens_details": {"audio_tokens": prompt_audio, "text_tokens": u.prompt_tokens - prompt_audio,
                                          "cached_tokens": u.cached_tokens},
                "completion_tokens_details": {"audio_tokens": u.speech_tokens, "text_tokens": u.text_tokens,
                                              "reasoning_tokens": 0, "accepted_prediction_tokens": 0,
                                              "rejected_prediction_tokens": 0}}

    def _tool_calls(self, answer: str):
        """The answer's text (after the forced call's opening, if any) -> (remaining text, tool_calls or None)."""
        if not self.call.tools:
            return answer.strip(), None
        parsed = parse_tool_calls((self.call.request.answer_prefix + answer).strip())
        named = [(c.name, json.dumps(c.arguments, ensure_ascii=False)) for c in parsed.calls]
        text = parsed.text
        if self.call.forced_tool is not None and (not named or named[0][0] != self.call.forced_tool):
            # the forced call did not come out as well-formed JSON: its arguments as written (OpenAI's arguments
            # may be invalid JSON too; the caller validates them)
            args, _, text = answer.partition("</tool_call>")
            args = args.strip()
            if args.endswith("}"):  # the call object's own closing brace
                args = args[:-1].rstrip()
            named, text = [(self.call.forced_tool, args)], text.strip()
        if not named:
            return text, None
        calls = [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                  "function": {"name": name, "arguments": args}} for name, args in named]
        return text, calls

    def _finish_reason(self, end: TurnEnd, calls) -> str:
        if calls:
            return "tool_calls"
        return "length" if end.finish_reason == "length" else "stop"

    def _remember(self, transcript: str) -> None:
        if self.speak:
            self.ctx.audio_store.put(self.audio_id, transcript, self.expires_at)

    # -- stream: false
    async def complete(self) -> dict:
        end = None
        try:
            async for event in self.session:
                if isinstance(event, TurnEnd):
                    end = event
        except Exception as err:
            raise to_api_error(err) from None
        text, calls = self._tool_calls(end.text)
        message = {"role": "assistant", "content": text, "refusal": None}
        if self.speak:
            rate = self.ctx.scheduler.detokenizer.sample_rate
            samples = end.audio if end.audio is not None else np.zeros(0, dtype=np.float32)
            data = wav_bytes(samples, rate) if self.call.audio_format == "wav" else pcm16(samples)
            message["content"] = None  # as OpenAI: a spoken answer's text is its transcript
            message["audio"] = {"id": self.audio_id, "data": base64.b64encode(data).decode("ascii"),
                                "expires_at": self.expires_at, "transcript": text}
            self._remember(text)
        if calls:
            message["tool_calls"] = calls
            message["content"] = text or None
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.call.model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "message": message, "finish_reason": self._finish_reason(end, calls),
                             "logprobs": None}],
                "usage": self.usage(end)}

    # -- stream: true
    def _chunk(self, delta: dict | None, finish_reason=None, usage=None) -> str:
        obj = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.call.model,
               "system_fingerprint": None,
               "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                                     "logprobs": None}]}
        if usage is not None:
            obj["usage"] = usage
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def _text_delta(self, text: str) -> dict:
        if self.speak:
            return {"audio": {"id": self.audio_id, "transcript": text}}
        return {"content": text}

    async def sse(self):
        held = self.call.request.answer_prefix  # with tools: text from a possible "<tool_call>" on is held back
        yield self._chunk({"role": "assistant", "content": None if self.speak else "", "refusal": None})
        try:
            async for event in self.session:
                if isinstance(event, TextDelta):
                    out = event.text
                    if self.call.tools:
                        held += event.text
                        out, held = _split_tool_text(held)
                    if out:
                        yield self._chunk(self._text_delta(out))
                elif isinstance(event, AudioChunk) and self.speak:
                    audio = {"id": self.audio_id, "data": base64.b64encode(pcm16(event.samples)).decode("ascii"),
                             "expires_at": self.expires_at}
                    yield self._chunk({"audio": audio})
                elif isinstance(event, TurnEnd):
                    calls = None
                    if self.call.tools:  # what was held back: tool calls, or text after all
                        rest, calls = self._tool_calls(event.text)
                        tail = rest if self.call.forced_tool else parse_tool_calls(held).text if calls else held
                        if tail:
                            yield self._chunk(self._text_delta(tail))
                    if calls:
                        yield self._chunk({"tool_calls": [dict(c, index=i) for i, c in enumerate(calls)]})
                    self._remember(event.text.strip())
                    yield self._chunk({}, self._finish_reason(event, calls))
                    if self.call.include_usage:
                        yield self._chunk(None, usage=self.usage(event))
        except Exception as err:  # the stream has started: report in-band, as OpenAI does
            yield f"data: {json.dumps(to_api_error(err).body())}\n\n"
        yield "data: [DONE]\n\n"


def _split_tool_text(held: str) -> tuple[str, str]:
    """-> (text safe to send now, text to hold): hold from a "<tool_call>" (or a prefix of it at the end) on."""
    at = held.find(TOOL_OPEN)
    if at >= 0:
        return held[:at], held[at:]
    for n in range(min(len(TOOL_OPEN) - 1, len(held)), 0, -1):
        if held.endswith(TOOL_OPEN[:n]):
            return held[:-n], held[-n:]
    return held, ""


# ------------------------------------------------------------------------------------------------ transcriptions
TRANSCRIPTION_FIELDS = {"file", "model", "response_format", "language", "prompt", "temperature",
                        "timestamp_granularities[]", "timestamp_granularities", "chunking_strategy", "include[]",
                        "stream"}


async def _form(request: HTTPRequest, ctx: ServerContext):
    if "multipart/form-data" not in request.headers.get("content-type", ""):
        raise APIError(415, "send the request as multipart/form-data (fields: file, model, ...)", None,
                       "unsupported_media_type")
    await read_body(request, ctx.max_body_bytes)
    try:
        return await request.form(max_files=2, max_fields=32)
    except Exception as err:  # python-multipart / starlette parse errors
        raise bad_request(f"cannot parse the multipart body ({err})", None, "invalid_multipart") from None


async def _form_audio(form, ctx: ServerContext, param: str = "file") -> np.ndarray:
    upload = form.get(param)
    if not isinstance(upload, UploadFile):
        raise bad_request(f"'{param}' is required: an audio file upload", param, "missing_required_parameter")
    raw = await upload.read()
    if not raw:
        raise bad_request(f"'{param}' is empty (0 bytes)", param, "invalid_audio")
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, decode_audio, param, raw, "auto", ctx.limits.max_audio_seconds)


def _form_text(form, name: str, default=None) -> str | None:
    value = form.get(name, default)
    if value is not None and not isinstance(value, str):
        raise bad_request(f"'{name}' must be a text field", name, "invalid_type")
    return value


async def transcriptions(request: HTTPRequest):
    ctx = _ctx(request)
    form = await _form(request, ctx)
    unknown = sorted(set(form.keys()) - TRANSCRIPTION_FIELDS)
    if unknown:
        raise bad_request(f"unrecognized field(s): {', '.join(unknown)}", unknown[0], "unknown_parameter")
    model = _form_text(form, "model")
    if not model:
        raise bad_request("'model' is required", "model", "missing_required_parameter")
    if model not in ctx.served_models:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {', '.join(ctx.served_models)}",
                       "model", "model_not_found")
    fmt = _form_text(form, "response_format", "json")
    if fmt not in ("json", "text", "verbose_json"):
        raise bad_request(f"response_format {fmt!r} is not supported; use json, text or verbose_json",
                          "response_format", "unsupported_value")
    if _form_text(form, "stream", "false") not in ("false", "False", "0"):
        raise bad_request("streamed transcriptions are not supported; omit 'stream'", "stream", "unsupported_value")
    _check_capacity(ctx)
    wav = await _form_audio(form, ctx)
    req = Request([{"role": "user", "content": user_content(1, ASR_INSTRUCTION)}], [wav], mode="s2t",
                  audio_out=False)
    session = await _submit(ctx, req)
    watcher = asyncio.create_task(watch_disconnect(request, session))
    end = None
    try:
        async for event in session:
            if isinstance(event, TurnEnd):
                end = event
    except Exception as err:
        raise to_api_error(err) from None
    finally:
        watcher.cancel()
    text = end.text.strip()
    seconds = round(wav.size / 16000, 3)
    if fmt == "text":
        return PlainTextResponse(text + "\n")
    usage = {"type": "duration", "seconds": int(np.ceil(seconds))}
    if fmt == "json":
        return JSONResponse({"text": text, "usage": usage})
    language = _form_text(form, "language") or "unknown"
    return JSONResponse({"task": "transcribe", "language": language, "duration": seconds, "text": text,
                         "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": seconds, "text": text,
                                       "tokens": list(end.text_ids), "temperature": 0.0, "avg_logprob": 0.0,
                                       "compression_ratio": 0.0, "no_speech_prob": 0.0}],
                         "usage": usage})


# ------------------------------------------------------------------------------------------------ voices
async def list_voices(request: HTTPRequest):
    ctx = _ctx(request)
    return JSONResponse({"object": "list", "data": [ctx.voices.describe(n) for n in ctx.voices.names()]})


async def create_voice(request: HTTPRequest):
    """multipart: name (text), file (a reference recording of the voice, 1 s or more)."""
    ctx = _ctx(request)
    form = await _form(request, ctx)
    name = _form_text(form, "name")
    if not name:
        raise bad_request("'name' is required", "name", "missing_required_parameter")
    wav = await _form_audio(form, ctx)
    loop = asyncio.get_running_loop()
    described = await loop.run_in_executor(None, ctx.voices.register, name, wav)
    return JSONResponse(described, status_code=201)
