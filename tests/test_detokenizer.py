"""Detokenizer (tokens -> wav): golden parity, folder loading, streaming vs one-shot, speakers, bad inputs."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import soundfile as sf
import torch

from funaudiochat.check import cosyvoice as check_cosyvoice
from funaudiochat.errors import CheckpointError, InputError, SessionClosedError
from funaudiochat.speech import detokenizer as detok_module
from funaudiochat.speech.detokenizer import Detokenizer, segment
from funaudiochat.speech.speaker import kaldi_fbank
from tests.helpers import tiny_detokenizer_modules as tiny_modules
from tests.helpers import TINY_COSYVOICE_YAML, write_campplus_stub, write_tiny_detokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A detokenizer folder written in the released formats from tiny random modules."""
    return write_tiny_detokenizer(tmp_path_factory.mktemp("cosyvoice_tiny"))


@pytest.fixture(scope="module")
def detok(model_dir):
    return Detokenizer.from_dir(model_dir)


def _tokens(n, seed=2):
    return torch.randint(0, 6561, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_golden_parity(shared_dir):
    results = check_cosyvoice.run(shared_dir / "golden/cosyvoice/cv-tiny")
    assert len(results) >= 10
    assert all(r.ok for r in results), "\n".join(r.line() for r in results if not r.ok)


def test_folder_round_trip_equals_in_memory_modules(detok):
    flow, hift = tiny_modules()
    ref = Detokenizer(flow, hift, speakers=detok.speakers)
    tokens = _tokens(23)
    assert detok.sample_rate == 24000
    assert torch.equal(detok.speaker_embedding(), detok.speakers["中文女"])
    wav = detok.token2wav(tokens)
    assert wav.dtype == np.float32 and wav.shape == (23 * 960,)
    assert np.abs(wav - ref.token2wav(tokens)).max() < 1e-5
    assert np.abs(detok.token2wav(tokens, speaker="中文男") - wav).max() > 1e-3


def _stream(detok, tokens, **kw):
    session = detok.stream(**kw)
    chunks = []
    for start in range(0, len(tokens), 7):  # tokens arrive in uneven pieces
        chunks += session.push(tokens[start:start + 7])
    return chunks, session.finalize(), session


def test_streaming_equals_one_shot_composition(detok):
    """Chunks 0..K-1 use the chunk mask with 3 look-ahead tokens, the final call full attention: the stream must
    equal HiFT over that composed mel, seamlessly (HiFT is causal and its noise fixed)."""
    hop, tokens = 15, _tokens(70)
    chunks, last, session = _stream(detok, tokens, hop=hop)
    assert [len(c) for c in chunks] == [(30 - 8) * 480] + [30 * 480] * 3  # (70 - 3) // 15 = 4 chunks
    stream = np.concatenate(chunks + [last])
    assert stream.shape == (70 * 960,)
    k = 4 * hop
    t, emb = torch.tensor([tokens]), detok.speaker_embedding()
    with torch.inference_mode():
        head = detok.flow.inference(t[:, :k + 3], emb, finalize=False, streaming=True)
        tail = detok.flow.inference(t, emb, finalize=True, streaming=False)[:, :, 2 * k:]
        mel = torch.cat([head, tail], dim=2)
        one_shot = detok.hift(mel, finalize=True)[0].numpy()
    assert torch.allclose(session.state.mel, mel, atol=1e-5)
    assert np.abs(stream - one_shot).max() < 1e-3
    # no clicks: the sample-to-sample jump at each chunk boundary is no larger than anywhere else
    jumps = np.abs(np.diff(stream))
    edges = np.cumsum([len(c) for c in chunks]) - 1
    assert jumps[edges].max() <= np.delete(jumps, edges).max()


def test_streaming_vs_offline(detok):
    """Streaming differs from offline only by attention context (chunk mask, or not yet seen tokens). On these
    random weights the RMS difference is ~1.4% of the signal's (measured); a chunk shifted by one mel frame
    would be of the order of the signal itself."""
    tokens = _tokens(52)
    offline = detok.token2wav(tokens)
    rms = lambda x: float(np.sqrt(np.mean(x ** 2)))  # noqa: E731
    for chunk_attention in (True, False):
        chunks, last, _ = _stream(detok, tokens, hop=15, chunk_attention=chunk_attention)
        stream = np.concatenate(chunks + [last])
        assert stream.shape == offline.shape
        assert rms(stream - offline) < 0.1 * rms(offline)


def test_flow_window_bounds_the_context(detok):
    tokens = _tokens(80)
    chunks, last, session = _stream(detok, tokens, hop=15, flow_window=30)
    assert np.concatenate(chunks + [last]).shape == (80 * 960,)
    assert len(session.state.tokens) < 30 + 15 + 3 + 7


def test_offline_segmentation(detok, monkeypatch):
    assert segment(1600) == [(0, 750), (750, 1500), (1500, 1600)]
    assert segment(1520) == [(0, 750), (750, 1135), (1135, 1520)]  # a 20-token tail is merged, then halved
    assert segment(10) == [(0, 10)]
    monkeypatch.setattr(detok_module, "SEGMENT_TOKENS", 20)
    monkeypatch.setattr(detok_module, "MIN_LAST_SEGMENT_TOKENS", 5)
    tokens = _tokens(43)
    pieces = [detok.token2wav(tokens[a:b]) for a, b in [(0, 20), (20, 31), (31, 43)]]
    assert np.array_equal(detok.token2wav(tokens), np.concatenate(pieces))


def test_bad_inputs(detok, caplog):
    with pytest.raises(InputError, match="中文女, 中文男"):
        detok.token2wav([1, 2, 3], speaker="nobody")
    with pytest.raises(InputError, match="negative"):
        detok.token2wav([1, -2, 3])
    with pytest.raises(InputError, match="no speech tokens"):
        detok.token2wav([])
    with pytest.raises(InputError, match="no speech tokens"):
        detok.token2wav([6561, 6562])
    with pytest.raises(InputError, match="192"):
        detok.token2wav([1, 2], speaker=np.zeros(10))
    with pytest.raises(InputError, match="integers"):
        detok.token2wav(["a", "b"])
    with pytest.raises(InputError, match="integers"):
        detok.token2wav([1.5, 2])
    with caplog.at_level(logging.WARNING):
        wav = detok.token2wav([5, 6561, 7, 9000, 8])
    assert wav.shape == (3 * 960,) and "dropping 2 speech token" in caplog.text
    with pytest.raises(InputError, match="fixed hop"):  # growing chunks are the Piper detokenizer's
        detok.stream(hop=15, max_hop=60)
    detok.stream(hop=15, max_hop=15)
    session = detok.stream()
    session.finalize()
    with pytest.raises(SessionClosedError):
        session.push([1, 2])


def test_missing_or_wrong_files(model_dir, tmp_path):
    (tmp_path / "cosyvoice3.yaml").write_text(TINY_COSYVOICE_YAML)
    with pytest.raises(CheckpointError, match="flow.pt"):
        Detokenizer.from_dir(tmp_path)
    (tmp_path / "flow.pt").write_bytes((model_dir / "flow.pt").read_bytes())
    with pytest.raises(CheckpointError, match="hift.pt"):
        Detokenizer.from_dir(tmp_path)
    (tmp_path / "hift.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="hift.pt"):
        Detokenizer.from_dir(tmp_path)
    (tmp_path / "hift.pt").write_bytes((model_dir / "hift.pt").read_bytes())
    Detokenizer.from_dir(tmp_path)  # no spk2info.pt: loads, but needs a speaker per call
    with pytest.raises(InputError, match="no speaker"):
        Detokenizer.from_dir(tmp_path).token2wav([1, 2])
    (tmp_path / "cosyvoice3.yaml").unlink()  # released-size defaults vs tiny weights
    with pytest.raises(CheckpointError, match=r"flow.pt does not fit .*missing, e.g. decoder.estimator.transfo"):
        Detokenizer.from_dir(tmp_path)


def test_speaker_vector_files(detok, tmp_path):
    vec = torch.randn(1, 192)
    torch.save(vec, tmp_path / "spk.pt")
    np.save(tmp_path / "spk.npy", vec.numpy()[0])
    a = detok.token2wav([1, 2, 3, 4], speaker=str(tmp_path / "spk.pt"))
    b = detok.token2wav([1, 2, 3, 4], speaker=str(tmp_path / "spk.npy"))
    c = detok.token2wav([1, 2, 3, 4], speaker=vec)
    assert np.array_equal(a, b) and np.array_equal(a, c)
    torch.save({"not": "a vector"}, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="bad.pt"):
        detok.token2wav([1, 2], speaker=str(tmp_path / "bad.pt"))


def _sine_wav(seconds=1.0, rate=16000):
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(0).standard_normal(t.size)
    wav = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * noise).astype(np.float32)
    wav[rate // 2: rate // 2 + 2000] = 0  # some digital silence: the log floor
    return wav


def test_kaldi_fbank_matches_kaldi_native_fbank():
    knf = pytest.importorskip("kaldi_native_fbank")
    wav = _sine_wav(2.0)
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0
    opts.mel_opts.num_bins = 80
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(16000, wav.tolist())
    fb.input_finished()
    ref = np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)])
    ours = kaldi_fbank(torch.from_numpy(wav)).numpy()
    assert ours.shape == ref.shape == (198, 80)
    assert np.abs(ours - ref).max() < 1e-3


def test_speaker_from_wav_through_an_onnx_speaker_model(model_dir, tmp_path):
    """campplus.onnx stand-in: mean over time of |feats| @ W. Checks fbank, mean removal and the ONNX plumbing."""
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("flow.pt", "hift.pt", "cosyvoice3.yaml"):
        (folder / name).write_bytes((model_dir / name).read_bytes())
    w = write_campplus_stub(folder)
    wav = _sine_wav()
    sf.write(tmp_path / "ref.wav", wav, 16000)
    d = Detokenizer.from_dir(folder, speaker=str(tmp_path / "ref.wav"))  # no spk2info.pt: the wav is the default
    feats = kaldi_fbank(torch.from_numpy(wav))
    expected = (feats - feats.mean(0)).abs().mean(0) @ torch.from_numpy(w)
    assert torch.allclose(d.speaker_embedding(), expected[None], rtol=1e-3, atol=1e-3)
    with pytest.raises(InputError, match="unknown speaker"):
        d.speaker_embedding("中文女")
