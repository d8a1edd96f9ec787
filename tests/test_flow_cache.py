"""The streaming flow's key/value cache (`speech/flow_cache.py`): a non-final call that computes only the frames from
the window's first incomplete chunk on gives the mel of the whole-window call, for rows at different depths in one
batch; a stream with the cache gives the audio of one without it, for hops that end chunks mid-way, and across the
flow window's and HiFT's resets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from funaudiochat.speech.detokenizer import Detokenizer
from funaudiochat.speech.flow_cache import FlowCache, cached_rows
from tests.helpers import write_tiny_detokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4  # fp32, mel values up to about 6: the cached call multiplies fewer rows at a time (measured 1e-6 apart)


@pytest.fixture(scope="module")
def detok(tmp_path_factory):
    return Detokenizer.from_dir(write_tiny_detokenizer(tmp_path_factory.mktemp("cosyvoice_tiny")))


def _tokens(n, seed):
    return torch.randint(0, 6561, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_cached_calls_equal_whole_window_calls(detok):
    flow, chunk = detok.flow, detok.flow.cfg.dit.static_chunk_size
    rows = [_tokens(160, seed) for seed in range(3)]
    starts, hop = [0, 11, 40], 13  # three rows at different depths; 26 frames a call: chunks end mid-call
    emb = torch.cat([detok.speaker_embedding("中文女"), detok.speaker_embedding("中文男"),
                     detok.speaker_embedding("中文女")])
    caches = [FlowCache() for _ in rows]
    computed = []
    for offset in range(0, 100, hop):
        windows = [row[:start + offset + hop + 3] for row, start in zip(rows, starts)]
        whole = flow.inference_rows(windows, emb, streaming=True)
        mels, kept = cached_rows(flow, windows, emb, caches)
        for ref, mel, cache, new in zip(whole, mels, caches, kept):
            assert mel.shape[2] == ref.shape[2] - cache.frames
            torch.testing.assert_close(mel, ref[:, :, cache.frames:], rtol=0, atol=TOL)
            assert new.frames == ref.shape[2] // chunk * chunk  # everything up to the last complete chunk is kept
        computed += [m.shape[2] for m in mels]
        caches = kept
    assert max(computed[3:]) < 2 * hop + chunk  # past the first call, only about a hop and a chunk of frames
    with pytest.raises(ValueError, match="extend the window"):
        cached_rows(flow, [rows[0][:20]], emb[:1], [caches[0]])


@pytest.mark.parametrize("hop,bounds", [(15, {}), (10, dict(flow_window=40, hift_reset=80)),
                                        (25, dict(flow_window=50))])
def test_stream_with_cache_equals_stream_without(detok, hop, bounds):
    tokens = _tokens(170, hop)
    audio = {}
    for cache in (True, False):
        stream = detok.stream("中文男", hop=hop, flow_cache=cache, **bounds)
        chunks = [c for i in range(0, len(tokens), 7) for c in stream.push(tokens[i:i + 7])]
        audio[cache] = [len(c) for c in chunks], np.concatenate(chunks + [stream.finalize()])
    assert audio[True][0] == audio[False][0]  # the same chunks
    np.testing.assert_allclose(audio[True][1], audio[False][1], rtol=0, atol=1e-4)
    assert np.abs(audio[False][1]).max() > 1e-3  # real audio, not silence
