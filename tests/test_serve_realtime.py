"""/v1/realtime against a real `funaudiochat serve` (tiny random checkpoint + tiny CosyVoice3 folder, so audio
really comes out) with the `websockets` client: a spoken question with server VAD, push-to-talk with the beta
event names, barge-in, and bad input (each case followed by a /health check)."""
import asyncio
import base64
import json
import time

import numpy as np
import pytest
import websockets

from tests.serve_support import running_server, spoken_question

RATE = 24000
KEY = "sk-realtime-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("realtime"), "--api-key", KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def question():
    return spoken_question(RATE, silence_before=0.5, silence_after=1.2)


def pcm16(samples: np.ndarray) -> str:
    return base64.b64encode((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()).decode()


class Client:
    """A realtime connection: send events, wait for the next event of a type (everything seen is kept)."""

    def __init__(self, ws):
        self.ws, self.seen = ws, []

    async def send(self, **event):
        await self.ws.send(json.dumps(event))

    async def speak(self, samples: np.ndarray, chunk: int = 960):
        for i in range(0, len(samples), chunk):
            await self.send(type="input_audio_buffer.append", audio=pcm16(samples[i:i + chunk]))

    async def next(self, kind: str, timeout: float = 90.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            event = json.loads(await asyncio.wait_for(self.ws.recv(), max(0.1, deadline - time.monotonic())))
            event["_t"] = time.monotonic()
            self.seen.append(event)
            if event["type"] == kind:
                return event

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.seen if e["type"] == kind]


def connect(server, key: str | None = KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kw.pop("additional_headers", {}))
    return websockets.connect(server.ws + "/v1/realtime", max_size=2 ** 24, additional_headers=headers, **kw)


def audio_ms(events) -> float:
    return sum(len(base64.b64decode(e["delta"])) // 2 for e in events) * 1000 / RATE


def test_spoken_question_with_server_vad(server, question):
    async def talk():
        async with connect(server) as ws:
            c = Client(ws)
            created = await c.next("session.created")
            assert created["session"]["turn_detection"]["type"] == "server_vad"  # hands-free by default
            await c.send(type="session.update", session={
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 400, "prefix_padding_ms": 300},
                "max_response_output_tokens": 40})
            await c.next("session.updated")
            await c.speak(question)
            started = await c.next("input_audio_buffer.speech_started")
            stopped = await c.next("input_audio_buffer.speech_stopped")
            committed = await c.next("input_audio_buffer.committed")
            done = await c.next("response.done")
            return c, started, stopped, committed, done

    c, started, stopped, committed, done = asyncio.run(talk())
    speech_s = (len(question) / RATE) - 0.5 - 1.2
    assert 350 <= started["audio_start_ms"] <= 700  # the question starts 0.5 s into the stream
    assert abs(stopped["audio_end_ms"] - (500 + speech_s * 1000)) < 400
    assert started["item_id"] == stopped["item_id"] == committed["item_id"]
    assert done["response"]["status"] in ("completed", "incomplete")  # incomplete: the 40-token limit
    text = "".join(e["delta"] for e in c.of("response.output_audio_transcript.delta"))
    item = done["response"]["output"][0]
    assert text.strip() and item["content"][0]["transcript"] == text.strip()
    deltas = c.of("response.output_audio.delta")
    # real audio from the tiny detokenizer: its sampled random head may end its speech after the first chunks
    # (400 ms seen once in CI), so no more than that is asked
    assert deltas and audio_ms(deltas) >= 200
    assert not c.of("response.audio.delta") and not c.of("error")
    assert done["response"]["usage"]["output_token_details"]["audio_tokens"] > 0
    assert server.wait_idle() == 0 and server.healthy()


def _metric(server, name: str) -> float:
    status, text = server.get("/metrics")
    assert status == 200
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


def _text_of(c: Client) -> str:
    return "".join(e["delta"] for e in c.of("response.output_text.delta"))


async def _text_session(ws, turn_detection, max_tokens: int) -> Client:
    """A session answering in text, with these turn-detection settings."""
    c = Client(ws)
    await c.next("session.created")
    await c.send(type="session.update", session={"turn_detection": turn_detection, "modalities": ["text"],
                                                 "max_response_output_tokens": max_tokens})
    await c.next("session.updated")
    return c


def test_an_early_answer_is_the_answer_its_audio_gets_when_committed(server, question):
    """Server VAD: the answer starts 200 ms into the silence that ends the turn, while the VAD waits out the rest;
    the turn's audio ends there. The text answer equals the one that the same samples get through push-to-talk."""
    vad = {"type": "server_vad", "silence_duration_ms": 600, "prefix_padding_ms": 300}

    async def hands_free():
        async with connect(server) as ws:
            c = await _text_session(ws, vad, 10)
            await c.speak(question)
            started = await c.next("input_audio_buffer.speech_started")
            stopped = await c.next("input_audio_buffer.speech_stopped")
            await c.next("response.done")
            return c, started, stopped

    async def push_to_talk(samples):
        async with connect(server) as ws:
            c = await _text_session(ws, None, 10)
            await c.speak(samples)
            await c.send(type="input_audio_buffer.commit")
            await c.next("input_audio_buffer.committed")
            await c.send(type="response.create")
            await c.next("response.done")
            return c

    used, dropped = (_metric(server, f"funaudiochat_realtime_early_answers{k}_total") for k in ("", "_dropped"))
    early, started, stopped = asyncio.run(hands_free())
    assert _metric(server, "funaudiochat_realtime_early_answers_total") == used + 1
    assert _metric(server, "funaudiochat_realtime_early_answers_dropped_total") == dropped
    first = (started["audio_start_ms"] - vad["prefix_padding_ms"]) * RATE // 1000
    cut = (stopped["audio_end_ms"] + 200) * RATE // 1000
    committed = asyncio.run(push_to_talk(question[first:cut]))
    assert _text_of(early).strip() and _text_of(early) == _text_of(committed)
    assert server.wait_idle() == 0 and server.healthy()


def test_an_early_answer_is_dropped_when_the_user_speaks_on(server, question):
    """A pause longer than 200 ms but shorter than the VAD's silence starts an answer; the user speaks on, so it is
    dropped, and the one turn (both parts) gets one answer."""
    speech = question[int(0.5 * RATE):-int(1.2 * RATE)]
    pause = np.zeros(int(0.4 * RATE), np.float32)
    stream = np.concatenate([np.zeros(int(0.5 * RATE), np.float32), speech, pause, speech,
                             np.zeros(int(1.2 * RATE), np.float32)])
    dropped = _metric(server, "funaudiochat_realtime_early_answers_dropped_total")

    async def talk():
        async with connect(server) as ws:
            c = await _text_session(ws, {"type": "server_vad", "silence_duration_ms": 700}, 6)
            await c.speak(stream)
            await c.next("response.done")
            await asyncio.sleep(0.5)  # (anything more would come now)
            return c

    c = asyncio.run(talk())
    assert len(c.of("input_audio_buffer.committed")) == 1 and len(c.of("response.created")) == 1
    stopped = c.of("input_audio_buffer.speech_stopped")[0]
    assert stopped["audio_end_ms"] > 500 + len(speech) * 1000 / RATE + 400  # one turn over both parts
    assert _metric(server, "funaudiochat_realtime_early_answers_dropped_total") >= dropped + 1
    assert server.wait_idle() == 0 and server.healthy()


def test_early_answers_off_answer_at_the_turns_end(tmp_path, question):
    """`serve --early-answer-ms 0`: no answer starts during the silence; the turn is answered when the VAD ends it."""
    with running_server(tmp_path, "--early-answer-ms", "0") as srv:
        async def talk():
            async with websockets.connect(srv.ws + "/v1/realtime", max_size=2 ** 24) as ws:
                c = await _text_session(ws, {"type": "server_vad", "silence_duration_ms": 600}, 6)
                await c.speak(question)
                await c.next("response.done")
                return c

        c = asyncio.run(talk())
        assert len(c.of("input_audio_buffer.committed")) == 1 and _text_of(c).strip()
        assert _metric(srv, "funaudiochat_realtime_early_answers_total") == 0
        assert _metric(srv, "funaudiochat_realtime_early_answers_dropped_total") == 0


@pytest.mark.parametrize("key", [None, "sk-wrong"])
def test_missing_or_wrong_api_key_is_refused(server, key):
    async def talk():
        async with connect(server, key=key) as ws:
            error = json.loads(await ws.recv())
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            return error, closed.value.rcvd.code

    error, code = asyncio.run(talk())
    assert error["type"] == "error" and error["error"]["code"] == "invalid_api_key" and code == 1008
    assert server.healthy()


def test_browser_style_key_in_a_subprotocol(server):
    async def talk():
        async with connect(server, key=None, subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"]) as ws:
            return ws.subprotocol, json.loads(await ws.recv())

    subprotocol, created = asyncio.run(talk())
    assert subprotocol == "realtime" and created["type"] == "session.created"


def test_push_to_talk_with_beta_event_names_and_text_only(server, question):
    async def talk():
        async with connect(server, additional_headers={"OpenAI-Beta": "realtime=v1"}) as ws:
            c = Client(ws)
            await c.next("session.created")
            await c.send(type="session.update", session={"turn_detection": None, "voice": "中文男"})
            assert (await c.next("session.updated"))["session"]["turn_detection"] is None
            await c.speak(question)
            await c.send(type="input_audio_buffer.commit")
            await c.next("input_audio_buffer.committed")
            await c.send(type="response.create", response={"max_output_tokens": 12})
            spoken = await c.next("response.done")
            await c.send(type="conversation.item.create", item={
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "w40 w41"}]})
            await c.send(type="response.create", response={"modalities": ["text"], "max_output_tokens": 8})
            written = await c.next("response.done")
            return c, spoken, written

    c, spoken, written = asyncio.run(talk())
    assert not c.of("input_audio_buffer.speech_started")  # push-to-talk: no VAD events
    assert c.of("response.audio.delta") and c.of("response.audio_transcript.delta") and c.of("response.text.delta")
    assert not [e for e in c.seen if e["type"].startswith("response.output_") and e["type"].endswith(".delta")]
    assert spoken["response"]["output"][0]["content"][0]["type"] == "output_audio"
    assert written["response"]["output"][0]["content"][0]["type"] == "output_text"
    assert written["response"]["usage"]["output_token_details"]["audio_tokens"] == 0
    assert server.healthy()


def test_barge_in_cancels_and_truncates_to_what_was_played(server, question):
    async def talk():
        async with connect(server) as ws:
            c = Client(ws)
            await c.next("session.created")
            await c.send(type="session.update", session={
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 400},
                "max_response_output_tokens": 400})
            await c.next("session.updated")
            await c.speak(question)
            first = await c.next("response.created")
            await c.next("response.output_audio.delta")
            await asyncio.sleep(0.2)  # the client "plays" the answer for a while, then talks over it
            await c.speak(question)
            barge = await c.next("input_audio_buffer.speech_started")
            if c.of("response.done"):
                return None  # this random model's answer had already ended: nothing to interrupt
            cancelled = await c.next("response.done")
            truncated = c.of("conversation.item.truncated")
            second = await c.next("response.created")  # the interrupting question gets its own answer
            await c.send(type="response.cancel")
            cancelled_by_client = await c.next("response.done")
            return c, first, barge, cancelled, truncated, second, cancelled_by_client

    for _ in range(3):  # the tiny model samples: an answer may end before the barge-in (rare); try again
        outcome = asyncio.run(talk())
        if outcome is not None:
            break
    c, first, barge, cancelled, truncated, second, by_client = outcome
    body = cancelled["response"]
    assert body["id"] == first["response"]["id"] and body["status"] == "cancelled"
    assert body["status_details"]["reason"] == "turn_detected"
    assert cancelled["_t"] - barge["_t"] < 5.0  # the engine stopped it at its next step, not at the end
    assert body["usage"]["output_token_details"]["text_tokens"] < 400
    sent_ms = audio_ms([e for e in c.of("response.output_audio.delta") if e["response_id"] == body["id"]])
    (cut,) = truncated
    item = body["output"][0]
    assert cut["item_id"] == item["id"] and 0 < cut["audio_end_ms"] <= sent_ms + 1
    full = "".join(e["delta"] for e in c.of("response.output_audio_transcript.delta")
                   if e["response_id"] == body["id"])
    kept = item["content"][0]["transcript"]
    assert full.strip().startswith(kept) and len(kept) < len(full.strip())  # history keeps what was heard
    assert second["response"]["id"] != body["id"]
    assert by_client["response"]["status"] == "cancelled"
    assert by_client["response"]["status_details"]["reason"] == "client_cancelled"
    assert server.wait_idle() == 0 and server.healthy()


BAD_EVENTS = [  # (what is sent, the error code expected)
    ("not json {", "invalid_json"),
    ("[1, 2, 3]", "invalid_event"),
    (json.dumps({"no_type": True}), "unknown_event_type"),
    (json.dumps({"type": "session.explode"}), "unknown_event_type"),
    (json.dumps({"type": "input_audio_buffer.commit"}), "input_audio_buffer_commit_empty"),  # out of order
    (json.dumps({"type": "response.cancel"}), "response_cancel_not_active"),  # out of order
    (json.dumps({"type": "response.create"}), "conversation_empty"),  # out of order
    (json.dumps({"type": "conversation.item.truncate", "item_id": "item_nope", "audio_end_ms": 5}), "item_not_found"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "@@not base64@@"}), "invalid_value"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()}), "invalid_value"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": 12}), "invalid_value"),
    (json.dumps({"type": "session.update", "session": {"voice": "nobody"}}), "invalid_value"),
    (json.dumps({"type": "session.update", "session": {"turn_detection": {"type": "semantic_magic"}}}),
     "invalid_value"),
    (json.dumps({"type": "session.update", "session": {"tools": [{"type": "function"}]}}), "invalid_value"),
    (json.dumps({"type": "session.update", "session": {"modalities": ["video"]}}), "invalid_value"),
    (json.dumps({"type": "session.update", "session": {"temperature": "hot"}}), "invalid_value"),
    (json.dumps({"type": "session.update", "session": "nope"}), "invalid_value"),
    (json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": []}}),
     "invalid_value"),
    (json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "robot",
                                                              "content": [{"type": "input_text", "text": "x"}]}}),
     "invalid_value"),
    (b"\x00\x01binary where text is expected", "binary_not_supported"),
]


@pytest.mark.parametrize("frame,code", BAD_EVENTS, ids=[f"bad{i}" for i in range(len(BAD_EVENTS))])
def test_bad_event_gets_an_error_event_and_the_session_goes_on(server, frame, code):
    async def talk():
        async with connect(server) as ws:
            c = Client(ws)
            await c.next("session.created")
            await ws.send(frame)
            error = await c.next("error", timeout=10)
            await c.send(type="session.update", session={"instructions": "still here"}, event_id="ev_ok")
            updated = await c.next("session.updated", timeout=10)
            return error, updated

    error, updated = asyncio.run(talk())
    assert error["error"]["code"] == code and error["error"]["message"]
    assert updated["session"]["instructions"] == "still here"
    assert server.healthy()


def test_audio_past_the_turn_limit_is_refused(server):  # a 2-hour stream stops at 10 minutes
    from funaudiochat.serve.realtime_state import MAX_BUFFER_S

    minute = pcm16(np.zeros(60 * RATE, np.float32) + 0.01)

    async def talk():
        async with connect(server) as ws:
            c = Client(ws)
            await c.next("session.created")
            await c.send(type="session.update", session={"turn_detection": None})
            await c.next("session.updated")
            for _ in range(int(MAX_BUFFER_S // 60) + 1):  # one minute per event, until the buffer refuses
                await c.send(type="input_audio_buffer.append", audio=minute)
            error = await c.next("error", timeout=60)
            await c.send(type="input_audio_buffer.clear")
            await c.next("input_audio_buffer.cleared")
            return error

    error = asyncio.run(talk())
    assert error["error"]["code"] == "input_audio_buffer_full" and "commit or clear" in error["error"]["message"]
    assert server.healthy()


def test_response_create_while_one_runs_is_refused(server, question):
    async def talk():
        async with connect(server) as ws:
            c = Client(ws)
            await c.next("session.created")
            await c.send(type="session.update", session={"turn_detection": None})
            await c.speak(question)
            await c.send(type="input_audio_buffer.commit")
            await c.send(type="response.create", response={"max_output_tokens": 300})
            await c.next("response.created")
            await c.send(type="response.create", event_id="ev_twice")
            error = await c.next("error")
            await c.send(type="response.cancel")
            done = await c.next("response.done")
            return error, done

    error, done = asyncio.run(talk())
    assert error["error"]["code"] == "conversation_already_has_active_response"
    assert error["error"]["event_id"] == "ev_twice" and done["response"]["status"] == "cancelled"
    assert server.wait_idle() == 0 and server.healthy()


def test_client_that_disconnects_mid_stream_frees_its_session(server, question):
    async def talk():
        ws = await connect(server)
        c = Client(ws)
        await c.next("session.created")
        await c.send(type="session.update", session={"turn_detection": None})
        await c.speak(question)
        await c.send(type="input_audio_buffer.commit")
        await c.send(type="response.create", response={"max_output_tokens": 400})
        await c.next("response.output_audio.delta")
        busy = server.sessions()
        ws.transport.abort()  # gone without a close handshake
        return busy

    for _ in range(3):  # the tiny model samples: retry if its answer ended before the first audio (rare)
        busy = asyncio.run(talk())
        if busy:
            break
    assert busy == 1
    assert server.wait_idle(timeout=10) == 0
    assert server.healthy()


class RawClient:
    """A WebSocket client on a plain socket (websockets' sans-I/O protocol) that reads only when told to: the
    client that never reads. A small receive buffer makes the server's sends block soon."""

    def __init__(self, server, path: str):
        import socket

        from websockets.client import ClientProtocol
        from websockets.protocol import State
        from websockets.uri import parse_uri

        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        host, port = server.url.removeprefix("http://").split(":")
        self.sock.connect((host, int(port)))
        self.proto = ClientProtocol(parse_uri(server.ws + path), max_size=None)
        request = self.proto.connect()
        request.headers["Authorization"] = f"Bearer {KEY}"
        self.proto.send_request(request)
        self.flush()
        while self.proto.state == State.CONNECTING:
            data = self.sock.recv(4096)
            assert data, "the server closed the connection during the handshake"
            self.proto.receive_data(data)
        assert self.proto.state == State.OPEN, self.proto.handshake_exc

    def flush(self):
        self.sock.sendall(b"".join(self.proto.data_to_send()))

    def send(self, **event):
        self.proto.send_text(json.dumps(event).encode())
        self.flush()


def test_client_that_never_reads_is_dropped_and_its_answer_cancelled(server, question):
    client = RawClient(server, "/v1/realtime")
    try:
        client.send(type="session.update", session={"turn_detection": None})
        for i in range(0, len(question), 24000):
            client.send(type="input_audio_buffer.append", audio=pcm16(question[i:i + 24000]))
        client.send(type="input_audio_buffer.commit")
        client.send(type="response.create", response={"max_output_tokens": 900})  # about a minute of work
        for _ in range(12):  # session.updated echoes the instructions: 12 MB of events nobody reads
            client.send(type="session.update", session={"instructions": "x" * 1_000_000})
        assert server.healthy()  # the server goes on serving others meanwhile
        # The session ends and its answer is cancelled by whichever comes first: the stuck send times out
        # (ws_pump.SEND_TIMEOUT_S), or the answer's events overflow the session's outbox (realtime.OUTBOX_SIZE; a
        # fast machine makes 1024 events before the timeout). Wait for either log line first: until the server has
        # read response.create, no session holds a row either.
        dropped = ("/v1/realtime: sending failed (TimeoutError); closing",
                   "the client does not read its events; disconnecting")
        deadline = time.monotonic() + 60
        while not any(line in server.log.read_text() for line in dropped):
            assert time.monotonic() < deadline, \
                f"the stuck client was not dropped within 60 s; the server's log ends:\n{server.log.read_text()[-3000:]}"
            time.sleep(0.2)
        assert server.wait_idle(timeout=25) == 0
    finally:
        client.sock.close()
    assert server.healthy()


# ---------------------------------------------------------------------------------------------- protocol units
def test_heard_text_keeps_the_text_of_the_heard_steps():
    from funaudiochat.serve.realtime_state import heard_text

    text = "Paris is the capital."
    marks = [(0, 5), (0, 8), (6, 12), (12, 20), (18, 21)]  # (speech tokens before the delta, text length after)
    assert heard_text(text, marks, 0) == ""
    assert heard_text(text, marks, 40) == "Paris is"  # 1 token heard: only text from before any speech
    assert heard_text(text, marks, 280) == "Paris is the"  # 7 tokens heard
    assert heard_text(text, marks, 10_000) == text


class ScriptedScheduler:
    """Stands in for the engine where a tiny random model cannot produce the needed answer: each submitted request
    answers with the next scripted text. The protocol code under test is the real one."""

    speech, detokenizer = False, None

    def __init__(self, answers):
        self.answers, self.requests = list(answers), []

    def forget_conversation(self, conversation):
        pass

    def speech_trails_text(self, session):
        return 0

    async def submit(self, request):
        from funaudiochat.engine.events import TextDelta, TurnEnd, Usage

        self.requests.append(request)
        text = self.answers.pop(0)

        async def events():
            for i in range(0, len(text), 7):
                yield TextDelta(text[i:i + 7])
            yield TurnEnd(text, (), (), "stop", Usage(10, 5, 0, 0.0, None, None, 0.1))
        return events()


class NoVoices:
    def names(self):
        return []


def test_tool_call_becomes_function_call_events_and_its_output_goes_back_to_the_model():
    from funaudiochat.serve.realtime import RealtimeSession

    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    scheduler = ScriptedScheduler([call, "It is sunny in Paris."])
    tools = [{"type": "function", "name": "get_weather", "description": "weather now",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]

    async def run():
        session = RealtimeSession(scheduler, NoVoices(), can_speak=False)
        session.start()
        events = []

        async def send(**event):
            await session.on_text(json.dumps(event))

        async def until(kind):
            while True:
                event = await asyncio.wait_for(session.outbox.get(), 10)
                events.append(event)
                if event["type"] == kind:
                    return event

        await send(type="session.update", session={"tools": tools, "turn_detection": None})
        await send(type="conversation.item.create", item={"type": "message", "role": "user",
                                                          "content": [{"type": "input_text", "text": "Weather?"}]})
        await send(type="response.create")
        args = await until("response.function_call_arguments.done")
        first = await until("response.done")
        await send(type="conversation.item.create", item={"type": "function_call_output", "call_id": args["call_id"],
                                                          "output": '{"sky": "sunny"}'})
        await send(type="response.create")
        second = await until("response.done")
        await session.close()
        return events, args, first, second

    events, args, first, second = asyncio.run(run())
    assert args["name"] == "get_weather" and json.loads(args["arguments"]) == {"city": "Paris"}
    assert first["response"]["status"] == "completed"
    assert [o["type"] for o in first["response"]["output"]] == ["message", "function_call"]
    assert not [e for e in events if e["type"] == "response.output_text.delta" and "tool_call" in e["delta"]]
    assert scheduler.requests[0].mode == "s2t" and scheduler.requests[0].tools == tools
    history = scheduler.requests[1].messages
    assert '"name": "get_weather"' in history[-2]["content"]  # the call, as the model wrote it
    assert history[-1] == {"role": "user", "content": '<tool_response>\n{"sky": "sunny"}\n</tool_response>'}
    assert second["response"]["output"][0]["content"][0]["text"] == "It is sunny in Paris."
