"""fp16 decode weights (model/quantize.py `set_decode_weights`, `--decode-weights fp16`): compiled CPU decoding reads
fp16 copies of the LLM's and the speech head's weights with fp32 products and sums; every other pass, and the state
dict, keep the fp32 weights."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from funaudiochat.engine.compiled import _LinearAsProductSum
from funaudiochat.engine.generate import Engine, GenerationConfig, Tracer
from funaudiochat.engine.prompt import Prompt
from funaudiochat.errors import ConfigError
from funaudiochat.model.checkpoint import save_model
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.presets import tiny
from funaudiochat.model.quantize import HalfDecodeLinear, half_decode_linear, quantize_model
from tests.helpers import make_tiny_tokenizer, write_wav

GREEDY = GenerationConfig(max_new_tokens=6, force_text_abos=True, eos_token_id=502, pad_token_id=500,
                          text_greedy=True)


def _model():
    torch.manual_seed(0)
    model = FunAudioChatModel(tiny("qwen3"))
    model.init_weights(0.3)
    return model.eval()


def test_the_compiled_product_reads_the_fp16_copy_and_sums_in_fp32(one_thread):
    from torch._inductor.utils import run_and_get_code

    g = torch.Generator().manual_seed(0)
    w, x, bias = torch.randn(96, 80, generator=g), torch.randn(1, 1, 80, generator=g), torch.randn(96, generator=g)
    half = w.half()

    def step(x):
        with _LinearAsProductSum():  # as the compiled decode steps run their linears
            return half_decode_linear(x, w, half, bias)

    out, code = run_and_get_code(torch.compile(step, dynamic=False), x)
    rounded, exact = F.linear(x, half.float(), bias), F.linear(x, w, bias)
    assert out.dtype == torch.float32
    assert (out - rounded).abs().max() <= 1e-5 * rounded.abs().max()  # the rounded weights, fp32 arithmetic
    assert (out - exact).abs().max() > 1e-5 * exact.abs().max()  # (not the fp32 weights)
    assert "half" in "\n".join(code).lower()  # the kernel loads the fp16 buffer itself
    assert torch.equal(half_decode_linear(x, w, half, bias), exact)  # eagerly: the fp32 weight


def test_compiled_decoding_with_fp16_weights_stays_close_and_prompt_passes_stay_fp32():
    model = _model()
    ids = torch.randint(30, 400, (1, 9), generator=torch.Generator().manual_seed(0))
    keys = set(model.state_dict())
    eager = Engine(model)
    ref_tracer = Tracer()
    ref = eager.generate(Prompt(ids), GREEDY, ref_tracer)
    ref_prefill = eager.prefill(Prompt(ids), GREEDY)[1]

    engine = Engine(model, compile=True, decode_weights="fp16")
    halves = [n for n, m in model.named_modules() if isinstance(m, HalfDecodeLinear)]
    assert "language_model.lm_head" in halves and "audio_invert_tower.lm_head" in halves
    assert any(n.startswith("language_model.model.layers.") for n in halves)
    assert not any(n.startswith(("continuous_audio_tower", "audio_tower")) for n in halves)
    assert set(model.state_dict()) == keys  # the copies are not saved
    prefill = engine.prefill(Prompt(ids), GREEDY)[1]  # a prompt pass reads the fp32 weights (another layout)
    assert (prefill - ref_prefill).abs().max() <= 1e-5 * ref_prefill.abs().max()

    tracer = Tracer()
    out = engine.generate(Prompt(ids), GREEDY, tracer)
    assert out.new_text_ids.tolist() == ref.new_text_ids.tolist() and out.speech_ids == ref.speech_ids
    for name in ("text_logits", "srh_logits"):
        got, want = torch.stack(getattr(tracer, name)), torch.stack(getattr(ref_tracer, name))
        diff = (got - want).abs().max() / want.abs().max()
        # fp16 weights move each product by about 2^-11 of its terms; compiled fp32 ones agree to ~1e-6
        assert 1e-5 < diff <= 1e-2, (name, float(diff))

    Engine(model)  # a later fp32 engine on the same model drops the copies
    assert not any(isinstance(m, HalfDecodeLinear) for m in model.modules())


def test_fp16_decode_weights_are_refused_where_nothing_would_read_them(tmp_path):
    model = _model()
    with pytest.raises(ConfigError, match="compiled CPU decoding"):
        Engine(model, decode_weights="fp16")  # eager decoding reads fp32 weights
    with pytest.raises(ConfigError, match="int8"):
        Engine(quantize_model(_model()), compile=True, decode_weights="fp16")
    with pytest.raises(ConfigError, match="decode weights must be one of"):
        Engine(model, decode_weights="fp8")

    ckpt = tmp_path / "ckpt"
    save_model(model, ckpt)
    make_tiny_tokenizer(ckpt)
    wav = write_wav(tmp_path / "q.wav", 1.0, freq=220)
    run = subprocess.run([sys.executable, "-m", "funaudiochat.cli", "infer", "--audio", str(wav), "--model",
                          str(ckpt), "--decode-weights", "fp16", "--greedy"], capture_output=True, text=True)
    assert run.returncode == 1 and "add --compile" in run.stderr and "Traceback" not in run.stderr
