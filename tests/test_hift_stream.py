"""Incremental HiFT (`hift_stream.vocode_rows`): each chunk vocodes only its new mel frames, yet the audio is what
re-running HiFT on the whole accumulated mel gives (the released streaming loop), alone or batched, without clicks;
the streaming detokenizer on it equals the released loop's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from funaudiochat.errors import InputError
from funaudiochat.speech.cosyvoice_config import tiny
from funaudiochat.speech.detokenizer import Detokenizer
from funaudiochat.speech.hift_stream import HiFTStream, vocode_rows
from funaudiochat.speech.vocoder import HiFTVocoder
from tests.helpers import write_tiny_detokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# measured <= 1.2e-6 (the same operations on the same values; convolution blocking, FFT and overlap-add sum order
# differ); the audio is within +-0.99
TOL = 1e-5


def _hift() -> HiFTVocoder:
    torch.manual_seed(0)
    hift = HiFTVocoder(tiny().hift).eval()
    with torch.no_grad():  # f0 around the 10 Hz voicing threshold: voiced and unvoiced frames, sines and noise
        hift.f0_predictor.classifier.weight.mul_(150)
        hift.f0_predictor.classifier.bias.fill_(12)
    return hift


def _mel(frames, seed=1):
    return torch.randn(1, 80, frames, generator=torch.Generator().manual_seed(seed)) * 2 - 5


def _whole(hift, mel, finalize=False) -> torch.Tensor:
    """The released loop's output so far: HiFT on the whole accumulated mel (nothing until it has 9 frames)."""
    return hift(mel, finalize=finalize)[0] if finalize or mel.shape[2] > 8 else torch.zeros(0)


@pytest.mark.parametrize("sizes, rest", [
    ([30] * 5, 10),              # the server's hop (15 tokens = 30 frames)
    ([5, 3, 12, 1, 29, 40], 0),  # a first call held until it has 9 frames; a 1-frame chunk; nothing left to finalise
    ([9, 60, 2], 7),
    ([5], 0),                    # finalised before any chunk was vocoded
])
def test_each_chunk_equals_the_whole_mel_rerun(sizes, rest):
    hift, mel = _hift(), _mel(sum(sizes) + rest)
    state, got, frames = HiFTStream(), [], 0
    for n in sizes:
        (state,), (wav,) = vocode_rows(hift, [state], [mel[:, :, frames:frames + n]])
        frames += n
        got.append(wav)
        whole = _whole(hift, mel[:, :, :frames])
        assert torch.cat(got).shape == whole.shape  # exactly the samples the re-run releases, chunk after chunk
        if whole.numel():
            assert (torch.cat(got) - whole).abs().max() <= TOL
    (state,), (wav,) = vocode_rows(hift, [state], [mel[:, :, frames:]], finalize=True)
    stream, whole = torch.cat(got + [wav]), _whole(hift, mel, finalize=True)
    assert stream.shape == whole.shape == (480 * mel.shape[2],)
    assert (stream - whole).abs().max() <= TOL


def test_batched_rows_equal_the_whole_mel_rerun():
    """Streams at different points (first chunks next to later ones, chunks of different sizes) share calls."""
    hift = _hift()
    mels = [_mel(160, seed) for seed in range(3)]
    plans = [[30, 30, 30, 30], [0, 30, 12, 30], [0, 4, 30, 45]]  # frames each stream brings to each round
    states, got, frames = [HiFTStream() for _ in plans], [[] for _ in plans], [0] * len(plans)
    for step in range(4):
        rows = [i for i, plan in enumerate(plans) if plan[step]]
        new = [mels[i][:, :, frames[i]:frames[i] + plans[i][step]] for i in rows]
        for i, state, wav in zip(rows, *vocode_rows(hift, [states[i] for i in rows], new)):
            states[i], frames[i] = state, frames[i] + plans[i][step]
            got[i].append(wav)
        for i in rows:
            whole = _whole(hift, mels[i][:, :, :frames[i]])
            assert torch.cat(got[i]).shape == whole.shape
            assert whole.numel() == 0 or (torch.cat(got[i]) - whole).abs().max() <= TOL, f"stream {i}, round {step}"
    finals = vocode_rows(hift, states, [m[:, :, f:] for m, f in zip(mels, frames)], finalize=True)[1]
    for i, (mel, wav) in enumerate(zip(mels, finals)):
        assert (torch.cat(got[i] + [wav]) - _whole(hift, mel, finalize=True)).abs().max() <= TOL


def test_the_streams_passed_in_are_not_changed():
    hift, mel = _hift(), _mel(70)
    (state,), _ = vocode_rows(hift, [HiFTStream()], [mel[:, :, :30]])
    frames, context = state.frames, {k: v.clone() for k, v in state.context.items()}
    (first,), (wav1,) = vocode_rows(hift, [state], [mel[:, :, 30:60]])
    (again,), (wav2,) = vocode_rows(hift, [state], [mel[:, :, 30:60]])  # a retry of the same chunk
    assert state.frames == frames and all(torch.equal(state.context[k], v) for k, v in context.items())
    assert torch.equal(wav1, wav2) and first.frames == again.frames == 60


def _jumps(chunks):
    wav = np.concatenate([c.numpy() for c in chunks])
    edges = np.cumsum([len(c) for c in chunks])[:-1] - 1  # jump from each chunk's last sample to the next's first
    return np.abs(np.diff(wav)), edges


def test_no_clicks_at_chunk_boundaries():
    hift, mel = _hift(), _mel(90)
    state, chunks, frames = HiFTStream(), [], 0
    for n in (20, 30, 30):
        (state,), (wav,) = vocode_rows(hift, [state], [mel[:, :, frames:frames + n]])
        chunks.append(wav)
        frames += n
    chunks.append(vocode_rows(hift, [state], [mel[:, :, frames:]], finalize=True)[1][0])
    jumps, edges = _jumps(chunks)
    whole_jumps = np.abs(np.diff(_whole(hift, mel, finalize=True).numpy()))
    assert jumps[edges].max() <= np.delete(jumps, edges).max() + TOL
    assert np.abs(jumps[edges] - whole_jumps[edges]).max() <= 2 * TOL  # the very jumps of the unbroken audio
    # the check sees a seam: chunks vocoded each on its own (no state carried) jump otherwise at their boundaries
    naive = [hift(mel[:, :, a:b], finalize=True)[0] for a, b in ((0, 20), (20, 50), (50, 90))]
    naive_jumps, naive_edges = _jumps(naive)
    assert np.abs(naive_jumps[naive_edges] - whole_jumps[naive_edges]).max() > 100 * TOL


@pytest.fixture(scope="module")
def detok(tmp_path_factory):
    return Detokenizer.from_dir(write_tiny_detokenizer(tmp_path_factory.mktemp("cosyvoice_tiny")))


@pytest.mark.parametrize("n_tokens, settings", [
    (83, dict(speaker="中文女", hop=15, flow_window=30, hift_reset=60)),  # windows move, the vocoder resets
    (50, dict(speaker="中文男", hop=10, chunk_attention=False)),
])
def test_the_stream_equals_the_released_loop(detok, n_tokens, settings):
    tokens = torch.randint(0, 6561, (n_tokens,), generator=torch.Generator().manual_seed(3)).tolist()
    out = {}
    for vocoder in ("incremental", "whole"):
        session = detok.stream(vocoder=vocoder, **settings)
        chunks = [c for start in range(0, len(tokens), 7) for c in session.push(tokens[start:start + 7])]
        out[vocoder] = chunks + [session.finalize()], session.state.mel
    (chunks, mel), (ref_chunks, ref_mel) = out["incremental"], out["whole"]
    assert [len(c) for c in chunks] == [len(c) for c in ref_chunks]
    assert np.abs(np.concatenate(chunks) - np.concatenate(ref_chunks)).max() <= TOL
    assert torch.equal(mel, ref_mel)


def test_unknown_vocoder_mode(detok):
    with pytest.raises(InputError, match="vocoder must be one of"):
        detok.stream(vocoder="fast")
