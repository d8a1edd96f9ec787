"""Decode steps replayed from recorded graphs (engine/cuda_graphs.py), with the CPU stand-in for the CUDA graph:
what a replay reads and writes goes only through the recording's static buffers and the in-place tensors."""
import pytest
import torch

from funaudiochat.engine.compiled import CompiledDecoder
from funaudiochat.engine.cuda_graphs import GraphedStep, replay_by_call
from funaudiochat.engine.generate import Engine, GenerationConfig
from funaudiochat.engine.presets import S2M_SAMPLING
from funaudiochat.engine.prompt import Prompt, stack_prompts
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.presets import tiny


def _accumulate(x, cache, scale: float):
    cache.add_(x * scale)  # an in-place update, as a KV cache write
    return cache.sum(-1) + x[:, 0], {"scale": scale}


def test_a_recording_serves_each_signature_and_reads_new_inputs_through_its_buffers():
    step = GraphedStep(_accumulate, in_place=("cache",), max_graphs=2, record=replay_by_call)
    cache, twin = torch.zeros(2, 3), torch.zeros(2, 3)
    for i in range(4):  # one recording, three replays: each replay reads the new x and updates the same cache
        x = torch.full((2, 3), float(i))
        out, extra = step(x, cache, 0.5)
        want = _accumulate(x, twin, 0.5)[0]
        assert torch.equal(out, want) and torch.equal(cache, twin) and extra == {"scale": 0.5}
    assert step.recorded == 1
    held = out.clone()
    step(torch.ones(2, 3), cache, 0.5)
    assert torch.equal(out, held)  # a returned tensor is a copy, not the recording's output buffer
    other = torch.zeros(2, 3)
    step(torch.ones(2, 3), other, 0.5)   # another in-place tensor: its own recording
    step(torch.ones(2, 3), cache, 2.0)   # another constant: its own recording; the first is evicted (max 2)
    assert step.recorded == 3 and len(step.recordings) == 2
    step(torch.ones(2, 3), cache, 0.5)
    assert step.recorded == 4
    with pytest.raises(ValueError, match="no argument"):
        GraphedStep(_accumulate, in_place=("caches",))


def _graphed(engine: Engine) -> Engine:
    """The engine's static-shape step functions (uncompiled) behind recordings, as a GPU runs them."""
    dec = engine.compiled
    dec.llm = GraphedStep(dec._llm, CompiledDecoder.LLM_IN_PLACE, record=replay_by_call)
    dec.s2s = GraphedStep(dec._s2s, CompiledDecoder.S2S_IN_PLACE, record=replay_by_call)
    return engine


def test_replayed_decode_steps_generate_what_the_eager_engine_generates():
    """Greedy S2S on a left-padded batch, greedy S2T and the sampled S2S preset: the same text and speech ids, the
    steps after the first replayed (each generation records once per step function, as its caches are new)."""
    torch.manual_seed(0)
    model = FunAudioChatModel(tiny("qwen3")).eval()
    model.init_weights(0.3)
    graphed, eager = _graphed(Engine(model, compile=True)), Engine(model)
    g = torch.Generator().manual_seed(0)
    prompts = [Prompt(torch.randint(30, 400, (1, n), generator=g)) for n in (9, 5)]
    batch = stack_prompts(prompts, 500, model.cfg.audio_config.pad_token_id)
    base = dict(max_new_tokens=12, eos_token_id=502, pad_token_id=500, text_greedy=True)
    cases = [(batch, GenerationConfig(**base, force_text_abos=True)),
             (prompts[0], GenerationConfig(**base, disable_speech=True)),
             (prompts[0], GenerationConfig(**base, **S2M_SAMPLING, force_text_abos=True, seed=3))]
    for prompt, gen in cases:
        a, b = graphed.generate(prompt, gen), eager.generate(prompt, gen)
        assert a.new_text_ids.tolist() == b.new_text_ids.tolist() and a.speech_ids == b.speech_ids
        assert a.new_text_ids.shape[1] == 12
    assert len(a.speech_ids[0]) >= 40  # the speech really ran
    assert graphed.compiled.s2s.recorded == 2 and graphed.compiled.llm.recorded == 1
