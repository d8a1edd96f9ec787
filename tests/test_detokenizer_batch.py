"""The streaming detokenizer batched across sessions (`detokenizer.drain`): each stream's audio equals what it makes
alone, for streams of different lengths, speakers and bounds joining and leaving at different times."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from funaudiochat.speech import detokenizer as detok_module
from funaudiochat.speech.detokenizer import Detokenizer, drain, pack
from tests.helpers import write_tiny_detokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4  # fp32: a batched GEMM may round differently from a one-row one; the audio is within +-0.99
PIECE = 3   # tokens per engine step (one speech group)


@pytest.fixture(scope="module")
def detok(tmp_path_factory):
    return Detokenizer.from_dir(write_tiny_detokenizer(tmp_path_factory.mktemp("cosyvoice_tiny")))


# (first round, tokens, stream settings): different lengths, start times, speakers, attention modes and bounds
SESSIONS = [
    (0, 96, dict(speaker="中文女", hop=15, flow_window=30, hift_reset=60)),  # bounds reached: windows move, mel resets
    (2, 40, dict(speaker="中文男", hop=15)),
    (3, 21, dict(speaker="中文女", hop=15)),                                   # leaves early
    (5, 70, dict(speaker="中文男", hop=15, chunk_attention=False)),           # full attention: another batch
    (6, 62, dict(speaker="中文女", hop=15, chunk_attention=False, flow_window=45)),
    (9, 33, dict(speaker="中文女", hop=15)),                                   # joins late
    (1, 50, dict(speaker="中文男", hop=15, flow_cache=False)),                # every call on the whole window
    (1, 42, dict(speaker="中文女", hop=15, flow_cache=False)),
]


def _tokens(n, seed):
    return torch.randint(0, 6561, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _pieces(tokens):
    return [tokens[i:i + PIECE] for i in range(0, len(tokens), PIECE)]


def _alone(detok, tokens, settings):
    stream = detok.stream(**settings)
    chunks = [c for piece in _pieces(tokens) for c in stream.push(piece)]
    return chunks, stream.finalize()


def test_batched_streams_equal_each_stream_alone(detok, monkeypatch):
    tokens = [_tokens(n, seed) for seed, (_, n, _) in enumerate(SESSIONS)]
    rows_per_call, cached_per_call = [], []
    inference_rows, cached_rows = type(detok.flow).inference_rows, detok_module.cached_rows
    monkeypatch.setattr(type(detok.flow), "inference_rows",
                        lambda self, rows, *a, **kw: rows_per_call.append(len(rows)) or inference_rows(self, rows, *a,
                                                                                                     **kw))
    monkeypatch.setattr(detok_module, "cached_rows",
                        lambda flow, rows, *a: cached_per_call.append(len(rows)) or cached_rows(flow, rows, *a))
    streams = [detok.stream(**settings) for _, _, settings in SESSIONS]
    chunks = [[] for _ in SESSIONS]
    finals = [None] * len(SESSIONS)
    pieces = [_pieces(t) for t in tokens]
    fed = set()
    for step in range(max(start + len(p) for (start, _, _), p in zip(SESSIONS, pieces)) + 1):
        for i, (start, _, _) in enumerate(SESSIONS):
            k = step - start
            if 0 <= k < len(pieces[i]):
                streams[i].feed(pieces[i][k])
                fed.add(i)
        if step % 4 == 3 or any(step - start == len(p) for (start, _, _), p in zip(SESSIONS, pieces)):
            # like the server's detokenizer worker: whatever arrived while it was busy is drained together
            live = sorted(fed)
            for i, new in zip(live, drain([streams[i] for i in live])):
                chunks[i] += new
            fed.clear()
        for i, (start, _, _) in enumerate(SESSIONS):
            if step - start == len(pieces[i]):  # its last piece went in on the step before: it leaves
                finals[i] = streams[i].finalize()
    assert max(cached_per_call) >= 3 and max(rows_per_call) >= 2  # the streams really shared calls
    for i, (_, n, settings) in enumerate(SESSIONS):
        ref_chunks, ref_final = _alone(detok, tokens[i], settings)
        assert [len(c) for c in chunks[i]] == [len(c) for c in ref_chunks], f"session {i}: other chunk boundaries"
        got, ref = np.concatenate(chunks[i] + [finals[i]]), np.concatenate(ref_chunks + [ref_final])
        assert got.shape == ref.shape and got.shape[0] > 0
        assert np.abs(got - ref).max() < TOL, f"session {i}: {np.abs(got - ref).max():.2e}"


def test_padding_is_masked(detok):
    """Two rows of very different lengths in one call each equal their one-row call (the padding is not seen)."""
    flow, hift = detok.flow, detok.hift
    short, long = _tokens(12, 7), _tokens(60, 8)
    emb = torch.cat([detok.speakers["中文女"], detok.speakers["中文男"]])
    for streaming in (True, False):
        mels = flow.inference_rows([short, long], emb, streaming=streaming)
        for row, mel, e in zip((short, long), mels, emb):
            alone = flow.inference(torch.tensor([row]), e[None], finalize=False, streaming=streaming)
            assert mel.shape == alone.shape and torch.allclose(mel, alone, atol=TOL)
    mels = [flow.inference(torch.tensor([row]), detok.speakers["中文女"], finalize=False) for row in (short, long)]
    for mel, wav in zip(mels, hift.forward_rows(mels)):
        alone = hift(mel, finalize=False)[0]
        assert wav.shape == alone.shape and torch.allclose(wav, alone, atol=TOL)


@pytest.mark.parametrize("vocoder", ["whole", "incremental"])
def test_a_failed_round_leaves_every_stream_as_it_was(detok, monkeypatch, vocoder):
    from funaudiochat.speech import hift_stream

    streams = [detok.stream(speaker=s, vocoder=vocoder) for s in ("中文女", "中文男")]
    for s, seed in zip(streams, (1, 2)):
        s.feed(_tokens(20, seed))
    before = [(list(s.state.tokens), s.state.token_offset, s.state.speech_offset) for s in streams]

    def broken(self, *args):
        raise RuntimeError("vocoder out of memory")
    if vocoder == "whole":
        monkeypatch.setattr(type(detok.hift), "forward_rows", broken)
    else:  # fails after every layer but the iSTFT has moved its (copied) state
        monkeypatch.setattr(hift_stream._Rows, "istft", broken)
    with pytest.raises(RuntimeError):
        drain(streams)
    assert [(list(s.state.tokens), s.state.token_offset, s.state.speech_offset) for s in streams] == before
    assert all(s.state.mel is None for s in streams)
    assert all(s.state.hift.frames == 0 and not s.state.hift.context for s in streams)


def test_pack_bounds_the_padding():
    assert pack([10, 10, 10]) == [[0, 1, 2]]
    assert pack([1000, 100, 150]) == [[0], [2, 1]]  # padding the short rows to 1000 would be ~1.7x the work
    for lengths in ([5, 400, 37, 37, 200, 199, 1, 90], list(range(1, 60))):
        groups = pack(lengths)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            assert len(g) * max(lengths[i] for i in g) <= detok_module.MAX_PADDING * sum(lengths[i] for i in g)


def test_the_server_worker_batches_sessions_and_isolates_a_failing_one(detok):
    """DetokenizerWorker (the server's detokenizer thread): pushes that arrive together are drained together, each
    session gets its own chunks in order, and bad codes fail that session alone."""
    import threading

    from funaudiochat.errors import InputError
    from funaudiochat.serve.detok_worker import DetokenizerWorker
    from funaudiochat.serve.metrics import Metrics

    metrics = Metrics()
    worker = DetokenizerWorker(metrics)
    try:
        hold = threading.Event()
        worker.call(hold.wait, 60)  # keeps the worker busy while every push below arrives: one round takes them all
        tokens = [_tokens(n, seed) for seed, n in enumerate((40, 55, 30))]
        streams = [detok.stream(s, 15) for s in ("中文女", "中文男", "中文女")]
        got = [[] for _ in streams]
        for i, (stream, toks) in enumerate(zip(streams, tokens)):
            for piece in _pieces(toks):
                worker.push(stream, piece, got[i].append)
        worker.push(streams[2], [-5], got[2].append)  # not a speech code: this session fails
        finals = [worker.finalize(s) for s in streams[:2]]
        hold.set()
        finals = [f.result(timeout=120) for f in finals]
    finally:
        worker.close()
    rounds = metrics.detok_round_streams  # some round drained the two good sessions together
    assert rounds.counts[rounds.buckets.index(2)] >= 1
    for i in range(2):
        ref_chunks, ref_final = _alone(detok, tokens[i], dict(speaker=("中文女", "中文男")[i], hop=15))
        chunks = [c for result in got[i] for c in result]
        assert [len(c) for c in chunks] == [len(c) for c in ref_chunks]
        assert np.abs(np.concatenate(chunks + [finals[i]]) - np.concatenate(ref_chunks + [ref_final])).max() < TOL
    assert any(isinstance(r, InputError) for r in got[2])
