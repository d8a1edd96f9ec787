"""A checkpoint whose hearing (audio adapter) was never trained: every serving path refuses its audio input with a
clear error (the realtime WebSocket, streamed chat completions, the released demo's /api/chat), typed turns still get
answers, and `serve --allow-untrained` takes the audio. (The non-streamed chat completion is in test_serve_api.)"""
import asyncio
import base64
import io
import json
import time

import httpx2 as httpx  # the HTTP client the openai package uses
import numpy as np
import pytest
import soundfile as sf
import websockets

from funaudiochat.serve.api_chat import Control, Kind
from funaudiochat.serve.opus import OpusEncoder
from tests.serve_support import running_server, spoken_question

RATE = 24000
DEAF = {"hearing": False}


@pytest.fixture(scope="module")
def deaf(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("deaf"), trained=DEAF) as srv:
        yield srv


@pytest.fixture(scope="module")
def question():
    return spoken_question(RATE, silence_before=0.2, silence_after=0.2)


def _pcm16(samples: np.ndarray) -> str:
    return base64.b64encode((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()).decode()


def _wav_b64(samples: np.ndarray) -> str:
    buf = io.BytesIO()
    sf.write(buf, samples, RATE, format="WAV", subtype="PCM_16")
    return base64.b64encode(buf.getvalue()).decode()


def _refusal(message: str) -> bool:
    return "never trained" in message and "--allow-untrained" in message


async def _events_until(ws, kind: str, seen: list, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        event = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic())))
        seen.append(event)
        if event["type"] == kind:
            return event


async def _realtime_turns(server, question, commit_audio: bool = True):
    """Push-to-talk: the spoken question (committed, then as an input_audio item), then a typed question."""
    seen = []
    async with websockets.connect(server.ws + "/v1/realtime", max_size=2 ** 24) as ws:
        await _events_until(ws, "session.created", seen)
        await ws.send(json.dumps({"type": "session.update", "session": {"turn_detection": None}}))
        await _events_until(ws, "session.updated", seen)
        for i in range(0, len(question), 4800):
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": _pcm16(question[i:i + 4800])}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        committed = await _events_until(ws, "input_audio_buffer.committed" if commit_audio else "error", seen)
        if commit_audio:
            await ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 6}}))
            spoken = await _events_until(ws, "response.done", seen)
        else:
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_audio", "audio": _pcm16(question)}]}}))
            spoken = await _events_until(ws, "error", seen)
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "w40 w41"}]}}))
        await ws.send(json.dumps({"type": "response.create", "response": {"modalities": ["text"],
                                                                          "max_output_tokens": 4}}))
        typed = await _events_until(ws, "response.done", seen)
    return committed, spoken, typed, seen


def test_realtime_refuses_audio_with_an_error_event_and_answers_typed_turns(deaf, question):
    refused, item_refused, typed, seen = asyncio.run(_realtime_turns(deaf, question, commit_audio=False))
    for error in (refused, item_refused):  # the commit, then an input_audio item: each an error event
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
        assert error["error"]["code"] == "audio_input_untrained" and _refusal(error["error"]["message"])
    assert not [e for e in seen if e["type"] == "input_audio_buffer.committed"]
    assert len([e for e in seen if e["type"] == "response.created"]) == 1  # the typed turn's only
    # the refused audio never entered the conversation: the typed turn is answered
    assert typed["response"]["status"] in ("completed", "incomplete")
    assert deaf.healthy()


def test_streamed_chat_completion_refuses_audio_with_a_400(deaf, question):
    body = {"model": "ckpt", "stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": _wav_b64(question), "format": "wav"}}]}]}
    with httpx.stream("POST", deaf.url + "/v1/chat/completions", json=body, timeout=60) as r:
        r.read()
    assert r.status_code == 400 and not r.headers["content-type"].startswith("text/event-stream")
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and _refusal(err["message"])
    typed = httpx.post(deaf.url + "/v1/chat/completions", timeout=60, json={
        **body, "messages": [{"role": "user", "content": "w60"}]})
    assert typed.status_code == 200 and "data: [DONE]" in typed.text
    assert deaf.healthy()


def test_api_chat_refuses_audio_with_an_error_message(deaf, question):
    async def talk():
        async with websockets.connect(deaf.ws + "/api/chat") as ws:
            assert await ws.recv() == b"\x00\x00\x00"
            await ws.send(bytes([Kind.CONTROL, Control.START]))
            enc = OpusEncoder()
            for i in range(0, len(question), 1920):
                pages = enc.push(question[i:i + 1920])
                if pages:
                    await ws.send(b"\x01" + pages)
            await ws.send(b"\x01" + enc.flush())
            await ws.send(bytes([Kind.CONTROL, Control.END_TURN]))
            deadline = time.monotonic() + 120
            while True:
                msg = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
                if msg[0] == Kind.ERROR:
                    return msg[1:].decode()
                assert msg[0] != Kind.AUDIO  # nothing is said to audio it could not hear

    assert _refusal(asyncio.run(talk()))
    assert deaf.wait_idle(timeout=10) == 0 and deaf.healthy()


def test_allow_untrained_takes_the_audio(tmp_path, question):
    with running_server(tmp_path, "--allow-untrained", trained=DEAF) as allowed:
        committed, spoken, typed, seen = asyncio.run(_realtime_turns(allowed, question))
        assert committed["type"] == "input_audio_buffer.committed"
        assert spoken["response"]["status"] in ("completed", "incomplete")
        assert not [e for e in seen if e["type"] == "error"]
        body = {"model": "ckpt", "stream": True, "max_tokens": 3, "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": _wav_b64(question), "format": "wav"}}]}]}
        r = httpx.post(allowed.url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200 and "data: [DONE]" in r.text
