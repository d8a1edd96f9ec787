"""/api/chat, the released demo's binary protocol (SPEC §10.2), against a real `funaudiochat serve`: a scripted
client sends a spoken question as Ogg/Opus and gets text and Ogg/Opus speech back; bad messages get ERROR
messages and the connection (and the server) go on."""
import asyncio
import time

import numpy as np
import pytest
import websockets

from funaudiochat.serve.api_chat import Control, Kind, clean_text, parse_message
from funaudiochat.serve.opus import OpusDecoder, OpusEncoder
from funaudiochat.errors import ProtocolError
from tests.serve_support import running_server, spoken_question

RATE = 24000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("api_chat")) as srv:
        yield srv


def test_opus_round_trip_at_24_khz():
    t = np.arange(RATE) / RATE
    tone = (0.4 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    enc = OpusEncoder()
    stream = b"".join(enc.push(tone[i:i + 700]) for i in range(0, RATE, 700)) + enc.flush()
    assert stream.startswith(b"OggS")
    dec = OpusDecoder()
    out = np.concatenate([dec.push(stream[i:i + 333]) for i in range(0, len(stream), 333)])
    assert abs(len(out) - RATE) <= 960  # whole 40 ms frames
    # a lossy codec: compare the spectrum's peak and the level, not samples
    peak_hz = np.argmax(np.abs(np.fft.rfft(out[2400:RATE - 2400]))) * RATE / (RATE - 4800)
    assert abs(peak_hz - 440) < 5 and abs(np.sqrt(np.mean(out[2400:-2400] ** 2)) - 0.4 / np.sqrt(2)) < 0.05
    with pytest.raises(ProtocolError, match="not a valid Ogg/Opus"):
        OpusDecoder().push(b"RIFF....WAVEfmt " * 20)


def test_message_parsing_and_legacy_fallback():
    assert parse_message(b"\x01OggS") == ("audio", b"OggS")
    assert parse_message(b"\x03\x01") == ("control", Control.END_TURN)
    assert parse_message(b"\x03") == ("control", Control.START)  # legacy: kind 3 is start
    assert parse_message(b"\x02") == ("control", Control.PAUSE)  # legacy: kind 2 is pause
    assert parse_message(b'\x04{"system_prompt": "be brief"}') == ("metadata", {"system_prompt": "be brief"})
    for bad in (b"", b"\x09abc", b"\x03\x07", b"\x04{nope", b'\x04"text"', b'\x04{"system_prompt": 3}'):
        with pytest.raises(ProtocolError):
            parse_message(bad)
    assert clean_text("<|audio_bos|><|sil|> Paris. <|audio_eos|><|im_end|>") == "Paris."


async def read_until(ws, enough, timeout=120.0, quiet=0.0, plenty=RATE, decoder=None):
    """Collect server messages until `enough(texts, samples)` holds, then until `quiet` s pass without one (the
    protocol has no end-of-answer message) or `plenty` samples came -> texts, errors, the decoded answer audio."""
    decoder = decoder or OpusDecoder()
    texts, errors, pcm = [], [], [np.zeros(0, np.float32)]
    deadline = time.monotonic() + timeout
    while True:
        if enough(texts, sum(map(len, pcm))):
            if not quiet or sum(map(len, pcm)) >= plenty:
                break
            try:
                msg = await asyncio.wait_for(ws.recv(), quiet)
            except asyncio.TimeoutError:
                break
        else:
            msg = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
        assert isinstance(msg, bytes)
        if msg[0] == Kind.AUDIO:
            pcm.append(decoder.push(msg[1:]))
        elif msg[0] == Kind.TEXT:
            texts.append(msg[1:].decode())
        elif msg[0] == Kind.ERROR:
            errors.append(msg[1:].decode())
    return texts, errors, np.concatenate(pcm)


def test_scripted_client_sends_opus_and_gets_text_and_opus_back(server):
    question = spoken_question(RATE, silence_before=0.2, silence_after=0.3)

    async def talk():
        async with websockets.connect(server.ws + "/api/chat") as ws:
            assert await ws.recv() == b"\x00\x00\x00"  # handshake: kind 0, version 0, model 0
            await ws.send(b"\x04" + b'{"system_prompt": "w40 w41 w42"}')
            await ws.send(bytes([Kind.CONTROL, Control.START]))
            decoder = OpusDecoder()  # the server's answers are one Ogg stream for the whole connection
            turns = []
            for turn in range(2):  # the second turn interrupts the first answer if it still runs
                enc = OpusEncoder()  # a recorder opens a new stream per turn
                for i in range(0, len(question), 1920):  # 80 ms pieces, as a recorder streams them
                    pages = enc.push(question[i:i + 1920])
                    if pages:
                        await ws.send(b"\x01" + pages)
                await ws.send(b"\x01" + enc.flush())
                await ws.send(bytes([Kind.CONTROL, Control.PAUSE if turn == 0 else Control.END_TURN]))
                # the answer: from "[Processing...]" until it has been quiet for 3 s (or a second of audio came)
                turns.append(await read_until(ws, lambda t, n: "[Processing...]" in t, quiet=3.0, decoder=decoder))
                await ws.send(bytes([Kind.CONTROL, Control.START]))
            # a restart forgets the conversation; the connection goes on
            await ws.send(bytes([Kind.CONTROL, Control.RESTART]))
            await ws.send(b"\x06")  # ping
            return turns

    def spoken(turns) -> bool:  # each answer has streamed text and at least 0.3 s of audible speech
        return all("".join(texts[texts.index("[Processing...]") + 1:]).strip() and len(pcm) >= 0.3 * RATE
                   and np.abs(pcm).max() > 0.01 for texts, _, pcm in turns)

    # The tiny random model samples its answers and may end one after a token or two, without speech: that is the
    # model, not the protocol, so such a conversation is tried again (at most 3 times).
    for _ in range(3):
        turns = asyncio.run(talk())
        assert not any(errors for _, errors, _ in turns), turns
        if spoken(turns):
            break
    assert spoken(turns), [(texts, len(pcm)) for texts, _, pcm in turns]
    assert server.wait_idle(timeout=10) == 0 and server.healthy()


BAD_MESSAGES = [
    (b"\x09whatever", "unknown message kind 9"),
    (b"\x03\x07", "control message must be one byte"),
    (b"\x04{not json", "metadata must be UTF-8 JSON"),
    ("a text frame", "binary protocol"),
    (bytes([Kind.CONTROL, Control.PAUSE]), "pause/endTurn without start"),
]


@pytest.mark.parametrize("frame,message", BAD_MESSAGES, ids=[f"bad{i}" for i in range(len(BAD_MESSAGES))])
def test_bad_message_gets_an_error_and_the_connection_goes_on(server, frame, message):
    async def talk():
        async with websockets.connect(server.ws + "/api/chat") as ws:
            await ws.recv()
            await ws.send(frame)
            reply = await asyncio.wait_for(ws.recv(), 10)
            # still usable: a turn with garbage audio is refused as such
            await ws.send(bytes([Kind.CONTROL, Control.START]))
            await ws.send(b"\x01" + b"this is not ogg" * 10)
            garbage = await asyncio.wait_for(ws.recv(), 10)
            return reply, garbage

    reply, garbage = asyncio.run(talk())
    assert reply[0] == Kind.ERROR and message in reply[1:].decode()
    assert garbage[0] == Kind.ERROR and "not a valid Ogg/Opus stream" in garbage[1:].decode()
    assert server.healthy()


def test_disconnect_mid_answer_frees_the_session(server):
    question = spoken_question(RATE, silence_before=0.2, silence_after=0.3)

    async def talk():
        ws = await websockets.connect(server.ws + "/api/chat")
        await ws.recv()
        await ws.send(bytes([Kind.CONTROL, Control.START]))
        enc = OpusEncoder()
        await ws.send(b"\x01" + enc.push(question) + enc.flush())
        await ws.send(bytes([Kind.CONTROL, Control.END_TURN]))
        await read_until(ws, lambda t, n: n > 0)
        busy = server.sessions()
        ws.transport.abort()
        return busy

    for _ in range(3):  # the tiny model samples: retry if its answer ended before the first audio (rare)
        busy = asyncio.run(talk())
        if busy:
            break
    assert busy == 1
    assert server.wait_idle(timeout=10) == 0 and server.healthy()
