"""Engine behaviour beyond golden parity: batching, sampling, limits, streaming, sessions, tools, errors."""
import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from funaudiochat.engine.events import SpeechGroup, TextDelta, TurnEnd, stream_turn
from funaudiochat.engine.generate import Engine, GenerationConfig, Tracer
from funaudiochat.engine.prompt import Prompt, build_prompt, stack_prompts
from funaudiochat.engine.session import ChatSession
from funaudiochat.errors import ConfigError, ContextLengthError, InputError
from funaudiochat.model.checkpoint import save_model
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.presets import tiny
from funaudiochat.text.chat import user_content
from funaudiochat.text.tools import parse_tool_calls, tools_system_prompt
from tests.helpers import make_tiny_tokenizer, words, write_tiny_detokenizer, write_wav

GREEDY = dict(eos_token_id=502, pad_token_id=500, text_greedy=True)


def _model(backbone="qwen3", seed=0, **kw):
    torch.manual_seed(seed)
    model = FunAudioChatModel(tiny(backbone, **kw))
    model.init_weights(0.3)
    return model.eval()


def _audio_prompt(tok, cfg, seconds, text=None, seed=0):
    wav = np.random.default_rng(seed).standard_normal(int(seconds * 16000)).astype(np.float32) * 0.1
    msgs = [{"role": "system", "content": words([40, 41])}, {"role": "user", "content": user_content(1, text)}]
    return build_prompt(tok, cfg, msgs, [wav])


@pytest.mark.parametrize("backbone", ["qwen3", "qwen3_moe", "llama"])
def test_batched_rows_equal_single_runs(tmp_path, backbone):
    tok = make_tiny_tokenizer(tmp_path)
    model = _model(backbone)
    engine = Engine(model)
    prompts = [_audio_prompt(tok, model.cfg, 1.3, seed=1), _audio_prompt(tok, model.cfg, 0.3, words([77, 78]), seed=2)]
    gen = GenerationConfig(max_new_tokens=10, force_text_abos=True, **GREEDY)
    singles = [engine.generate(p, gen) for p in prompts]
    batch = engine.generate(stack_prompts(prompts, 500, model.cfg.audio_config.pad_token_id), gen)
    assert prompts[0].input_ids.shape[1] != prompts[1].input_ids.shape[1]  # the batch really is left padded
    for row, single in enumerate(singles):
        assert batch.new_text_ids[row, : single.new_text_ids.shape[1]].tolist() == single.new_text_ids[0].tolist()
        assert batch.speech_ids[row] == single.speech_ids[0]
        assert len(single.speech_ids[0]) > 0


def test_a_started_prefill_skips_the_text_logits_nothing_reads(tmp_path):
    """Greedy text with a forced first id reads no logits at the first step: a started prefill leaves them out (None)
    and answers as the whole prefill that computes them; sampled text, which reads them, gets them."""
    tok = make_tiny_tokenizer(tmp_path)
    model = _model()
    engine = Engine(model)
    prompt = _audio_prompt(tok, model.cfg, 0.9, seed=3)
    gen = GenerationConfig(max_new_tokens=10, force_text_abos=True, **GREEDY)
    job = engine.start_prefill(prompt, gen)
    steps = [(r.text.tolist(), r.speech) for _, r in engine.steps(prompt, gen, prefill=job)]
    assert job.result[1] is None
    whole = [(r.text.tolist(), r.speech) for _, r in engine.steps(prompt, gen)]
    assert len(steps) == len(whole) and any(group is not None for _, group in whole)
    for (ids, group), (ref_ids, ref_group) in zip(steps, whole):
        assert ids == ref_ids and (group is None) == (ref_group is None)
        assert group is None or torch.equal(group, ref_group)
    sampled = gen.with_(text_greedy=False, do_sample=True, seed=1)
    job = engine.start_prefill(prompt, sampled)
    while not job.advance():
        pass
    assert job.result[1].shape == (1, model.cfg.text_config.vocab_size)
    with pytest.raises(ConfigError, match="text logits are needed"):
        engine.choose_step(job.result[0], None, job.result[2], sampled)


def test_audio_encoded_ahead_for_several_prompts_prefills_as_each_prompt_encoding_its_own(tmp_path):
    """`Engine.encode_ahead` encodes the audios of several prompts in one call (a prompt with two audios of different
    lengths among them); each prompt then carries vectors instead of features, and its prefill computes what it
    computes when it encodes its own audio."""
    import copy

    tok = make_tiny_tokenizer(tmp_path)
    model = _model()
    engine = Engine(model)
    two = [np.random.default_rng(s).standard_normal(int(sec * 16000)).astype(np.float32) * 0.1
           for s, sec in ((3, 0.6), (4, 1.3))]
    msgs = [{"role": "system", "content": words([40, 41])}, {"role": "user", "content": user_content(2, None)}]
    prompts = [build_prompt(tok, model.cfg, msgs, two), _audio_prompt(tok, model.cfg, 0.9, words([77]), seed=5)]
    gen = GenerationConfig(max_new_tokens=4, force_text_abos=True, **GREEDY)
    refs = [engine.prefill(copy.deepcopy(p), gen) for p in prompts]
    engine.encode_ahead(prompts)
    assert all(p.input_features is None and not p.feature_exist_mask.any() for p in prompts)
    assert [g.shape[0] for g in prompts[0].audio_groups] == [int(n) for n in
                                                             (prompts[0].speech_attention_mask.sum(-1) + 4) // 5]
    for p, (ref_state, ref_logits, ref_group) in zip(prompts, refs):
        state, logits, group = engine.prefill(p, gen)
        assert (logits - ref_logits).abs().max() <= 1e-5 * ref_logits.abs().max()
        assert torch.equal(group, ref_group)
        for a, b in zip(state.llm_cache.k, ref_state.llm_cache.k):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    engine.encode_ahead(prompts)  # nothing left to encode: unchanged
    assert all(p.input_features is None for p in prompts)


def test_seeded_sampling_is_reproducible():
    engine = Engine(_model())
    ids = torch.randint(30, 400, (1, 9), generator=torch.Generator().manual_seed(0))
    gen = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.95, top_k=50,
                           repetition_penalty=1.2, force_text_abos=True, eos_token_id=502, pad_token_id=500, seed=7)
    a, b = engine.generate(Prompt(ids), gen), engine.generate(Prompt(ids), gen)
    c = engine.generate(Prompt(ids), gen.with_(seed=8))
    assert a.new_text_ids.tolist() == b.new_text_ids.tolist() and a.speech_ids == b.speech_ids
    assert a.new_text_ids.tolist() != c.new_text_ids.tolist() or a.speech_ids != c.speech_ids


def test_top_p_from_sorted_values_keeps_hf_set():
    """The CPU top-p (numpy-sorted values, a threshold) and the compiled graphs' one (radix select, no sort) keep exactly
    the tokens of HF's sort-and-scatter form. Rows where a token's cumulative mass lies within TOL of 1 - p are left
    out: there fp32 sums in another order (another CPU's vector width) may decide that token either way."""
    from funaudiochat.engine import sampling

    tol, compared = 1e-6, 0
    g = torch.Generator().manual_seed(0)
    compiled = torch.compile(sampling.top_p_filter, dynamic=False)
    scores = torch.randn(2, 6565, generator=g) * 4
    scores[:, :10] = float("-inf")
    assert torch.equal(compiled(scores, 0.9), sampling.top_p_filter(scores, 0.9))
    for trial in range(300):
        scores = torch.randn(3, (300, 6564)[trial % 2], generator=g) * (0.5 + trial % 7)
        if trial % 3 == 0:
            scores[:, :10] = float("-inf")  # banned / top-k-masked tokens
        p = (0.3, 0.5, 0.9, 0.95, 0.99)[trial % 5]
        ascending, order = torch.sort(scores, dim=-1)
        remove = ascending.softmax(-1).cumsum(-1) <= 1 - p
        remove[..., -1:] = False
        hf = scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
        clear = ((ascending.double().softmax(-1).cumsum(-1) - (1 - p)).abs() > tol).all(-1)  # [3] rows
        for ours in (sampling.top_p_filter(scores, p), sampling._top_p_by_radix_select(scores, p)):
            assert torch.equal(ours[clear], hf[clear]), (trial, p)
        compared += int(clear.sum())
    assert compared >= 870  # of 900 rows (884 with these draws)


def test_max_new_tokens_and_finish_reason(tmp_path):
    tok = make_tiny_tokenizer(tmp_path)
    engine = Engine(_model())
    prompt = Prompt(torch.tensor([tok.encode(words([50, 51, 52]))]))
    gen = GenerationConfig(max_new_tokens=5, force_text_abos=True, eos_token_id=511, pad_token_id=500, text_greedy=True)
    events = list(stream_turn(engine, prompt, gen, tok))
    end = events[-1]
    assert isinstance(end, TurnEnd) and end.finish_reason == "length" and len(end.text_ids) == 5
    # text deltas add up to the final text; speech groups carry the codes
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == end.text
    codes = [c for e in events if isinstance(e, SpeechGroup) for c in e.codes]
    assert tuple(codes) == end.speech_codes and len(codes) > 0
    with pytest.raises(ConfigError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)


def test_stops_at_eos():
    engine = Engine(_model())
    ids = torch.randint(30, 400, (1, 6), generator=torch.Generator().manual_seed(1))
    free = engine.generate(Prompt(ids), GenerationConfig(max_new_tokens=8, eos_token_id=511, pad_token_id=500,
                                                         text_greedy=True, disable_speech=True))
    stop_at = int(free.new_text_ids[0, 3])  # make the 4th generated token the EOS id
    out = engine.generate(Prompt(ids), GenerationConfig(max_new_tokens=8, eos_token_id=stop_at, pad_token_id=500,
                                                        text_greedy=True, disable_speech=True))
    first = free.new_text_ids[0].tolist().index(stop_at)
    assert out.new_text_ids.shape[1] == first + 1


def test_cancellation_mid_stream(tmp_path):
    tok = make_tiny_tokenizer(tmp_path)
    engine = Engine(_model())
    prompt = Prompt(torch.tensor([tok.encode(words([60, 61]))]))
    cancel = threading.Event()
    gen = GenerationConfig(max_new_tokens=50, force_text_abos=True, eos_token_id=511, pad_token_id=500)
    seen = 0
    for event in stream_turn(engine, prompt, gen, tok, cancel=cancel):
        if isinstance(event, (SpeechGroup, TextDelta)):
            seen += 1
            if seen == 3:
                cancel.set()
        end = event
    assert end.finish_reason == "cancelled" and seen == 3 and len(end.text_ids) <= 3


def test_over_long_prompt_is_a_clear_error():
    engine = Engine(_model(), max_seq_len=64)
    ids = torch.randint(30, 400, (1, 60))
    with pytest.raises(ContextLengthError, match="exceeds the context of 64"):
        engine.generate(Prompt(ids), GenerationConfig(max_new_tokens=10, eos_token_id=502, pad_token_id=500))


def test_empty_and_too_short_audio(tmp_path):
    tok = make_tiny_tokenizer(tmp_path)
    cfg = tiny()
    msgs = [{"role": "user", "content": user_content(1)}]
    with pytest.raises(InputError, match="at least 40 ms"):
        build_prompt(tok, cfg, msgs, [np.zeros(0, np.float32)])
    with pytest.raises(InputError, match="1 audio placeholder"):
        build_prompt(tok, cfg, msgs, [])
    from funaudiochat.audio.io import load_audio
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_audio(tmp_path / "empty.wav")


def test_speech_to_text_model_without_speech_head():
    model = _model()
    model.drop_speech_head()
    out = Engine(model).generate(Prompt(torch.randint(30, 400, (1, 5))),
                                 GenerationConfig(max_new_tokens=4, force_text_abos=True, **GREEDY))
    assert out.new_text_ids.shape == (1, 4) and out.speech_ids == [[]]


def test_session_keeps_text_history_and_bounds_it(tmp_path):
    tok = make_tiny_tokenizer(tmp_path)
    engine = Engine(_model(), max_seq_len=160)
    gen = GenerationConfig(max_new_tokens=6, force_text_abos=True, eos_token_id=511, pad_token_id=500, text_greedy=True)
    session = ChatSession(engine, tok, gen, system=words([33]), max_turns=2)
    wav = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    for i in range(3):
        events = list(session.ask(audio=wav if i == 0 else None, text=words([100 + i])))
        assert isinstance(events[-1], TurnEnd)
    users = [t for t in session.history if t.role == "user"]
    assert len(users) == 2 and users[0].content.endswith(words([101]))  # the oldest turn was dropped
    assert all("<|" not in t.content for t in session.history if t.role == "assistant")
    # a long audio turn does not fit 160 tokens with history: history is dropped, then the turn is refused
    long_wav = np.zeros(16000 * 40, np.float32) + 0.01
    with pytest.raises(ContextLengthError, match="send shorter audio"):
        list(session.ask(audio=long_wav))


def test_tool_call_parsing():
    one = parse_tool_calls('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>')
    assert [(c.name, c.arguments) for c in one.calls] == [("get_weather", {"city": "Paris"})] and not one.errors
    two = parse_tool_calls('<tool_call>{"name": "a", "arguments": {}}</tool_call> and '
                           '<tool_call>{"name": "b", "arguments": "{\\"x\\": 1}"}</tool_call>')
    assert [(c.name, c.arguments) for c in two.calls] == [("a", {}), ("b", {"x": 1})]
    bad = parse_tool_calls('<tool_call>{"name": "a", "arguments": {"x": }</tool_call><tool_call>[1]</tool_call>'
                           '<tool_call>{"name": "c"')
    assert bad.calls == [] and len(bad.errors) == 3 and "invalid JSON" in bad.errors[0]
    none = parse_tool_calls("It is sunny in Paris.")
    assert none.calls == [] and none.errors == [] and none.text == "It is sunny in Paris."


def test_tools_prompt_lists_each_tool_on_its_line():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}, {"name": "g", "description": "x"}]
    prompt = tools_system_prompt(tools)
    body = prompt.split("<tools>\n")[1].split("\n</tools>")[0].splitlines()
    assert [json.loads(line)["function"]["name"] for line in body] == ["f", "g"]
    with pytest.raises(InputError, match="tool 0"):
        tools_system_prompt([{"description": "no name"}])


def test_infer_cli_end_to_end(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_model(_model(), ckpt)
    make_tiny_tokenizer(ckpt)
    wav = write_wav(tmp_path / "q.wav", 1.0, freq=220)
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"type": "function", "function": {"name": "get_time", "parameters": {}}}]))
    base = [sys.executable, "-m", "funaudiochat.cli", "infer", "--model", str(ckpt), "--audio", str(wav),
            "--max-new-tokens", "8", "--seed", "0"]
    run = subprocess.run(base + ["--out", str(tmp_path / "s2s")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "s2s/speech_tokens.json").read_text())
    assert (tmp_path / "s2s/answer.txt").read_text().strip() in run.stdout
    run = subprocess.run(base + ["--tools", str(tools), "--out", str(tmp_path / "fc")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert set(json.loads((tmp_path / "fc/tool_calls.json").read_text())) == {"calls", "errors"}
    detok = write_tiny_detokenizer(tmp_path / "cosyvoice")
    run = subprocess.run(base + ["--detokenizer", str(detok), "--out", str(tmp_path / "wav")], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    import soundfile as sf

    audio, rate = sf.read(str(tmp_path / "wav/answer.wav"))
    codes = json.loads((tmp_path / "wav/speech_tokens.json").read_text())
    assert rate == 24000 and len(audio) == 960 * len(codes)  # 960 samples (40 ms at 24 kHz) per speech token
    run = subprocess.run(base[:-4] + ["--audio", str(tmp_path / "missing.wav")], capture_output=True, text=True)
    assert run.returncode == 1 and "no such file" in run.stderr and "Traceback" not in run.stderr


def test_several_audios_in_one_prompt(tmp_path):
    tok = make_tiny_tokenizer(tmp_path)
    model = _model()
    rng = np.random.default_rng(3)
    wavs = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (16000, 9000)]  # 25 and 14 speech tokens
    msgs = [{"role": "user", "content": user_content(2, words([90]))}]
    prompt = build_prompt(tok, model.cfg, msgs, wavs)
    assert int((prompt.input_ids == 505).sum()) == 5 + 3  # ceil(25 / 5) + ceil(14 / 5) placeholders
    assert prompt.speech_attention_mask.sum(-1).tolist() == [25, 14] and prompt.input_features.shape[0] == 2
    engine, gen = Engine(model), GenerationConfig(max_new_tokens=3, force_text_abos=True, **GREEDY)
    first, second = Tracer(), Tracer()
    out = engine.generate(prompt, gen, first)
    # changing only the second audio changes the first logits: every audio reaches the model
    other = build_prompt(tok, model.cfg, msgs, [wavs[0], wavs[1][::-1].copy()])
    engine.generate(other, gen, second)
    assert out.new_text_ids.shape == (1, 3)
    assert not torch.allclose(first.text_logits[0], second.text_logits[0])


def test_compiled_decode_reproduces_the_goldens(shared_dir):
    """Engine(compile=True) equals the released code's outputs on every path it compiles: the one-graph greedy S2S
    step (with and without the repetition penalty) and the LLM-only graph (S2T); with the default S2S preset's
    sampling (one graph per step, sampling inside) and on a left-padded batch it equals the eager engine."""
    from safetensors.torch import load_file

    from funaudiochat.check.generation import generation_config
    from funaudiochat.engine.presets import S2M_SAMPLING
    from funaudiochat.model.checkpoint import load_model

    golden = shared_dir / "golden/tiny-dense"
    model = load_model(golden / "model")
    engine, eager = Engine(model, compile=True), Engine(model)
    records = json.loads((golden / "golden.json").read_text())
    inputs = {case: Prompt.from_tensors(load_file(str(golden / case / "inputs.safetensors")))
              for case in ("gen", "gen_rep", "gen_s2t", "gen_single_b")}
    for case in ("gen", "gen_rep", "gen_s2t"):
        tracer = Tracer()
        out = engine.generate(inputs[case], generation_config(records, case), tracer)
        ref = load_file(str(golden / case / "outputs.safetensors"))
        assert out.new_text_ids.tolist() == ref["new_text_ids"].tolist(), case
        text_logits = torch.stack(tracer.text_logits)[:, 0]
        assert (text_logits - ref["step_text_logits"][:, 0]).abs().max() <= 1e-4 * ref["step_text_logits"].abs().max()
        if case != "gen_s2t":
            assert out.speech_ids[0] == ref["speech_ids"][0].tolist(), case
            logits = torch.stack(tracer.srh_logits)[:, 0]
            assert (logits - ref["crq_call_logits"][:, 0]).abs().max() <= 1e-4 * ref["crq_call_logits"].abs().max()

    # the S2S preset: sampled speech (temperature, top-p, repetition penalty), greedy text; same seed, same tokens
    sampled = generation_config(records, "gen").with_(**S2M_SAMPLING, text_greedy=True, max_new_tokens=16, seed=3)
    llm_only = engine.compiled.llm
    engine.compiled.llm = None  # every sampled S2S step must run as the one S2S graph
    a, b = engine.generate(inputs["gen"], sampled), eager.generate(inputs["gen"], sampled)
    engine.compiled.llm = llm_only
    assert a.new_text_ids.tolist() == b.new_text_ids.tolist() and a.speech_ids == b.speech_ids
    greedy_speech = eager.generate(inputs["gen"], sampled.with_(do_sample=False)).speech_ids
    assert len(a.speech_ids[0]) >= 40 and a.speech_ids != greedy_speech  # really sampled
    batch = stack_prompts([inputs["gen"], inputs["gen_single_b"]], 500, model.cfg.audio_config.pad_token_id)
    greedy = generation_config(records, "gen")
    a, b = engine.generate(batch, greedy), eager.generate(batch, greedy)
    assert bool(batch.attention_mask.eq(0).any())  # left padded
    assert a.new_text_ids.tolist() == b.new_text_ids.tolist() and a.speech_ids == b.speech_ids


def test_a_spoken_answer_keeps_its_stream_format():
    """speech_holds_turn: an end-of-turn id said while speaking ends the text, not the turn; the ended text pads
    with <|sil|> until the speech ends (then <|audio_eos|>); without it the turn ends there."""
    model = _model()
    engine = Engine(model)
    t_cfg = model.cfg.text_config
    ids = torch.randint(30, 400, (1, 9), generator=torch.Generator().manual_seed(0))
    gen = GenerationConfig(max_new_tokens=12, force_text_abos=True, **GREEDY)
    free = engine.generate(Prompt(ids), gen).new_text_ids[0].tolist()
    said = free[4]  # make the id said at step 4 an end of turn
    assert said not in (t_cfg.sil_index, t_cfg.audio_eos_index) and said not in free[:4]
    cut = engine.generate(Prompt(ids), gen.with_(eos_token_id=said)).new_text_ids[0].tolist()
    assert cut == free[:5]  # the turn ended mid-speech
    held = engine.generate(Prompt(ids), gen.with_(eos_token_id=said, speech_holds_turn=True))
    text = held.new_text_ids[0].tolist()
    assert text[:4] == free[:4] and len(text) == 12
    assert set(text[4:]) == {t_cfg.sil_index}  # the text ended, the speech goes on
    assert len(held.speech_ids[0]) == 5 * 11
    # a model with a speech opener (a text LLM) ends the turn with its speech: <|audio_eos|> is the last text id,
    # the LLM is not asked what follows it; other models go on to their end of turn, as released
    sampled = gen.with_(max_new_tokens=80, do_sample=True, seed=1, speech_holds_turn=True)
    on_after = engine.generate(Prompt(ids), sampled).new_text_ids[0].tolist()
    model.cfg.audio_config.speech_opener = True
    opener = model.language_model.embed(torch.tensor(t_cfg.audio_bos_index))  # as <|audio_bos|>: the same answer
    model.audio_tower.speech_opener = torch.nn.Parameter(opener)
    ended = Engine(model).generate(Prompt(ids), sampled)
    assert model.cfg.audio_config.eos_token_id in ended.speech_ids[0]  # this seed's speech ends within 80 steps
    text = ended.new_text_ids[0].tolist()
    assert text[-1] == t_cfg.audio_eos_index and text.count(t_cfg.audio_eos_index) == 1
    assert on_after[:len(text)] == text and len(on_after) > len(text)  # the same answer, which went on


def test_a_looping_text_ends_after_its_third_copy(tmp_path):
    """text_loop_stop=3: a text whose last ids are one span said three times ends there (its next id becomes the end
    of turn), in a single run and in the server's batched rows alike; off, the same text loops to the token limit.
    A checkpoint's shipped generation defaults (fun_audio_chat_mini.generation) apply under the caller's."""
    from funaudiochat.engine.presets import generation_preset

    model = _model()
    with torch.no_grad():  # every layer adds nothing: the next id is a function of the last one, which must cycle
        for layer in model.language_model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    engine = Engine(model)
    ids = torch.randint(30, 400, (2, 9), generator=torch.Generator().manual_seed(0))
    gen = GenerationConfig(max_new_tokens=60, disable_speech=True, **GREEDY)
    free = engine.generate(Prompt(ids), gen).new_text_ids.tolist()
    stopped = engine.generate(Prompt(ids), gen.with_(text_loop_stop=3)).new_text_ids.tolist()

    def first_third_copy(text):  # -> the length of the shortest prefix that ends with three copies of a span
        return min(n for n in range(len(text) + 1) for s in range(2, 41)
                   if n >= 3 * s and text[n - 3 * s:n - 2 * s] == text[n - 2 * s:n - s] == text[n - s:n])

    for row in range(2):
        assert 502 not in free[row] and len(free[row]) == 60  # it loops to the limit
        n = first_third_copy(free[row])
        assert stopped[row][:n] == free[row][:n] and stopped[row][n] == 502
        assert set(stopped[row][n + 1:]) <= {500}  # (padding after the row's end)

    tok = make_tiny_tokenizer(tmp_path)
    cfg = model.cfg
    assert generation_preset("s2t", tok, cfg).text_loop_stop == 0  # released: off
    cfg.extra["fun_audio_chat_mini"] = {"generation": {"text_loop_stop": 3}}
    assert generation_preset("s2t", tok, cfg).text_loop_stop == 3
    assert generation_preset("s2t", tok, cfg, text_loop_stop=0).text_loop_stop == 0  # the caller's word wins
    with pytest.raises(ConfigError, match="text_loop_stop"):
        GenerationConfig(text_loop_stop=1)
    cfg.extra["fun_audio_chat_mini"]["generation"]["loop_stop"] = 3
    with pytest.raises(ConfigError, match="unknown settings"):
        generation_preset("s2t", tok, cfg)
