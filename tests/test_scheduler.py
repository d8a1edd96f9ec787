"""The serving scheduler: sessions that join and leave a running batch compute what they compute alone; cancellation
frees the row; a full server refuses with 429 / 503; audio chunks come out per session."""
import asyncio

import numpy as np
import pytest
import torch

from funaudiochat.engine.events import AudioChunk, SpeechGroup, TextDelta, TurnEnd
from funaudiochat.engine.generate import Engine
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.presets import tiny
from funaudiochat.serve.scheduler import Request, Scheduler, ServerBusyError
from funaudiochat.text.chat import user_content
from tests.helpers import make_tiny_tokenizer, words, write_tiny_detokenizer


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    torch.manual_seed(0)
    model = FunAudioChatModel(tiny())
    model.init_weights(0.3)
    tok = make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    return Engine(model.eval()), tok


def _audio(seconds, seed):
    return (np.random.default_rng(seed).standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)


def _request(seconds, seed, max_new, text=None, **kw):
    msgs = [{"role": "system", "content": words([40, 41])}, {"role": "user", "content": user_content(1, text)}]
    gen = dict(max_new_tokens=max_new, do_sample=False)
    return Request(msgs, [_audio(seconds, seed)], mode="s2s", generation=gen, audio_out=False, **kw)


async def _collect(session, started: asyncio.Event | None = None, after: int = 0):
    text_ids, speech, end = [], [], None
    n = 0
    async for ev in session:
        n += 1
        if started is not None and n >= after:
            started.set()
        if isinstance(ev, SpeechGroup):
            speech.extend(ev.tokens)
        elif isinstance(ev, TurnEnd):
            end = ev
    return end, speech


def test_sessions_joining_and_leaving_a_batch_equal_single_runs(parts, one_thread):
    engine, tok = parts
    sched = Scheduler(engine, tok, max_sessions=4)
    requests = [_request(1.2, 1, 40), _request(0.4, 2, 6, words([77, 78])), _request(0.8, 3, 14)]
    singles = []
    for req in requests:
        prompt, gen = sched.prepare(req)
        out = engine.generate(prompt, gen)
        singles.append((out.new_text_ids[0].tolist(), out.speech_ids[0]))
    assert len(singles[0][0]) > 20, "the first answer must run long enough for the others to join it"

    async def main():
        sched.start()
        try:
            a_started, b_started = asyncio.Event(), asyncio.Event()
            a = asyncio.create_task(_collect(await sched.submit(requests[0]), a_started, after=4))
            await a_started.wait()   # A is decoding: B joins its batch, finishes early and leaves
            b = asyncio.create_task(_collect(await sched.submit(requests[1]), b_started, after=2))
            await b_started.wait()
            c = asyncio.create_task(_collect(await sched.submit(requests[2])))  # C joins A (and maybe B)
            return await asyncio.gather(a, b, c)
        finally:
            await sched.stop()

    results = asyncio.run(main())
    for (end, speech), (ids, single_speech) in zip(results, singles):
        assert list(end.text_ids) == ids
        assert speech == single_speech
        assert len(speech) > 0
    assert results[1][0].finish_reason == "length"  # B left the batch while A kept going
    counts = sched.metrics.batch_rows.counts
    assert sum(counts[1:]) > 0, "some decode step must have run several sessions as one batch"
    assert sched.active_sessions == 0 and not sched._batches


def test_cancel_frees_the_row_and_others_continue(parts, one_thread):
    engine, tok = parts
    sched = Scheduler(engine, tok, max_sessions=2)
    keep_req, drop_req = _request(1.0, 4, 30), _request(0.6, 5, 200)
    prompt, gen = sched.prepare(keep_req)
    single = engine.generate(prompt, gen).new_text_ids[0].tolist()

    async def main():
        sched.start()
        try:
            drop = await sched.submit(drop_req)
            keep = asyncio.create_task(_collect(await sched.submit(keep_req)))
            events = 0
            async for ev in drop:
                events += 1
                if events == 3:
                    drop.cancel()
                if isinstance(ev, TurnEnd):
                    dropped = ev
            return dropped, await keep
        finally:
            await sched.stop()

    dropped, (kept, _) = asyncio.run(main())
    assert dropped.finish_reason == "cancelled" and len(dropped.text_ids) < 200
    assert list(kept.text_ids) == single
    assert sched.active_sessions == 0 and not sched._batches


def test_a_full_server_refuses_with_retry_after(parts, one_thread):
    engine, tok = parts
    sched = Scheduler(engine, tok, max_sessions=1, max_waiting=1, wait_timeout_s=0.3)

    async def main():
        sched.start()
        try:
            first = await sched.submit(_request(0.6, 6, 400))
            waiting = asyncio.create_task(sched.submit(_request(0.6, 7, 4)))
            await asyncio.sleep(0.05)
            with pytest.raises(ServerBusyError) as full:   # the waiting room (1) is taken: 429 at once
                await sched.submit(_request(0.6, 8, 4))
            with pytest.raises(ServerBusyError) as late:   # the waiting one times out: 503
                await waiting
            first.cancel()
            async for ev in first:
                pass
            again = await sched.submit(_request(0.6, 9, 3))  # once the row is free, a new session runs
            end, _ = await _collect(again)
            return full.value, late.value, end
        finally:
            await sched.stop()

    full, late, end = asyncio.run(main())
    assert full.status == 429 and full.retry_after >= 1
    assert late.status == 503 and late.retry_after >= 1
    assert end.finish_reason in ("stop", "length")


def test_audio_chunks_stream_per_session(parts, tmp_path, one_thread):
    from funaudiochat.speech.detokenizer import Detokenizer

    engine, tok = parts
    detok = Detokenizer.from_dir(write_tiny_detokenizer(tmp_path / "cosyvoice"))
    sched = Scheduler(engine, tok, detok, max_sessions=2, detokenizer_hop=10)

    async def run_one(req):
        events = [ev async for ev in await sched.submit(req)]
        return events

    async def main():
        sched.start()
        try:
            reqs = [_request(0.8, 10, 10, voice="中文男"), _request(0.6, 11, 10)]
            for r in reqs:
                r.audio_out = True
            return await asyncio.gather(*(run_one(r) for r in reqs))
        finally:
            await sched.stop()

    for events in asyncio.run(main()):
        chunks = [ev.samples for ev in events if isinstance(ev, AudioChunk)]
        end = events[-1]
        assert isinstance(end, TurnEnd) and len(end.speech_codes) > 0
        assert len(chunks) >= 2  # streamed in pieces, not one block at the end
        assert end.audio is not None and end.audio.size == sum(c.size for c in chunks)
        assert end.usage.first_audio_s is not None
        assert not any(isinstance(ev, TextDelta) and not ev.text for ev in events)


def test_stop_strings_across_text_pieces_are_never_sent():
    from funaudiochat.serve.scheduler import _StopFilter

    f = _StopFilter(["cde", "xyz"])
    assert f.push("abc") == ("ab", False)   # "c" may start "cde": held
    assert f.push("d") == ("", False)
    assert f.push("ef") == ("", True)       # "cde" found: the text ends before it
    assert f.text == "ab"
    g = _StopFilter(["cde"])
    assert g.push("abc") == ("ab", False) and g.push("x") == ("cx", False) and g.flush() == ""
    h = _StopFilter([])
    assert h.push("abc") == ("abc", False)


def test_an_engine_failure_ends_its_sessions_and_the_scheduler_goes_on(parts, one_thread, monkeypatch):
    from funaudiochat.serve.scheduler import EngineFailure

    engine, tok = parts
    sched = Scheduler(engine, tok, max_sessions=2)
    real = engine.forward_step
    calls = {"n": 0}

    def failing_once(*args, **kw):  # a fault injected into one decode step (e.g. out of memory)
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected fault")
        return real(*args, **kw)

    monkeypatch.setattr(engine, "forward_step", failing_once)

    async def main():
        sched.start()
        try:
            with pytest.raises(EngineFailure, match="injected fault"):
                await _collect(await sched.submit(_request(0.6, 12, 20)))
            end, _ = await _collect(await sched.submit(_request(0.6, 13, 4)))
            return end
        finally:
            await sched.stop()

    end = asyncio.run(main())
    assert end.finish_reason in ("stop", "length") and sched.alive is False and sched.active_sessions == 0


def test_sixteen_conversations_of_three_turns_all_complete(parts, one_thread):
    """8 rows, 8 more waiting: 16 concurrent conversations x 3 turns finish with no error and free every row."""
    engine, tok = parts
    sched = Scheduler(engine, tok, max_sessions=8, max_waiting=8, wait_timeout_s=120)

    async def conversation(c):
        history = [{"role": "system", "content": words([40, 41])}]
        for turn in range(3):
            history.append({"role": "user", "content": words([50 + c, 100 + turn])})
            req = Request(list(history), mode="s2t", generation=dict(max_new_tokens=4 + c % 5))
            end = [ev async for ev in await sched.submit(req)][-1]
            assert isinstance(end, TurnEnd) and end.finish_reason in ("stop", "length")
            history.append({"role": "assistant", "content": end.text.strip()})
        return len(history)

    async def main():
        sched.start()
        try:
            return await asyncio.gather(*(conversation(c) for c in range(16)))
        finally:
            await sched.stop()

    assert asyncio.run(main()) == [7] * 16
    assert sched.active_sessions == 0 and sched.metrics.rejected.value == 0
    assert sum(sched.metrics.batch_rows.counts[2:]) > 0  # steps of 3 or more sessions at once
