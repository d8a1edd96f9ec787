"""IncrementalAudio: a clip encoded chunk by chunk as it arrives gives the whole clip's 5 Hz vectors (float32
rounding), including when the log-mel floor (clip maximum - 8) rises after earlier chunks were encoded; ChatSession
answers the same from it as from the whole clip."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from funaudiochat.engine.events import TurnEnd
from funaudiochat.engine.generate import Engine, GenerationConfig
from funaudiochat.engine.incremental_audio import IncrementalAudio
from funaudiochat.engine.prompt import build_prompt
from funaudiochat.engine.session import ChatSession
from funaudiochat.errors import InputError
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.presets import tiny
from funaudiochat.text.chat import user_content
from tests.helpers import make_tiny_tokenizer, words


def _model(mode="replace", n_window=100):
    torch.manual_seed(0)
    cfg = tiny(mode=mode)
    cfg.audio_config.n_window = n_window
    model = FunAudioChatModel(cfg)
    model.init_weights(0.3)
    return model.eval()


def _clip(seconds, seed=0, quiet_start=True):
    """Noise whose first half is 100 dB quieter: the log-mel floor (clip maximum - 8) rises after 2 s, above the
    values of the quiet chunks."""
    n = int(seconds * 16000)
    level = np.ones(n, np.float32)
    if quiet_start:
        level[: n // 2] = 1e-5
    return (np.random.default_rng(seed).standard_normal(n) * 0.1 * level).astype(np.float32)


def _whole(model, tok, wav):
    """The 5 Hz vectors of the whole clip, as a prefill computes them."""
    p = build_prompt(tok, model.cfg, [{"role": "user", "content": user_content(1, None)}], [wav])
    with torch.no_grad():
        out = model.encode_audio(p.speech_ids, p.speech_attention_mask, p.input_features, p.feature_attention_mask,
                                 p.feature_exist_mask)
    return out.features[0, : int(out.n_groups[0])]


def _feed(inc, wav, seed=0):
    """Feed the clip in pieces of random sizes (6 ms to 0.6 s), as audio arrives over a network."""
    rng, pos = np.random.default_rng(seed), 0
    while pos < len(wav):
        step = int(rng.integers(100, 9600))
        inc.add(wav[pos:pos + step])
        pos += step


@pytest.mark.parametrize("mode", ["replace", "add"])
@pytest.mark.parametrize("seconds", [4.33, 6.0, 30.0, 31.7])  # partial last chunk; whole chunks only; a clip that
# fills its 30 s window exactly (the end is reflected, not zero padded); past 30 s
def test_chunk_by_chunk_equals_whole_clip(tmp_path, one_thread, mode, seconds):
    tok = make_tiny_tokenizer(tmp_path)
    model = _model(mode)
    wav = _clip(seconds)
    inc = IncrementalAudio(model)
    _feed(inc, wav)
    ahead = inc.encoded_seconds
    assert ahead >= 2 * (int(seconds) // 2) - 2  # every chunk but the last was encoded before the end
    same_wav, groups = inc.finish()
    np.testing.assert_array_equal(same_wav, wav)
    want = _whole(model, tok, wav)
    assert groups.shape == want.shape
    torch.testing.assert_close(groups, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert inc.recomputed_chunks > 0  # the quiet start was encoded under a floor that rose later


def test_the_floor_matters_and_tolerance_skips_recompute(tmp_path, one_thread):
    """Without re-encoding the chunks made under a lower floor the vectors differ: the floor handling is needed."""
    tok = make_tiny_tokenizer(tmp_path)
    model = _model()
    wav = _clip(6.5)
    want = _whole(model, tok, wav)
    loose = IncrementalAudio(model, tolerance=100.0)
    _feed(loose, wav)
    _, approx = loose.finish()
    assert loose.recomputed_chunks == 0
    assert float((approx - want).abs().max()) > 1e-3 * float(want.abs().max())
    steady = IncrementalAudio(model)  # a steady level: the floor never rises enough to change a chunk
    flat = _clip(6.5, quiet_start=False)
    _feed(steady, flat)
    _, groups = steady.finish()
    torch.testing.assert_close(groups, _whole(model, tok, flat), rtol=1e-5, atol=1e-4)


def test_unaligned_chunks_fall_back_to_whole_clip_encoding(tmp_path, one_thread):
    """A window whose chunks do not hold whole adapter groups (W = 50 mel frames, not a multiple of 4k = 20) is not
    encoded ahead: finish() returns no vectors and the session encodes the clip as usual."""
    model = _model(n_window=25)
    inc = IncrementalAudio(model)
    _feed(inc, _clip(3.0))
    wav, groups = inc.finish()
    assert groups is None and inc.encoded_seconds == 0 and len(wav) == 48000


def test_bad_pieces_and_misuse(one_thread):
    inc = IncrementalAudio(_model())
    with pytest.raises(InputError, match="audio piece"):
        inc.add(np.array([0.0, np.nan], np.float32))
    with pytest.raises(InputError):
        inc.add("not audio")
    inc.add(np.zeros(0, np.float32))  # nothing arrived: fine
    inc.add(np.zeros(100, np.float32))
    with pytest.raises(InputError, match="shorter than the minimum"):  # 6 ms: refused as a whole clip would be
        inc.finish()
    inc.add(_clip(0.5))  # nothing was lost: the audio can go on and finish
    wav, groups = inc.finish()
    assert len(wav) == 100 + 8000 and groups.shape[0] == 3
    with pytest.raises(InputError, match="finished"):
        inc.add(np.zeros(100, np.float32))


@pytest.mark.parametrize("speech", [False, True])
def test_session_answers_the_same_from_incremental_audio(tmp_path, one_thread, speech):
    """The same answer from the whole clip, from IncrementalAudio, and from IncrementalAudio whose positions were
    prefilled while it arrived (prefill_ahead.py), on a conversation's second turn."""
    tok = make_tiny_tokenizer(tmp_path)
    engine = Engine(_model())
    gen = GenerationConfig(max_new_tokens=8, force_text_abos=speech, eos_token_id=511, pad_token_id=500,
                           text_greedy=True, disable_speech=not speech)
    wav = _clip(5.3, seed=3)
    answers, prefixes = [], []
    start_prefill = engine.start_prefill

    def recording(prompt, gen, **kw):  # how many leading positions each turn copies instead of computing
        prefixes.append(len(kw["prefix"]) if kw.get("prefix") is not None else 0)
        return start_prefill(prompt, gen, **kw)

    engine.start_prefill = recording
    for variant in ("whole clip", "encoded ahead", "prefilled ahead"):
        session = ChatSession(engine, tok, gen, system=words([33]), allow_untrained=True)
        first = list(session.ask(text=words([40])))  # a turn before: the audio is not the prompt's first
        assert isinstance(first[-1], TurnEnd)
        audio = wav
        if variant != "whole clip":
            audio = session.start_audio(prefill=variant == "prefilled ahead")
            _feed(audio, wav, seed=1)
            # 2 complete chunks: the first, and all but the last placeholder of the second, prefilled
            assert (session.ahead is not None) == (variant == "prefilled ahead")
            if session.ahead is not None:
                assert session.ahead.groups == 19
        events = list(session.ask(audio=audio, text=words([41])))
        end = events[-1]
        assert isinstance(end, TurnEnd) and end.finish_reason in ("stop", "length")
        speech_tokens = [e.tokens for e in events if type(e).__name__ == "SpeechGroup"]
        answers.append((end.text, speech_tokens, [t.content for t in session.history]))
        assert len(session.history[-2].audios[0]) == len(wav)  # the history keeps the clip itself
        assert session.ahead is None
    assert answers[0] == answers[1] == answers[2]
    assert bool(answers[0][1]) == speech
    # per variant: first turn, (ahead prefills,) second turn; the prefilled second turn copies the 19 audio positions
    whole_second, ahead_second = prefixes[1], prefixes[-1]
    assert ahead_second >= whole_second + 19


def test_batch_with_an_audio_encoded_ahead_equals_single_runs(tmp_path, one_thread):
    """stack_prompts carries the vectors of an audio encoded ahead beside another row's features."""
    from funaudiochat.engine.prompt import stack_prompts

    tok = make_tiny_tokenizer(tmp_path)
    model = _model()
    engine = Engine(model)
    gen = GenerationConfig(max_new_tokens=6, force_text_abos=True, eos_token_id=511, pad_token_id=500,
                           text_greedy=True, disable_speech=True)
    msgs = [{"role": "user", "content": user_content(1, None)}]
    ahead = IncrementalAudio(model)
    _feed(ahead, _clip(4.5, seed=5))
    wav, groups = ahead.finish()
    prompts = [build_prompt(tok, model.cfg, msgs, [wav], encoded={0: groups}),
               build_prompt(tok, model.cfg, msgs, [_clip(2.7, seed=6)])]
    assert prompts[0].input_features is None and prompts[0].audio_groups[0] is groups
    singles = [engine.generate(p, gen).new_text_ids[0].tolist() for p in prompts]
    assert singles[0] == engine.generate(build_prompt(tok, model.cfg, msgs, [wav]), gen).new_text_ids[0].tolist()
    batch = engine.generate(stack_prompts(prompts, 500, model.cfg.audio_config.pad_token_id), gen)
    for row, single in enumerate(singles):
        assert batch.new_text_ids[row, : len(single)].tolist() == single
