"""S3 speech tokenizer: golden parity, ONNX export/import, batching, segmenting, input errors, training mode."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from funaudiochat.errors import CheckpointError, InputError
from funaudiochat.speech.s3onnx import S3TokenizerONNX, export_onnx, load_onnx_tokenizer, load_speech_tokenizer
from funaudiochat.speech.s3tokenizer import (
    CODEBOOK_SIZE, S3Tokenizer, S3TokenizerConfig, code_lengths, expected_code_count, segment_bounds,
    tokenize_audio, tokenize_batch,
)

TINY = dict(n_mels=128, n_audio_state=128, n_audio_head=2, n_audio_layer=2)
LENGTHS = [1, 2, 3, 5, 37, 150, 203]  # mel frames; most are not multiples of 4


def random_tokenizer(seed: int = 0, **overrides) -> S3Tokenizer:
    """A tiny tokenizer with O(1)-scale random weights (as the goldens draw them), so every FSQ level occurs."""
    model = S3Tokenizer(S3TokenizerConfig(**{**TINY, **overrides}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5))
        model.quantizer._codebook["project_down"].weight.mul_(3)
    return model.eval()


def random_mels(lengths, n_mels=128, seed=1, pad_value=None):
    """[B, M, max T] mel batch; frames past each length hold `pad_value` (random garbage when None)."""
    g = torch.Generator().manual_seed(seed)
    mel = torch.randn(len(lengths), n_mels, max(lengths), generator=g)
    if pad_value is not None:
        for i, n in enumerate(lengths):
            mel[i, :, n:] = pad_value
    return mel, torch.tensor(lengths)


def one_by_one(model, mel, mel_len):
    return [model.quantize(mel[i: i + 1, :, :n], torch.tensor([n]))[0][0] for i, n in enumerate(mel_len.tolist())]


# ---- golden parity -----------------------------------------------------------------------------------------------

def test_golden_s3v3_tiny(shared_dir):
    from funaudiochat.check import s3

    results = s3.run(shared_dir / "golden" / "cosyvoice" / "s3v3-tiny")
    assert {r.case for r in results} >= {"codes1", "codes2", "batch_codes", "batch_encoder_hidden", "mel1", "mel2"}
    assert all(r.ok for r in results), "\n".join(r.line() for r in results)


# ---- ONNX --------------------------------------------------------------------------------------------------------

def assert_codes_agree(theirs, ours, label: str, min_agree: float = 0.98) -> None:
    """ONNX Runtime vs torch: same length and (almost) the same codes. The two libraries sum in different orders
    (and by CPU instruction set), so a hidden value within ~1e-6 of an FSQ rounding boundary may round the other
    way: a rare code may differ; a broken export disagrees on almost every code."""
    theirs, ours = np.asarray(theirs), np.asarray(ours)
    assert theirs.shape == ours.shape, label
    agree = float(np.mean(theirs == ours)) if ours.size else 1.0
    assert agree >= min_agree, f"{label}: only {agree:.1%} of the codes agree"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = random_tokenizer()
    return model, export_onnx(model, tmp_path_factory.mktemp("s3") / "tok.onnx")


def test_onnx_export_gives_torch_codes(exported):
    model, path = exported
    backend = S3TokenizerONNX(path, threads=1)
    mel, mel_len = random_mels(LENGTHS)
    codes, code_len = backend.quantize(mel, mel_len)
    assert code_len.tolist() == [code_lengths(n) for n in LENGTHS]
    ours = one_by_one(model, mel, mel_len)
    for i, n in enumerate(code_len.tolist()):
        assert_codes_agree(codes[i, :n], ours[i], f"length {LENGTHS[i]}")
    assert len(torch.cat(ours).unique()) > 20  # the comparison is not between constant outputs


def test_onnx_file_has_released_interface(exported):
    import onnx

    graph = onnx.load(str(exported[1])).graph
    assert [i.name for i in graph.input] == ["feats", "feats_length"]
    assert [o.name for o in graph.output] == ["indices"]
    assert graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.INT32


def test_onnx_import_restores_weights_and_sizes(tmp_path):
    model = random_tokenizer(seed=3, n_audio_layer=3, fsmn_kernel=15, attn_ln_eps=1e-6)
    loaded = load_onnx_tokenizer(export_onnx(model, tmp_path / "t.onnx"))
    assert loaded.config == model.config
    ref = model.state_dict()
    assert loaded.state_dict().keys() == ref.keys()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_onnx_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        S3TokenizerONNX(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not an onnx model")
    with pytest.raises(CheckpointError):
        S3TokenizerONNX(junk)
    with pytest.raises(CheckpointError):
        load_onnx_tokenizer(junk)


# ---- torch module ------------------------------------------------------------------------------------------------

def test_batched_equals_one_by_one():
    model = random_tokenizer(seed=5)
    mel, mel_len = random_mels([150, 37, 203, 4, 1])  # garbage past each length must not leak
    codes, code_len = model.quantize(mel, mel_len)
    hidden, _ = model.encode(mel, mel_len)
    for i, single in enumerate(one_by_one(model, mel, mel_len)):
        n = int(code_len[i])
        assert torch.equal(codes[i, :n], single)
        alone, _ = model.encode(mel[i: i + 1, :, : int(mel_len[i])], mel_len[i: i + 1])
        torch.testing.assert_close(hidden[i, :n], alone[0], rtol=1e-5, atol=1e-5)


def test_codes_are_fsq_digits():
    model = random_tokenizer(seed=2)
    mel, mel_len = random_mels([90])
    out = model(mel, mel_len)
    assert out.codes.min() >= 0 and out.codes.max() < CODEBOOK_SIZE
    assert set(out.digits.unique().tolist()) <= {-1.0, 0.0, 1.0}
    powers = 3 ** torch.arange(8)
    assert torch.equal(((out.digits.long() + 1) * powers).sum(-1), out.codes)
    assert torch.equal(model.fsq_codes(out.hidden), out.codes)


def test_training_mode_straight_through():
    model = random_tokenizer(seed=4)
    mel, mel_len = random_mels([60, 41])
    eval_codes = model.quantize(mel, mel_len)[0]
    model.train()
    out = model(mel, mel_len)
    assert torch.equal(out.codes, eval_codes)
    out.digits.pow(2).sum().backward()
    assert model.encoder.conv1.weight.grad.abs().sum() > 0
    assert model.quantizer._codebook["project_down"].weight.grad.abs().sum() > 0


def test_invalid_mel_inputs():
    model = random_tokenizer()
    mel, mel_len = random_mels([20])
    with pytest.raises(InputError, match="128"):
        model.quantize(torch.randn(1, 80, 20), mel_len)
    with pytest.raises(InputError):
        model.quantize(mel[0], mel_len)
    with pytest.raises(InputError, match="mel_len"):
        model.quantize(mel, torch.tensor([21]))
    with pytest.raises(InputError, match="mel_len"):
        model.quantize(mel, torch.tensor([0]))
    with pytest.raises(InputError, match="NaN"):
        model.quantize(torch.full_like(mel, float("nan")), mel_len)


# ---- front -------------------------------------------------------------------------------------------------------

def test_segment_bounds_rules():
    sr = 16000
    assert segment_bounds(61 * sr) == [(0, 30 * sr), (30 * sr, 60 * sr), (60 * sr, 61 * sr)]
    merged = 30 * sr + (30 * sr + sr // 2) // 2  # the last two segments (30 s + 0.5 s) split at half
    assert segment_bounds(60 * sr + sr // 2) == [(0, 30 * sr), (30 * sr, merged), (merged, 60 * sr + sr // 2)]
    assert segment_bounds(30 * sr) == [(0, 30 * sr)]
    assert segment_bounds(sr // 2) == [(0, sr // 2)]  # a single short segment is kept
    assert segment_bounds(30 * sr + sr) == [(0, 30 * sr), (30 * sr, 31 * sr)]  # exactly 1 s: not merged
    for n in (1, 17, 30 * sr - 1, 30 * sr + 1, 90 * sr + 7, 123457):
        b = segment_bounds(n)
        assert b[0][0] == 0 and b[-1][1] == n and all(x[1] == y[0] for x, y in zip(b, b[1:]))
        assert all(e - s <= 30 * sr for s, e in b)
    with pytest.raises(InputError, match="empty"):
        segment_bounds(0)


def test_tokenize_rejects_bad_audio():
    model = random_tokenizer()
    with pytest.raises(InputError, match="empty"):
        tokenize_audio(np.zeros(0, np.float32), model)
    with pytest.raises(InputError, match="mono"):
        tokenize_audio(np.zeros((2, 16000), np.float32), model)
    with pytest.raises(InputError, match="NaN"):
        tokenize_audio(np.full(16000, np.nan, np.float32), model)
    with pytest.raises(InputError, match="float"):
        tokenize_audio(np.zeros(16000, np.int16), model)


def test_tokenize_long_audio_and_batches(exported):
    from funaudiochat.audio.mel import log_mel

    model, path = exported
    rng = np.random.default_rng(0)
    long_wav = (0.1 * rng.standard_normal(16000 * 60 + 8000)).astype(np.float32)  # 60.5 s: tail merged
    short_wav = (0.1 * rng.standard_normal(16000 + 333)).astype(np.float32)
    codes = tokenize_audio(long_wav, model)
    assert len(codes) == expected_code_count(len(long_wav))
    by_segment = [model.quantize(m[None], torch.tensor([m.shape[-1]]))[0][0].numpy() for m in
                  (log_mel(torch.from_numpy(long_wav[s:e]), 128) for s, e in segment_bounds(len(long_wav)))]
    assert np.array_equal(codes, np.concatenate(by_segment))
    batch = tokenize_batch([short_wav, long_wav], model, max_segments=2)
    assert np.array_equal(batch[1], codes)
    assert np.array_equal(batch[0], tokenize_audio(short_wav, model))
    assert_codes_agree(tokenize_audio(short_wav, load_speech_tokenizer(path, "onnx", threads=1)), batch[0], "onnx")
    assert np.array_equal(tokenize_audio(short_wav, load_speech_tokenizer(path, "torch")), batch[0])
    with pytest.raises(InputError, match="backend"):
        load_speech_tokenizer(path, "tensorrt")
