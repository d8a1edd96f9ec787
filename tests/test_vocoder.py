"""HiFT vocoder on tiny random weights: causal streaming, weight-norm folding, checkpoint formats, fixed noise."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from funaudiochat.errors import InputError
from funaudiochat.speech.cosyvoice_config import tiny
from funaudiochat.speech.detokenizer import load_hift_state
from funaudiochat.speech.vocoder import HiFTVocoder, released_source_rng


pytestmark = pytest.mark.usefixtures("one_thread")


def _hift(seed=0) -> HiFTVocoder:
    torch.manual_seed(seed)
    hift = HiFTVocoder(tiny().hift).eval()
    with torch.no_grad():  # f0 around the 10 Hz voicing threshold (default init gives ~0 Hz): voiced and unvoiced
        hift.f0_predictor.classifier.weight.mul_(150)
        hift.f0_predictor.classifier.bias.fill_(12)
    return hift


def _mel(frames, seed=1):
    return torch.randn(1, 80, frames, generator=torch.Generator().manual_seed(seed)) * 2 - 5


def test_lengths_clamp_and_voicing():
    hift, mel = _hift(), _mel(30)
    trace = {}
    wav = hift(mel, finalize=True, trace=trace)
    assert wav.shape == (1, 30 * 480) and wav.abs().max() <= 0.99
    assert 0 < trace["uv"].mean() < 1  # both voiced and unvoiced samples
    assert hift(mel, finalize=False).shape == (1, (30 - 8) * 480)  # 3 f0 + 4 conv_pre look-ahead frames, 480 held


def test_non_final_call_is_a_prefix_of_the_final_one():
    """Causal HiFT: vocoding a mel prefix (the rest as look-ahead) gives the first samples of the whole."""
    hift, mel = _hift(), _mel(40)
    whole = hift(mel, finalize=True)
    for frames in (12, 25):
        part = hift(mel[:, :, :frames], finalize=False)
        assert part.shape[1] == (frames - 8) * 480
        assert (part - whole[:, :part.shape[1]]).abs().max() < 1e-4


def test_fold_weight_norm_is_exact():
    hift, mel = _hift(), _mel(20)
    before = hift(mel)
    hift.fold_weight_norm()
    assert not any("parametrizations" in k for k in hift.state_dict())
    assert (hift(mel) - before).abs().max() < 1e-6


def test_checkpoint_formats(tmp_path):
    """Released (parametrizations), `generator.`-prefixed, legacy weight_g/weight_v and folded hift.pt all load."""
    src, mel = _hift(seed=3), _mel(20)
    ref = src(mel)
    state = src.state_dict()
    legacy = {}
    for k, v in state.items():
        k = k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
                                                                               "weight_v")
        legacy[k] = v
    folded_src = _hift(seed=3)
    folded_src.fold_weight_norm()
    variants = {"released": state, "prefixed": {f"generator.{k}": v for k, v in state.items()},
                "legacy": legacy, "folded": folded_src.state_dict()}
    for name, variant in variants.items():
        torch.save(variant, tmp_path / f"{name}.pt")
        dst = _hift(seed=9)
        load_hift_state(dst, tmp_path / f"{name}.pt")
        assert (dst(mel) - ref).abs().max() < 1e-6, name


def test_released_noise_replays_the_construction_order():
    """SineGen2's fixed noise comes from the global RNG after seed 0 and the flow/F0-predictor inits: replay them
    with real modules and compare with our generator-only replay."""
    cfg = tiny()
    torch.manual_seed(0)
    torch.randn(1, 80, 15000)  # CausalConditionalCFM.rand_noise
    nn.Embedding(cfg.flow.vocab_size, cfg.flow.input_size)  # CausalMaskedDiffWithDiT body
    nn.Linear(cfg.flow.spk_embed_dim, cfg.flow.output_size)
    c = cfg.hift.f0_cond_channels
    nn.Sequential(nn.Conv1d(80, c, 4), *(nn.Conv1d(c, c, 3) for _ in range(4)), nn.Linear(c, 1))  # F0 predictor
    rand_ini = torch.rand(1, 9)
    rand_ini[:, 0] = 0
    sine_noise = torch.rand(1, 300 * 24000, 9)
    hift = HiFTVocoder(cfg.hift, rng=released_source_rng(cfg))
    assert torch.equal(hift.m_source.rand_ini, rand_ini)
    n = 5 * 24000
    assert torch.equal(hift.m_source._noise(n), sine_noise[:, :n])  # made on demand: a prefix of the full draw
    assert torch.equal(hift.m_source._noise(40 * 24000), sine_noise[:, :40 * 24000])


def test_too_long_for_injected_noise():
    hift = _hift()
    hift.m_source.set_noise(torch.zeros(1, 9), torch.rand(1, 480 * 10, 9))
    hift(_mel(10))
    with pytest.raises(InputError, match="fixed noise"):
        hift(_mel(11))
