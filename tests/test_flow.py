"""Flow matching (tokens -> mel) and its DiT on tiny random weights: streaming prefix consistency, RoPE, masks."""
from __future__ import annotations

import math

import pytest
import torch

from funaudiochat.speech.cosyvoice_config import tiny
from funaudiochat.speech.dit import apply_rotary, chunk_mask
from funaudiochat.speech.flow import TokenToMelFlow, released_flow_noise


pytestmark = pytest.mark.usefixtures("one_thread")


def _flow(seed=0) -> TokenToMelFlow:
    torch.manual_seed(seed)
    return TokenToMelFlow(tiny().flow).eval()


def test_released_noise_recipe():
    torch.manual_seed(0)  # the released CausalConditionalCFM.__init__: set_all_random_seed(0), then randn
    assert torch.equal(released_flow_noise(), torch.randn(1, 80, 15000))


def test_output_lengths_and_noise_not_in_checkpoint():
    flow = _flow()
    tokens, emb = torch.randint(0, 6561, (1, 20)), torch.randn(1, 192)
    assert flow.inference(tokens, emb, finalize=True).shape == (1, 80, 40)
    assert flow.inference(tokens, emb, finalize=False).shape == (1, 80, 34)  # the last 3 tokens are context
    assert "decoder.rand_noise" not in flow.state_dict()
    assert "decoder.estimator.rotary_embed.inv_freq" in flow.state_dict()


def test_streaming_chunks_are_prefixes_of_longer_calls():
    """With the chunk mask (chunk = 2*hop frames), a chunk's mel does not change when later tokens arrive."""
    flow, hop = _flow(), 15
    tokens, emb = torch.randint(0, 6561, (1, 3 * hop + 3)), torch.randn(1, 192)
    longest = flow.inference(tokens, emb, finalize=False, streaming=True)  # [1, 80, 6 hop]
    for n_chunks in (1, 2):
        shorter = flow.inference(tokens[:, :n_chunks * hop + 3], emb, finalize=False, streaming=True)
        assert torch.allclose(shorter, longest[:, :, :2 * hop * n_chunks], atol=1e-5)
    # with full attention the first frames do see the later tokens
    full = flow.inference(tokens, emb, finalize=False, streaming=False)
    assert (full[:, :, :2 * hop] - longest[:, :, :2 * hop]).abs().max() > 1e-3


def test_cfg_uses_an_unconditional_row():
    """v = 1.7 v(mu, spks) - 0.7 v(0, 0, 0): rate 0 must give a different mel, and speakers must matter."""
    flow = _flow()
    tokens, emb = torch.randint(0, 6561, (1, 12)), torch.randn(1, 192)
    calls = []
    mel = flow.inference(tokens, emb, on_step=lambda k, x, t, v: calls.append((x, t)))
    assert len(calls) == 10 and all(x.shape[0] == 2 and torch.equal(x[0], x[1]) for x, _ in calls)
    expected_t = [1 - math.cos(math.pi / 2 * k / 10) for k in range(10)]
    assert torch.allclose(torch.stack([t[0] for _, t in calls]), torch.tensor(expected_t), atol=1e-6)
    assert (flow.inference(tokens, -emb) - mel).abs().max() > 1e-3
    flow.cfg.inference_cfg_rate = 0.0
    assert (flow.inference(tokens, emb) - mel).abs().max() > 1e-3


def test_rope_rotates_head_zero_only_and_is_relative():
    d, heads = 16, 4
    flow = _flow()
    angles = flow.decoder.estimator.rotary_embed(10)  # [10, d]
    x = torch.randn(1, 10, heads * d)
    out = apply_rotary(x, angles)
    assert torch.equal(out[..., d:], x[..., d:])  # x-transformers on [B, T, H*D]: only the first D channels
    pairs_in, pairs_out = x[..., :d].unflatten(-1, (-1, 2)), out[..., :d].unflatten(-1, (-1, 2))
    assert torch.allclose(pairs_in.norm(dim=-1), pairs_out.norm(dim=-1), atol=1e-5)
    q, k = torch.randn(d), torch.randn(d)
    rot = lambda v, pos: apply_rotary(v.expand(1, 10, d), angles)[0, pos]  # noqa: E731
    assert math.isclose(float(rot(q, 7) @ rot(k, 4)), float(rot(q, 5) @ rot(k, 2)), rel_tol=1e-4)


def test_chunk_mask():
    expected = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(chunk_mask(5, 2), expected.bool())
