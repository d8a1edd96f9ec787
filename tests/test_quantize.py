"""Weight-only int8 (model/quantize.py): the product's accuracy, the compiled form, quantized checkpoints, the CLI."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from funaudiochat.engine.compiled import _LinearAsProductSum
from funaudiochat.engine.generate import Engine, GenerationConfig
from funaudiochat.engine.prompt import Prompt
from funaudiochat.model.checkpoint import load_model, save_model
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.presets import tiny
from funaudiochat.model.quantize import Int8Linear, int8_linear, quantize_model, quantize_weight
from tests.helpers import make_tiny_tokenizer, write_wav

GREEDY = GenerationConfig(max_new_tokens=10, force_text_abos=True, eos_token_id=502, pad_token_id=500,
                          text_greedy=True)


def _model(backbone="qwen3"):
    torch.manual_seed(0)
    model = FunAudioChatModel(tiny(backbone))
    model.init_weights(0.3)
    return model.eval()


def test_int8_product_matches_fp32_within_the_rounding_bound(one_thread):
    g = torch.Generator().manual_seed(0)
    w, x, bias = torch.randn(96, 80, generator=g), torch.randn(5, 80, generator=g), torch.randn(96, generator=g)
    w[3] = 0.0  # an all-zero output channel stays zero
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (96,)
    y, ref = int8_linear(x, q, scale, bias), F.linear(x, w, bias)
    # rounding moves each weight by at most scale / 2: |error| <= scale_n / 2 * sum_k |x_k| (+ fp32 sums)
    bound = scale[None] / 2 * x.abs().sum(-1, keepdim=True)
    assert ((y - ref).abs() <= bound + 1e-4).all()
    assert (y - ref).abs().max() > 0  # (it is an approximation)
    assert torch.equal(y[:, 3], bias[None, 3].expand(5))

    # without the C++ kernel, compiled decoding traces it as a product-and-sum reading the int8 weight itself (no
    # torch int8 kernel call, no fp32 weight buffer): the same values to fp32 rounding
    from torch._inductor.utils import run_and_get_code

    def step(x):
        with _LinearAsProductSum():  # as the compiled decode steps run their linears
            return int8_linear(x, q, scale, bias)

    from funaudiochat.model import int8_kernel

    compiled = torch.compile(step, dynamic=False)
    row = x[:1, None]  # [1, 1, K]: one decode row
    try:
        int8_kernel.set_enabled(False)  # (the kernel's own form: tests/test_int8_kernel.py)
        out, code = run_and_get_code(compiled, row)
    finally:
        int8_kernel.set_enabled(True)
    assert (out[:, 0] - y[:1]).abs().max() <= 1e-5 * y.abs().max()
    code = "\n".join(code)
    assert "int8_t" in code and "_weight_int8pack_mm" not in code


def test_quantized_model_stays_close_and_keeps_fp32_elsewhere():
    model = _model()
    ids = torch.randint(30, 400, (1, 9), generator=torch.Generator().manual_seed(0))
    ref_logits = Engine(model).prefill(Prompt(ids), GREEDY)[1]
    encoder_before = model.continuous_audio_tower.state_dict()
    quantize_model(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, Int8Linear)]
    assert "language_model.lm_head" in linears and "audio_invert_tower.lm_head" in linears
    assert any(n.startswith("language_model.model.layers.") for n in linears)
    assert not any(n.startswith(("continuous_audio_tower", "audio_tower")) for n in linears)
    assert all(torch.equal(v, model.continuous_audio_tower.state_dict()[k]) for k, v in encoder_before.items())
    engine = Engine(model)
    assert engine.dtype == torch.float32
    logits = engine.prefill(Prompt(ids), GREEDY)[1]
    assert (logits - ref_logits).abs().max() <= 0.03 * ref_logits.abs().max()


def test_the_per_answer_projections_stay_fp32_and_the_prosody_unchanged():
    """The SRH's answer style, cue and prosody projections are not quantized (small, read once per answer step):
    the prosody's biases on the head's logits are the fp32 model's exactly."""
    from funaudiochat.speech.piper_tokens import VOCAB_SIZE

    cfg = tiny(codebook=VOCAB_SIZE + 8)
    for name in ("srh_answer_style", "srh_answer_cue", "srh_answer_prosody"):
        setattr(cfg.audio_config, name, True)
    torch.manual_seed(0)
    model = FunAudioChatModel(cfg)
    model.init_weights(0.3)
    head = model.audio_invert_tower
    styles = torch.randn(2, cfg.text_config.hidden_size)
    before = head.prosody_bias(styles)
    quantize_model(model)
    assert isinstance(head.lm_head, Int8Linear)
    assert not any(isinstance(m, Int8Linear) for m in (head.answer_style, head.answer_cue, head.answer_prosody))
    assert torch.equal(head.prosody_bias(styles), before)


def test_quantized_checkpoint_round_trip(tmp_path, one_thread):
    """`assets quantize` writes int8 weights with their scales beside them; the folder loads as is, equal to
    quantizing at load time, and generates the same tokens."""
    for backbone in ("llama", "qwen3_moe"):  # tied and untied text heads, MoE experts
        src, out = tmp_path / f"{backbone}-fp32", tmp_path / f"{backbone}-int8"
        save_model(_model(backbone), src)
        make_tiny_tokenizer(src)
        run = subprocess.run([sys.executable, "-m", "funaudiochat.cli", "assets", "quantize", str(src), str(out)],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert (out / "tokenizer.json").is_file() and (out / "config.json").read_text() == \
            (src / "config.json").read_text()
        assert (out / "model.safetensors").stat().st_size < 0.7 * (src / "model.safetensors").stat().st_size
        from safetensors.torch import load_file

        stored = load_file(str(out / "model.safetensors"))
        assert stored["language_model.lm_head.weight"].dtype == torch.int8
        assert stored["language_model.lm_head.weight_scale"].dtype == torch.float32
        loaded, at_load = load_model(out), load_model(src, dtype="int8")
        a, b = loaded.state_dict(), at_load.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        ids = torch.randint(30, 400, (1, 9), generator=torch.Generator().manual_seed(1))
        x, y = Engine(loaded).generate(Prompt(ids), GREEDY), Engine(at_load).generate(Prompt(ids), GREEDY)
        assert x.new_text_ids.tolist() == y.new_text_ids.tolist() and x.speech_ids == y.speech_ids
    run = subprocess.run([sys.executable, "-m", "funaudiochat.cli", "assets", "quantize", str(src), str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 1 and "not an empty folder" in run.stderr


def test_infer_dtype_int8_cli(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_model(_model(), ckpt)
    make_tiny_tokenizer(ckpt)
    wav = write_wav(tmp_path / "q.wav", 1.0, freq=220)
    base = [sys.executable, "-m", "funaudiochat.cli", "infer", "--audio", str(wav), "--max-new-tokens", "6",
            "--greedy"]
    run = subprocess.run(base + ["--model", str(ckpt), "--dtype", "int8", "--out", str(tmp_path / "a")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    int8_speech = (tmp_path / "a/speech_tokens.json").read_text()
    assert len(int8_speech) > 4
    quantized = load_model(ckpt, dtype="int8")
    save_model(quantized, tmp_path / "q")
    make_tiny_tokenizer(tmp_path / "q")
    run = subprocess.run(base + ["--model", str(tmp_path / "q"), "--out", str(tmp_path / "b")], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "b/speech_tokens.json").read_text() == int8_speech
    assert (tmp_path / "b/answer.txt").read_text() == (tmp_path / "a/answer.txt").read_text()
    run = subprocess.run(base + ["--model", str(tmp_path / "q"), "--dtype", "bf16"], capture_output=True, text=True)
    assert run.returncode == 1 and "holds int8 weights" in run.stderr and "Traceback" not in run.stderr
    run = subprocess.run(base + ["--model", str(ckpt), "--dtype", "int4"], capture_output=True, text=True)
    assert run.returncode == 2 and "--dtype" in run.stderr and "int8" in run.stderr and "Traceback" not in run.stderr


def test_compiled_int8_warns_where_its_reductions_lack_avx512_and_the_kernel_is_off(monkeypatch, caplog):
    """Without the int8 kernel (model/int8_kernel.py), inductor's AVX2 code loads int8 weights byte by byte
    (BENCHMARKS.md): a compiled int8 engine says so on such a CPU. With the kernel (built for AVX2 here), or on an
    AVX-512 CPU, or for an fp32 engine, it says nothing."""
    from funaudiochat.model import int8_kernel

    fp32, int8 = _model(), quantize_model(_model())
    cases = (("AVX2", int8, False, True), ("AVX2", int8, True, False), ("AVX512", int8, False, False),
             ("AVX2", fp32, False, False))
    try:
        for capability, model, kernel, warned in cases:
            monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
            int8_kernel.set_enabled(kernel)
            caplog.clear()
            with caplog.at_level("WARNING", logger="funaudiochat.engine.compiled"):
                Engine(model, compile=True)  # (builds the compiled callables; nothing is traced before a first step)
            assert any("no AVX-512" in r.getMessage() for r in caplog.records) == warned, (capability, kernel)
    finally:
        monkeypatch.undo()
        int8_kernel.set_enabled(True)


def test_prompt_passes_multiply_the_exact_int8_weights_in_bf16_and_decoding_stays_fp32():
    """Inside `prompt_products` (a prefill's layers) the int8 blocks are converted to bf16 exactly and multiplied in
    bf16 (inputs and outputs rounded to bf16, sums in fp32); outside it, and with the setting "fp32", the product is
    the fp32 one. "auto" follows the CPU (bf16 only where it is native), so it is not asserted here."""
    from funaudiochat.model.quantize import prompt_products, set_prompt_products

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(300, 96, generator=g), torch.randn(7, 96, generator=g)
    q, scale = quantize_weight(w)
    fp32 = x @ q.float().t() * scale
    bf16_ref = (x.bfloat16().float() @ q.float().t()).bfloat16().float() * scale  # inputs and outputs rounded
    cpu = torch.device("cpu")
    try:
        set_prompt_products("bf16")
        with prompt_products(cpu):
            inside = int8_linear(x, q, scale)
        outside = int8_linear(x, q, scale)
        set_prompt_products("fp32")
        with prompt_products(cpu):
            kept = int8_linear(x, q, scale)
    finally:
        set_prompt_products("auto")
    assert inside.dtype == torch.float32 and not torch.equal(inside, fp32)
    # the same values as the reference up to the order of the fp32 sums (one bf16 step of the output at most)
    assert ((inside - bf16_ref).abs() <= 2 ** -7 * bf16_ref.abs() + 1e-6).all()
    assert (inside - fp32).abs().max() <= 2 ** -6 * fp32.abs().max()
    assert (outside - fp32).abs().max() <= 1e-5 * fp32.abs().max()
    assert (kept - fp32).abs().max() <= 1e-5 * fp32.abs().max()
    with pytest.raises(ValueError, match="auto, bf16, fp32"):
        set_prompt_products("fp16")


def test_a_quantized_prefill_in_bf16_products_stays_close_to_the_fp32_products():
    """The engine's prefill runs its layers as prompt passes: with bf16 products its logits move (the setting is
    used) but stay within bf16 rounding of the fp32-product prefill, and the first greedy token is the same."""
    from funaudiochat.model.quantize import set_prompt_products

    model = quantize_model(_model())
    ids = torch.randint(30, 400, (1, 24), generator=torch.Generator().manual_seed(2))
    engine = Engine(model)
    try:
        set_prompt_products("fp32")
        ref = engine.prefill(Prompt(ids), GREEDY)[1]
        set_prompt_products("bf16")
        out = engine.prefill(Prompt(ids), GREEDY)[1]
    finally:
        set_prompt_products("auto")
    assert not torch.equal(out, ref)
    assert (out - ref).abs().max() <= 0.03 * ref.abs().max()
    assert int(out.argmax()) == int(ref.argmax())


def test_a_quantized_engines_prompt_pass_runs_the_audio_encoder_in_bf16_and_an_fp32_engines_does_not():
    """The audio encoder follows the prompt pass of a quantized engine (bf16 autocast over its fp32 weights): its
    frames move within bf16 rounding. An fp32 engine's prompt pass changes nothing (its goldens stay exact)."""
    from funaudiochat.model.quantize import set_prompt_products

    features = torch.randn(1, 128, 300, generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([300])
    fp32_engine, int8_engine = Engine(_model()), Engine(quantize_model(_model()))
    tower = int8_engine.model.continuous_audio_tower
    grad = torch.is_grad_enabled()
    torch.set_grad_enabled(False)  # (inference only: a training step's encoder is never switched)
    try:
        ref = tower.encode_frames(features, lengths)[0]
        set_prompt_products("bf16")
        with int8_engine.prompt_pass():
            moved = tower.encode_frames(features, lengths)[0]
            with torch.enable_grad():
                trained = tower.encode_frames(features, lengths)[0]
        with fp32_engine.prompt_pass():
            same = fp32_engine.model.continuous_audio_tower.encode_frames(features, lengths)[0]
    finally:
        set_prompt_products("auto")
        torch.set_grad_enabled(grad)
    assert torch.equal(trained.detach(), ref)
    assert moved.dtype == torch.float32 and not torch.equal(moved, ref)
    assert (moved - ref).abs().max() <= 0.05 * ref.abs().max()
    assert torch.equal(same, ref)  # (the two models have the same encoder weights: quantizing leaves it fp32)
