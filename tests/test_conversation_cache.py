"""Conversation KV reuse (issue 15 item 2): a `ChatSession` keeps its last turn's keys and values (LLM and speech
head), so a turn prefills only what follows the cached prompt; its answers equal those of a session that prefills
the whole history every turn (`reuse_cache=False`, the same history policy), text and speech, also across history
trims; a failed or cancelled turn leaves the cache of the last completed turn."""
from __future__ import annotations

import threading

import pytest
import torch

from funaudiochat.engine.events import TextDelta, TurnEnd
from funaudiochat.engine.generate import Engine, GenerationConfig
from funaudiochat.engine.prefix_cache import ConversationCache, position_keys, shared_prefix_len
from funaudiochat.engine.prompt import build_prompt, prompt_ids
from funaudiochat.engine.session import ChatSession
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.presets import tiny
from funaudiochat.text.chat import render_chatml, user_content
from tests.helpers import make_tiny_tokenizer, noise_audio, words

S2S = GenerationConfig(max_new_tokens=8, eos_token_id=511, pad_token_id=500, text_greedy=True, force_text_abos=True)
S2T = S2S.with_(disable_speech=True, force_text_abos=False, eos_token_id=502)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    torch.manual_seed(0)
    model = FunAudioChatModel(tiny())
    model.init_weights(0.3)
    return Engine(model.eval(), max_seq_len=512), make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _wav(seconds, seed):
    return noise_audio(seconds, seed)


# each turn: (audio seconds or None, text word ids)
TURNS = [(0.9, [50]), (None, [51, 52]), (0.6, []), (0.7, [53]), (None, [54]), (0.5, [55])]


def _converse(session, turns=TURNS, check_cache=False):
    """Every turn's TurnEnd, and how many audios the audio encoder saw in each turn. `check_cache`: after each turn
    the kept keys and values (LLM and speech head) equal those of a whole prefill of the turn's prompt."""
    seen = []
    hook = session.engine.model.continuous_audio_tower.register_forward_hook(
        lambda mod, args, out: seen.append(int(args[0].shape[0])))
    ends, encoded = [], []
    try:
        for i, (seconds, text) in enumerate(turns):
            seen.clear()
            audio = _wav(seconds, 10 + i) if seconds else None
            events = list(session.ask(audio=audio, text=words(text) if text else None))
            assert isinstance(events[-1], TurnEnd) and events[-1].finish_reason in ("stop", "length")
            ends.append(events[-1])
            encoded.append(sum(seen))
            if check_cache:
                _check_cache(session)
    finally:
        hook.remove()
    return ends, encoded


def _check_cache(session):
    engine, k = session.engine, session.engine.k
    msgs, audios = session._messages(session.history[:-1])  # the prompt of the turn just answered
    whole, _, _ = engine.prefill(build_prompt(session.tokenizer, engine.cfg, msgs, audios), session.gen)
    state, n = session.cache.state, len(session.cache.keys)
    assert n >= whole.prompt_ids.shape[1] - 1
    n = min(n, whole.prompt_ids.shape[1])  # (with text only, the answer's positions follow)
    for mine, ref in zip(state.llm_cache.k + state.llm_cache.v, whole.llm_cache.k + whole.llm_cache.v):
        torch.testing.assert_close(mine[:, :, :n], ref[:, :, :n], rtol=1e-4, atol=1e-4)
    if whole.srh_cache is not None:
        for mine, ref in zip(state.srh_cache.k + state.srh_cache.v, whole.srh_cache.k + whole.srh_cache.v):
            torch.testing.assert_close(mine[:, :, :k * n], ref[:, :, :k * n], rtol=1e-4, atol=1e-4)


def _same_answers(mine, ref):
    for a, b in zip(mine, ref, strict=True):
        assert a.text_ids == b.text_ids and a.text == b.text and a.speech_codes == b.speech_codes


@pytest.mark.parametrize("gen", [S2S, S2T], ids=["s2s", "s2t"])
def test_reused_turns_answer_as_a_whole_prefill_and_prefill_only_the_new_turn(parts, one_thread, gen):
    engine, tok = parts
    ref, _ = _converse(ChatSession(engine, tok, gen, system=words([33, 34]), reuse_cache=False))
    ends, encoded = _converse(ChatSession(engine, tok, gen, system=words([33, 34])), check_cache=True)
    _same_answers(ends, ref)
    if gen is S2S:
        assert any(e.speech_codes for e in ends), "the speech head must have spoken"
    assert all(r.usage.cached_tokens == 0 for r in ref)
    # only the new turn's audio is encoded (the history's audio lives in the cache)
    assert encoded == [1 if seconds else 0 for seconds, _ in TURNS]
    for prev, end in zip(ends, ends[1:]):
        # the whole previous prompt is reused: with speech on all but its last position (the SRH's sampled group)
        assert end.usage.cached_tokens >= prev.usage.prompt_tokens - (1 if gen is S2S else 0)
        assert end.usage.prompt_tokens - end.usage.cached_tokens < 40  # the new turn (+ the answer as text)
    # a new session on this engine copies the system turn and user opening computed by the first one
    again, _ = _converse(ChatSession(engine, tok, gen, system=words([33, 34])), TURNS[:1])
    assert again[0].usage.cached_tokens == len(tok.encode(f"<|im_start|>system\n{words([33, 34])}<|im_end|>\n"
                                                          f"<|im_start|>user\n"))
    _same_answers(again, ref[:1])


def test_history_trims_reprefill_once_and_answer_as_a_whole_prefill(parts, one_thread):
    """max_turns=4: the 5th turn drops the history to 2 earlier turns (one re-prefill), the 6th reuses it again.
    A context of 100 tokens: the context trims happen on the same turns in both sessions."""
    engine, tok = parts
    for kw in (dict(max_turns=4), dict(max_turns=8, engine=Engine(engine.model, max_seq_len=100))):
        eng = kw.pop("engine", engine)
        ref_session = ChatSession(eng, tok, S2S, system=words([33]), reuse_cache=False, **kw)
        ref, _ = _converse(ref_session)
        session = ChatSession(eng, tok, S2S, system=words([33]), **kw)
        ends, _ = _converse(session)
        _same_answers(ends, ref)
        assert [t.content for t in session.history] == [t.content for t in ref_session.history]
        shrunk = [i for i in range(1, len(ends)) if ends[i].usage.prompt_tokens < ends[i - 1].usage.prompt_tokens]
        assert shrunk, "the history must have been trimmed"
        for i in range(1, len(ends)):
            reused = ends[i].usage.cached_tokens >= ends[i - 1].usage.prompt_tokens - 1
            assert reused == (i not in shrunk)  # a trim re-prefills (only the system turn is reused), once
    users = [t for t in ref_session.history if t.role == "user"]
    assert len(users) < 6


def test_failed_and_cancelled_turns_leave_the_last_completed_turns_cache(parts, one_thread):
    engine, tok = parts
    reference = ChatSession(engine, tok, S2S, system=words([33]))
    expected, _ = _converse(reference, TURNS[:2])

    session = ChatSession(engine, tok, S2S, system=words([33]))
    _converse(session, TURNS[:1])
    cache, history = session.cache, list(session.history)
    cancel = threading.Event()
    cancel.set()
    assert list(session.ask(text=words([70]), cancel=cancel))[-1].finish_reason == "cancelled"
    with pytest.raises(RuntimeError):  # the consumer fails mid-answer
        for event in session.ask(audio=_wav(0.8, 3), text=words([71])):
            if isinstance(event, TextDelta):
                raise RuntimeError("consumer failed")
    stream = session.ask(text=words([72]))  # the consumer walks away
    next(stream)
    stream.close()
    calls = []

    def fail_once(module, args):  # the engine fails in the middle of a prefill
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("engine failed")
    hook = engine.model.language_model.model.register_forward_pre_hook(fail_once)
    try:
        with pytest.raises(RuntimeError, match="engine failed"):
            list(session.ask(audio=_wav(0.8, 4)))
    finally:
        hook.remove()
    assert session.cache is cache and session.history == history
    ends, _ = _converse(session, TURNS[1:2])
    _same_answers(ends, expected[1:])
    assert ends[0].usage.cached_tokens >= expected[0].usage.prompt_tokens - 1


def test_cached_positions_are_named_by_content_not_by_id(parts):
    """Two audios of equal length give equal ids but different keys: a cache never serves one for the other."""
    engine, tok = parts
    cfg, k = engine.cfg, engine.k
    a, b = _wav(0.6, 1), _wav(0.6, 2)
    msgs = [{"role": "system", "content": words([33])}, {"role": "user", "content": user_content(2)}]

    def keys(audios):
        ids, counts = prompt_ids(tok, cfg, msgs, audios)
        return ids, position_keys(ids, audios, counts, cfg.audio_token_index, k)

    ids_ab, keys_ab = keys([a, b])
    ids_aa, keys_aa = keys([a, a])
    assert ids_ab == ids_aa and keys_ab != keys_aa
    first = keys_ab.index((id(b), 0))
    assert keys_aa[first] == (id(a), 0)
    state, _, _ = engine.prefill(build_prompt(tok, cfg, msgs, [a, b]), S2S)
    cache = ConversationCache.commit(state, keys_ab, [a, b])
    shared = cache.prefix(ids_aa, keys_aa, k)
    assert len(shared) == first  # up to the second audio, never into it
    assert len(cache.prefix(ids_ab, keys_ab, k)) == len(ids_ab) - 1



def test_new_conversations_share_the_system_turn_and_the_user_turns_opening(parts):
    """Spoken and typed first turns share the system turn and `<|im_start|>user\n`; what follows differs. Without
    that opening (an assistant turn first) only the system turn is shared, and nothing without the system turn."""
    engine, tok = parts
    system = {"role": "system", "content": words([33, 34])}
    n_system = len(tok.encode(render_chatml([system], False)))
    spoken = tok.encode(render_chatml([system, {"role": "user", "content": user_content(1)}]))
    typed = tok.encode(render_chatml([system, {"role": "user", "content": words([40])}]))
    assistant_first = tok.encode(render_chatml([system, {"role": "assistant", "content": words([41])}]))
    for ids in (spoken, typed):
        n = shared_prefix_len(tok, engine.cfg, system, ids)
        assert n == n_system + len(tok.encode("<|im_start|>user\n")) < len(ids)
        assert spoken[:n] == typed[:n] and spoken[n] != typed[n]
    assert shared_prefix_len(tok, engine.cfg, system, assistant_first) == n_system
    other = {"role": "system", "content": words([35])}
    assert shared_prefix_len(tok, engine.cfg, other, typed) == 0
    assert shared_prefix_len(tok, engine.cfg, system, typed[:n_system + 3]) == n_system  # never the whole prompt
