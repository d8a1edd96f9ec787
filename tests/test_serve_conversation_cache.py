"""Conversation KV reuse in the server (issue 13 part 5, issue 15 item 2): a turn of a known conversation
(`Request.conversation`, what /v1/realtime and /api/chat send) prefills only what follows its conversation's last
completed turn; the answers equal, token for token (greedy), those of a scheduler that prefills every turn whole,
while other conversations share the batch; a cancelled turn commits nothing; the cache is bounded and a closed
conversation's entry is dropped. The realtime WebSocket's counters and the freed entry are checked on a real server.
"""
import asyncio
import base64
import json
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from funaudiochat.engine.events import SpeechGroup, TurnEnd
from funaudiochat.engine.generate import Engine
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.presets import tiny
from funaudiochat.serve.realtime_state import Item, conversation_messages, new_id
from funaudiochat.serve.scheduler import Request, Scheduler
from funaudiochat.text.chat import render_chatml
from tests.helpers import make_tiny_tokenizer, noise_audio, words

SYSTEM = words([40, 41, 42])
# each turn: (audio seconds or None, typed word ids)
TURNS_A = [(0.9, [50]), (None, [51, 52]), (0.6, [])]
TURNS_B = [(None, [60, 61]), (0.7, []), (None, [62])]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    torch.manual_seed(0)
    model = FunAudioChatModel(tiny())
    model.init_weights(0.3)
    return Engine(model.eval(), max_seq_len=1024), make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _wav(seconds, seed):
    return noise_audio(seconds, seed)


def _user(turn, seed) -> Item:
    seconds, text = turn
    return Item(new_id("item"), "user", text=words(text) if text else "",
                audio=_wav(seconds, seed) if seconds else None)


def _request(items, mode, conversation, max_new=10) -> Request:
    msgs, audios = conversation_messages(items, None)  # the realtime session's own history -> messages
    return Request(msgs, audios, mode, system=SYSTEM, generation=dict(max_new_tokens=max_new, do_sample=False),
                   audio_out=False, conversation=conversation)


async def _answer(sched, request, cancel_after=None):
    session = await sched.submit(request)
    speech, end, n = [], None, 0
    async for event in session:
        n += 1
        if cancel_after is not None and n == cancel_after:
            session.cancel()
        if isinstance(event, SpeechGroup):
            speech.extend(event.tokens)
        elif isinstance(event, TurnEnd):
            end = event
    return end, speech


async def _converse(sched, turns, mode, conversation, seed, record):
    """Turn after turn, the history kept as /v1/realtime keeps it; record (turn, TurnEnd, speech, prefilled
    tokens, audios encoded) per turn."""
    items = []
    for t, turn in enumerate(turns):
        items.append(_user(turn, seed + t))
        end, speech = await _answer(sched, _request(items, mode, conversation))
        assert end.finish_reason in ("stop", "length")
        record.append((conversation, t, end, speech))
        items.append(Item(new_id("item"), "assistant", text=end.text.strip()))


def _run(engine, tok, mode, **kw):
    """Two conversations of three turns at once on one scheduler (they share its batches)."""
    sched = Scheduler(engine, tok, max_sessions=4, prefill_chunk=16, **kw)
    record = []

    async def main():
        sched.start()
        try:
            await asyncio.gather(_converse(sched, TURNS_A, mode, "A", 10, record),
                                 _converse(sched, TURNS_B, mode, "B", 20, record))
        finally:
            await sched.stop()

    asyncio.run(main())
    return sched, {(c, t): (end, speech) for c, t, end, speech in record}


@pytest.mark.parametrize("mode", ["s2s", "s2t"])
def test_turns_reuse_the_conversation_cache_and_answer_as_whole_prefills(parts, one_thread, mode):
    engine, tok = parts
    n_shared = len(tok.encode(render_chatml([{"role": "system", "content": SYSTEM}], False) + "<|im_start|>user\n"))
    ref_sched, ref = _run(engine, tok, mode, conversation_cache=False)
    sched, mine = _run(engine, tok, mode)
    assert sorted(mine) == sorted(ref)
    for key, (end, speech) in mine.items():
        ref_end, ref_speech = ref[key]
        assert list(end.text_ids) == list(ref_end.text_ids), key
        assert speech == ref_speech, key
        assert (len(speech) > 0) == (mode == "s2s")
    # every later turn started from its conversation's last turn: the history before it was not prefilled again
    assert sched.metrics.conversation_hits.value == 4 and ref_sched.metrics.conversation_hits.value == 0
    for conv in ("A", "B"):
        for t in (1, 2):
            before, end = mine[(conv, t - 1)][0].usage, mine[(conv, t)][0].usage
            if mode == "s2s":  # the last turn's prompt but its last position (its speech-head slots hold speech)
                assert end.cached_tokens == before.prompt_tokens - 1
            else:  # text only: the prompt and the answer ids the history renders alike
                assert before.prompt_tokens <= end.cached_tokens < before.prompt_tokens + len(
                    mine[(conv, t - 1)][0].text_ids)
            assert ref[(conv, t)][0].usage.cached_tokens == n_shared  # (the shared system turn and user opening)
    saved = sum(end.usage.cached_tokens for (c, t), (end, _) in mine.items() if t > 0)
    assert sched.metrics.conversation_tokens_saved.value == saved
    computed = sum(end.usage.prompt_tokens - end.usage.cached_tokens for end, _ in mine.values())
    assert sched.metrics.prefill_tokens.value == computed
    assert len(sched.conversations) == 2 and sched.conversations.nbytes > 0


def test_turn_three_prefills_only_the_new_turn_and_encodes_only_its_audio(parts, one_thread):
    engine, tok = parts
    sched = Scheduler(engine, tok, max_sessions=2, prefill_chunk=16)
    encoded = []
    hook = engine.model.continuous_audio_tower.register_forward_hook(
        lambda mod, args, out: encoded.append(int(args[0].shape[0])))
    items, ends, prefilled = [], [], []

    async def main():
        sched.start()
        try:
            for t, turn in enumerate(TURNS_A):
                items.append(_user(turn, 30 + t))
                encoded.clear()
                before = sched.metrics.prefill_tokens.value
                end, _ = await _answer(sched, _request(items, "s2s", "conv"))
                ends.append((end, sum(encoded)))
                prefilled.append(sched.metrics.prefill_tokens.value - before)
                items.append(Item(new_id("item"), "assistant", text=end.text.strip()))
        finally:
            await sched.stop()

    try:
        asyncio.run(main())
    finally:
        hook.remove()
    (first, enc1), (second, enc2), (third, enc3) = ends
    assert (enc1, enc2, enc3) == (1, 0, 1)  # turn 3: its own audio only, turn 1's keys and values are reused
    # what turn 3 computes: the last position of turn 2's prompt, turn 2's answer as the history renders it, the
    # new user turn -- not the history before
    assert prefilled[2] == third.usage.prompt_tokens - (second.usage.prompt_tokens - 1)
    assert prefilled[2] < third.usage.prompt_tokens // 2


def test_a_cancelled_turn_commits_nothing_and_forget_drops_the_entry(parts, one_thread):
    engine, tok = parts
    sched = Scheduler(engine, tok, max_sessions=2)
    out = {}

    async def main():
        sched.start()
        try:
            items = [_user((0.8, [70]), 40)]
            first, _ = await _answer(sched, _request(items, "s2s", "conv"))
            entry = sched.conversations._entries["conv"]
            items += [Item(new_id("item"), "assistant", text=first.text.strip()), _user((None, [71]), 41)]
            cancelled, _ = await _answer(sched, _request(items, "s2s", "conv", max_new=200), cancel_after=3)
            out.update(first=first, cancelled=cancelled, kept=sched.conversations._entries["conv"] is entry)
            again, _ = await _answer(sched, _request(items, "s2s", "conv"))  # the same turn, asked again
            out["again"] = again
            sched.forget_conversation("conv")
            out["left"] = len(sched.conversations), sched.conversations.nbytes
        finally:
            await sched.stop()

    asyncio.run(main())
    assert out["cancelled"].finish_reason == "cancelled" and len(out["cancelled"].text_ids) < 200
    assert out["kept"]  # the cancelled turn left the first turn's entry as it was
    assert out["cancelled"].usage.cached_tokens == out["first"].usage.prompt_tokens - 1
    assert out["again"].usage.cached_tokens == out["first"].usage.prompt_tokens - 1
    assert out["left"] == (0, 0)


def test_the_cache_is_bounded_in_conversations_and_bytes(parts, one_thread):
    engine, tok = parts

    def three_conversations(**kw):
        sched = Scheduler(engine, tok, max_sessions=2, **kw)

        async def main():
            sched.start()
            try:
                for c in "XYZ":
                    await _answer(sched, _request([_user((None, [80, ord(c)]), 0)], "s2t", c, max_new=4))
                await _answer(sched, _request([_user((None, [80, ord("X")]), 0)], "s2t", "X", max_new=4))
            finally:
                await sched.stop()

        asyncio.run(main())
        return sched

    sched = three_conversations(max_conversations=2)
    assert len(sched.conversations) == 2 and "X" in sched.conversations and "Y" not in sched.conversations
    assert sched.metrics.conversation_hits.value == 0  # X was evicted (least recently used) before it came back
    sizes = [entry.nbytes for entry in sched.conversations._entries.values()]
    limit = min(sizes) * 3 // 2  # room for one entry, not two (entries differ only by their answers' few ids)
    assert max(sizes) <= limit
    sched = three_conversations(max_conversation_bytes=limit)
    assert len(sched.conversations) == 1 and 0 < sched.conversations.nbytes <= limit


# ---------------------------------------------------------------------------------------------- on a real server
def _metric(server, name) -> float:
    status, text = server.get("/metrics")
    assert status == 200
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_realtime_turns_hit_the_cache_and_closing_the_socket_frees_it(tmp_path):
    import websockets

    from funaudiochat.serve.realtime_state import RATE
    from tests.serve_support import running_server

    rng = np.random.default_rng(5)
    questions = [(rng.standard_normal(int(s * RATE)) * 0.1).astype(np.float32) for s in (0.8, 0.5, 0.6)]

    async def talk(server):
        usages, prefilled = [], []
        async with websockets.connect(server.ws + "/v1/realtime", max_size=2 ** 24) as ws:
            async def until(kind):
                while True:
                    event = json.loads(await asyncio.wait_for(ws.recv(), 120))
                    if event["type"] == kind:
                        return event

            await until("session.created")
            await ws.send(json.dumps({"type": "session.update", "session": {
                "turn_detection": None, "modalities": ["text", "audio"], "max_output_tokens": 12}}))
            await until("session.updated")
            for wav in questions:
                before = _metric(server, "funaudiochat_prefill_tokens_total")
                pcm = (np.clip(wav, -1, 1) * 32767).astype("<i2").tobytes()
                await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(pcm).decode()}))
                await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
                await ws.send(json.dumps({"type": "response.create"}))
                done = await until("response.done")
                assert done["response"]["status"] in ("completed", "incomplete"), done
                usages.append(done["response"]["usage"])
                prefilled.append(_metric(server, "funaudiochat_prefill_tokens_total") - before)
            entries = _metric(server, "funaudiochat_conversation_cache_entries")
        return usages, prefilled, entries

    with running_server(tmp_path) as server:
        usages, prefilled, entries_open = asyncio.run(talk(server))
        deadline = time.monotonic() + 10  # (the server sees the socket close a moment after the client)
        while _metric(server, "funaudiochat_conversation_cache_entries") and time.monotonic() < deadline:
            time.sleep(0.1)
        hits = _metric(server, "funaudiochat_conversation_cache_hits_total")
        saved = _metric(server, "funaudiochat_conversation_cache_tokens_saved_total")
        entries_closed = _metric(server, "funaudiochat_conversation_cache_entries")
        assert server.healthy()
    prompts = [u["input_tokens"] for u in usages]
    cached = [u["input_token_details"]["cached_tokens"] for u in usages]
    assert entries_open == 1 and entries_closed == 0  # the closed socket's entry is dropped
    assert hits == 2 and cached[1:] == [prompts[0] - 1, prompts[1] - 1] and saved == sum(cached[1:])
    assert prefilled[2] == prompts[2] - cached[2]  # turn 3: only what follows turn 2's prompt


class _Recorder:
    """Stands in for the scheduler where only the requests /api/chat makes matter: it records them and answers
    each with a short text at once. The protocol code under test is the real one."""

    speech, detokenizer = False, None
    engine = SimpleNamespace(cfg=None)  # a model without its own system prompt: the released one is used

    def __init__(self):
        self.requests, self.forgotten = [], []

    async def submit(self, request):
        from funaudiochat.engine.events import Usage

        self.requests.append(request)

        async def events():
            yield TurnEnd(f"answer {len(self.requests)}", (), (), "stop", Usage(10, 5, 0, 0.0, None, None, 0.1))
        return events()

    def forget_conversation(self, conversation):
        self.forgotten.append(conversation)


def test_api_chat_names_its_conversation_and_trims_its_history_at_once():
    from funaudiochat.serve.api_chat import MAX_TURNS, ApiChatSession

    scheduler = _Recorder()

    async def run():
        session = ApiChatSession(scheduler)
        for turn in range(MAX_TURNS + 6):
            await session._answer(_wav(0.3, turn))
        await session.close()
        return session.conversation

    conversation = asyncio.run(run())
    users = [sum(m["role"] == "user" for m in r.messages) for r in scheduler.requests]
    # up to 8 user turns, then down to 5 at once (4 earlier + the new one), growing again: the history before a
    # trim stays a prefix of the next prompts, so their conversation cache keeps serving them
    assert users == list(range(1, MAX_TURNS + 1)) + [5, 6, 7, 8, 5, 6]
    assert {r.conversation for r in scheduler.requests} == {conversation}
    assert scheduler.forgotten == [conversation]


def test_realtime_trims_a_full_context_once_and_the_cache_serves_the_turns_after(tmp_path, one_thread):
    from funaudiochat.serve.realtime import RealtimeSession

    torch.manual_seed(0)
    model = FunAudioChatModel(tiny())
    model.init_weights(0.3)
    engine = Engine(model.eval(), max_seq_len=200)
    sched = Scheduler(engine, make_tiny_tokenizer(tmp_path / "tok"), max_sessions=1)

    class NoVoices:
        def names(self):
            return []

    async def run():
        sched.start()
        session = RealtimeSession(sched, NoVoices(), can_speak=False)
        session.start()
        done = []
        try:
            async def send(**event):
                await session.on_text(json.dumps(event))

            async def until(kind):
                while True:
                    event = await asyncio.wait_for(session.outbox.get(), 60)
                    if event["type"] == kind:
                        return event

            await send(type="session.update", session={"instructions": SYSTEM, "turn_detection": None,
                                                       "max_output_tokens": 4})
            for turn in range(8):
                await send(type="conversation.item.create", item={"type": "message", "role": "user", "content": [
                    {"type": "input_text", "text": words(range(100 + 30 * turn, 130 + 30 * turn))}]})
                await send(type="response.create")
                done.append((await until("response.done"))["response"])
        finally:
            await session.close()
            await sched.stop()
        return done, session

    done, session = asyncio.run(run())
    assert all(r["status"] in ("completed", "incomplete") for r in done), [r["status_details"] for r in done]
    prompts = [r["usage"]["input_tokens"] for r in done]
    cached = [r["usage"]["input_token_details"]["cached_tokens"] for r in done]
    trims = [t for t in range(1, 8) if prompts[t] < prompts[t - 1]]
    assert trims, prompts  # the context (200) filled up: the prompt was trimmed instead of the answer failing
    n_shared = cached[trims[0]]  # the trimmed prompt is prefilled once, from the shared prefix only
    assert n_shared < 20 and all(c > n_shared for t, c in enumerate(cached) if t and t not in trims)
    for t in trims:
        assert t + 1 >= 8 or cached[t + 1] >= prompts[t] - 1  # the turn after a trim reuses its keys and values
    assert len(trims) < 4  # not every turn: at once, down to half the user turns
    assert len(session.items) == 16  # the client's items stay
    assert len(sched.conversations) == 0  # closed: its entry dropped
