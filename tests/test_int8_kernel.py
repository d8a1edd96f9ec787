"""The C++ int8 decode product (model/int8_kernel.py): each build this CPU runs against the dequantized product, its
checks on bad input, and where the engine uses it (eager and compiled decoding, not prompt passes)."""
import pytest
import torch

from funaudiochat.engine.generate import Engine, GenerationConfig
from funaudiochat.engine.prompt import Prompt
from funaudiochat.model import int8_kernel
from funaudiochat.native import runnable_variants
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.presets import tiny
from funaudiochat.model.quantize import int8_linear, prompt_products, quantize_model, quantize_weight, \
    set_prompt_products


def dequantized(x, q, scale):
    return x.double() @ (q.double() * scale.double()[:, None]).t()


@pytest.mark.parametrize("variant", runnable_variants())
def test_each_build_equals_the_dequantized_product(variant):
    """Rows 1..9 (whole tiles of 4 and the rest), depths with and without a vector tail, an all-zero weight row, one
    and two threads: the product to fp32 rounding of its sums."""
    op = int8_kernel.op(variant)
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    try:
        for m, n, k in ((1, 96, 80), (4, 33, 577), (5, 40, 31), (9, 1536, 576), (3, 1, 7)):
            x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
            w[0] = 0.0
            q, scale = quantize_weight(w)
            ref = dequantized(x, q, scale)
            bound = 1e-6 * (x.abs().double() @ (q.abs().double() * scale.double()[:, None]).t()) + 1e-30
            for t in (1, 2):
                torch.set_num_threads(t)
                y = op(x, q, scale)
                assert y.shape == (m, n) and y.dtype == torch.float32
                assert ((y.double() - ref).abs() <= bound).all(), (variant, m, n, k, t)
                assert torch.equal(y[:, 0], torch.zeros(m))
    finally:
        torch.set_num_threads(threads)


def test_bad_input_is_refused_with_a_clear_error():
    op = int8_kernel.op(runnable_variants()[-1])
    x, q, scale = torch.randn(2, 8), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4)
    for args, words in (((x.double(), q, scale), "fp32"), ((x, q.float(), scale), "int8"),
                        ((x[:, :6], q, scale), "shapes"), ((x, q, scale[:3]), "shapes"),
                        ((x.t(), torch.zeros(4, 2, dtype=torch.int8), scale), "contiguous"),
                        ((x[0], q, scale), r"x \[M, K\]")):
        with pytest.raises(RuntimeError, match=words):
            op(*args)


def test_int8_linear_uses_it_for_decode_rows_eagerly_and_compiled_and_not_for_prompt_passes():
    """The kernel runs a decode step's rows (eager, and inside a compiled graph as one call between fused kernels);
    a prompt pass keeps its bf16 blocks, and with the kernel off the compiled form is the product-and-sum reduction.
    All of them give the same product to the precision each promises."""
    from torch._inductor.utils import run_and_get_code

    if int8_kernel.load() is None:
        pytest.fail("the int8 kernel did not build on this machine (a C++ compiler is part of the set-up)")
    g = torch.Generator().manual_seed(1)
    x, w, bias = torch.randn(3, 64, generator=g), torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
    q, scale = quantize_weight(w)
    ref = dequantized(x, q, scale).float() + bias
    calls = []
    real = int8_kernel.kernel_for

    def counting(flat):
        kernel = real(flat)
        calls.append(kernel is not None)
        return kernel

    import funaudiochat.model.quantize as quantize
    try:
        quantize.kernel_for = counting
        eager = int8_linear(x, q, scale, bias)
        assert calls == [True]
        assert (eager - ref).abs().max() <= 1e-5 * ref.abs().max()
        set_prompt_products("bf16")
        with prompt_products(torch.device("cpu")):
            in_prompt = int8_linear(x, q, scale, bias)
        assert calls == [True]  # (no kernel looked up: bf16 blocks, whose rounding shows)
        assert not torch.equal(in_prompt, eager) and (in_prompt - ref).abs().max() <= 2 ** -6 * ref.abs().max()
    finally:
        quantize.kernel_for = real
        set_prompt_products("auto")

    def step(x):
        return torch.relu(int8_linear(x, q, scale, bias))

    out, code = run_and_get_code(torch.compile(step, dynamic=False), x)
    assert "int8_mm" in "\n".join(code) and (out - ref.relu()).abs().max() <= 1e-5 * ref.abs().max()
    torch._dynamo.reset()
    try:
        int8_kernel.set_enabled(False)
        out, code = run_and_get_code(torch.compile(step, dynamic=False), x)
        assert "int8_mm" not in "\n".join(code) and "int8_t" in "\n".join(code)
        assert (out - ref.relu()).abs().max() <= 1e-5 * ref.abs().max()
    finally:
        int8_kernel.set_enabled(True)
        torch._dynamo.reset()


def test_a_quantized_engine_decodes_the_same_compiled_and_eager():
    """Greedy S2S of a quantized tiny model: the compiled steps (kernel inside the graph) and the eager ones (kernel
    called directly) give the same text and speech tokens, and text logits equal to fp32 rounding."""
    from funaudiochat.engine.generate import Tracer

    torch.manual_seed(0)
    model = FunAudioChatModel(tiny("qwen3"))
    model.init_weights(0.3)
    model = quantize_model(model.eval())
    gen = GenerationConfig(max_new_tokens=10, force_text_abos=True, eos_token_id=502, pad_token_id=500,
                           text_greedy=True)
    ids = torch.randint(30, 400, (1, 12), generator=torch.Generator().manual_seed(0))
    outs = []
    for compile in (False, True):
        tracer = Tracer()
        out = Engine(model, compile=compile).generate(Prompt(ids), gen, tracer)
        outs.append((out, torch.stack(tracer.text_logits)))
    (eager, eager_logits), (compiled, compiled_logits) = outs
    assert eager.new_text_ids.tolist() == compiled.new_text_ids.tolist()
    assert eager.speech_ids == compiled.speech_ids and len(eager.speech_ids[0]) > 0
    assert (eager_logits - compiled_logits).abs().max() <= 1e-4 * eager_logits.abs().max()


def test_without_a_compiler_int8_products_fall_back_with_one_warning(tmp_path):
    """A machine where the kernel cannot be built (no compiler: $CXX names none, an empty cache folder) still
    multiplies int8 weights, through the reductions and BLAS blocks, and says once why it is slower."""
    import os
    import subprocess
    import sys

    script = (
        "import logging, torch\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from funaudiochat.model.quantize import int8_linear, quantize_weight\n"
        "q, s = quantize_weight(torch.randn(8, 16))\n"
        "x = torch.randn(2, 16)\n"
        "ref = x @ (q.float() * s[:, None]).t()\n"
        "for _ in range(2):\n"
        "    assert (int8_linear(x, q, s) - ref).abs().max() <= 1e-5 * ref.abs().max()\n"
        "print('ok')\n")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
    assert run.stderr.count("the int8 decode kernel could not be built") == 1, run.stderr
