"""Parameter names and shapes of the detokenizer equal the released flow.pt / hift.pt, and the yaml reader.

The expected lists are written out from the hyper-parameters (CosyVoice3 source: CausalMaskedDiffWithDiT, DiT,
CausalHiFTGenerator), not from our modules, which are built on the meta device and compared with them.
"""
from __future__ import annotations

import pytest
import torch

from funaudiochat.errors import ConfigError
from funaudiochat.speech.cosyvoice_config import CosyVoiceConfig, load_cosyvoice_config, tiny
from funaudiochat.speech.flow import TokenToMelFlow
from funaudiochat.speech.vocoder import HiFTVocoder


def expected_flow_keys(dim=1024, depth=22, heads=16, dim_head=64, ff_mult=2, mel=80, vocab=6561, spk=192,
                       pre_channels=1024, lookahead=3):
    yield "input_embedding.weight", (vocab, mel)
    yield "spk_embed_affine_layer.weight", (mel, spk)
    yield "spk_embed_affine_layer.bias", (mel,)
    yield "pre_lookahead_layer.conv1.weight", (pre_channels, mel, lookahead + 1)
    yield "pre_lookahead_layer.conv1.bias", (pre_channels,)
    yield "pre_lookahead_layer.conv2.weight", (mel, pre_channels, 3)
    yield "pre_lookahead_layer.conv2.bias", (mel,)
    e = "decoder.estimator."
    yield e + "time_embed.time_mlp.0.weight", (dim, 256)
    yield e + "time_embed.time_mlp.0.bias", (dim,)
    yield e + "time_embed.time_mlp.2.weight", (dim, dim)
    yield e + "time_embed.time_mlp.2.bias", (dim,)
    yield e + "input_embed.proj.weight", (dim, 4 * mel)
    yield e + "input_embed.proj.bias", (dim,)
    for conv in ("conv1", "conv2"):
        yield e + f"input_embed.conv_pos_embed.{conv}.0.weight", (dim, dim // 16, 31)
        yield e + f"input_embed.conv_pos_embed.{conv}.0.bias", (dim,)
    yield e + "rotary_embed.inv_freq", (dim_head // 2,)
    inner = heads * dim_head
    for i in range(depth):
        b = f"{e}transformer_blocks.{i}."
        yield b + "attn_norm.linear.weight", (6 * dim, dim)
        yield b + "attn_norm.linear.bias", (6 * dim,)
        for proj in ("to_q", "to_k", "to_v"):
            yield b + f"attn.{proj}.weight", (inner, dim)
            yield b + f"attn.{proj}.bias", (inner,)
        yield b + "attn.to_out.0.weight", (dim, inner)
        yield b + "attn.to_out.0.bias", (dim,)
        yield b + "ff.ff.0.0.weight", (dim * ff_mult, dim)
        yield b + "ff.ff.0.0.bias", (dim * ff_mult,)
        yield b + "ff.ff.2.weight", (dim, dim * ff_mult)
        yield b + "ff.ff.2.bias", (dim,)
    yield e + "norm_out.linear.weight", (2 * dim, dim)
    yield e + "norm_out.linear.bias", (2 * dim,)
    yield e + "proj_out.weight", (mel, dim)
    yield e + "proj_out.bias", (mel,)


def _weight_normed(name, cout, cin, k):
    yield f"{name}.bias", (cout,)
    yield f"{name}.parametrizations.weight.original0", (cout, 1, 1)
    yield f"{name}.parametrizations.weight.original1", (cout, cin, k)


def _resblock(name, ch, k, dilations=(1, 3, 5)):
    for convs in ("convs1", "convs2"):
        for j in range(len(dilations)):
            yield from _weight_normed(f"{name}.{convs}.{j}", ch, ch, k)
    for acts in ("activations1", "activations2"):
        for j in range(len(dilations)):
            yield f"{name}.{acts}.{j}.alpha", (ch,)


def expected_hift_keys(base=512, mel=80, harmonics=8, n_fft=16, ups=((8, 16), (5, 11), (3, 7)),
                       res_kernels=(3, 7, 11), source_kernels=(7, 7, 11), look_right=4, f0_channels=512):
    yield "m_source.l_linear.weight", (1, harmonics + 1)
    yield "m_source.l_linear.bias", (1,)
    yield from _weight_normed("conv_pre", base, mel, look_right + 1)
    for i, (_, k) in enumerate(ups):
        yield from _weight_normed(f"ups.{i}", base // 2 ** (i + 1), base // 2 ** i, k)
    rates = [u for u, _ in ups]
    down = [1]
    for r in rates[::-1][:-1]:
        down.append(down[-1] * r)
    for i, (u, k) in enumerate(zip(down[::-1], source_kernels)):
        ch = base // 2 ** (i + 1)
        yield f"source_downs.{i}.weight", (ch, n_fft + 2, 2 * u if u > 1 else 1)
        yield f"source_downs.{i}.bias", (ch,)
        yield from _resblock(f"source_resblocks.{i}", ch, k)
    for i in range(len(ups)):
        for j, k in enumerate(res_kernels):
            yield from _resblock(f"resblocks.{i * len(res_kernels) + j}", base // 2 ** (i + 1), k)
    yield from _weight_normed("conv_post", n_fft + 2, base // 2 ** len(ups), 7)
    yield from _weight_normed("f0_predictor.condnet.0", f0_channels, mel, 4)
    for i in (2, 4, 6, 8):
        yield from _weight_normed(f"f0_predictor.condnet.{i}", f0_channels, f0_channels, 3)
    yield "f0_predictor.classifier.weight", (1, f0_channels)
    yield "f0_predictor.classifier.bias", (1,)


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _meta_modules(cfg: CosyVoiceConfig):
    with torch.device("meta"):
        return TokenToMelFlow(cfg.flow), HiFTVocoder(cfg.hift)


def test_released_sizes_have_released_keys_and_shapes():
    flow, hift = _meta_modules(CosyVoiceConfig())
    assert _shapes(flow) == dict(expected_flow_keys())
    assert _shapes(hift) == dict(expected_hift_keys())
    n_flow = sum(p.numel() for p in flow.parameters())
    assert 330e6 < n_flow < 335e6  # the released flow.pt holds ~1.33 GB of fp32
    assert all(not k.endswith("rand_noise") and "sine_noise" not in k for k in flow.state_dict() | hift.state_dict())


def test_tiny_keys_match_the_golden_key_lists(shared_dir):
    flow, hift = _meta_modules(tiny())
    for module, name, expected in ((flow, "flow_keys.txt", expected_flow_keys(64, 2, 4, 16, pre_channels=32)),
                                   (hift, "hift_keys.txt", expected_hift_keys(16, f0_channels=16))):
        listed = {}
        for line in (shared_dir / "golden/cosyvoice/cv-tiny" / name).read_text().splitlines():
            key, shape, _ = line.split("\t")
            listed[key] = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
        assert _shapes(module) == listed == dict(expected)


RELEASED_STYLE_YAML = """
__set_seed1: !apply:random.seed [1986]
sample_rate: 24000
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2
chunk_size: 25
num_decoding_left_chunks: -1
llm: !new:cosyvoice.llm.llm.CosyVoice3LM
    llm_input_size: 896
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithDiT
    input_size: 80
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    vocab_size: 6561
    input_frame_rate: !ref <token_frame_rate>
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    pre_lookahead_layer: !new:cosyvoice.transformer.upsample_encoder.PreLookaheadLayer
        in_channels: 80
        channels: {pre}
        pre_lookahead_len: 3
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                t_scheduler: 'cosine'
                inference_cfg_rate: 0.7
        estimator: !new:cosyvoice.flow.DiT.dit.DiT
            dim: {dim}
            depth: 22
            heads: 16
            dim_head: 64
            ff_mult: 2
            mel_dim: 80
            mu_dim: 80
            spk_dim: 80
            out_channels: 80
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>
hift: !new:cosyvoice.hifigan.generator.CausalHiFTGenerator
    in_channels: 80
    base_channels: 512
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    conv_pre_look_right: 4
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.CausalConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: 512
hifigan: !new:cosyvoice.hifigan.hifigan.HiFiGan
    generator: !ref <hift>
"""


def test_yaml_reader_without_executing_tags(tmp_path):
    path = tmp_path / "cosyvoice3.yaml"
    path.write_text(RELEASED_STYLE_YAML.format(pre=1024, dim=1024))
    assert load_cosyvoice_config(path) == CosyVoiceConfig()
    path.write_text(RELEASED_STYLE_YAML.format(pre=32, dim=64).replace("chunk_size: 25", "chunk_size: 15"))
    cfg = load_cosyvoice_config(path)
    assert (cfg.flow.pre_lookahead_channels, cfg.flow.dit.dim, cfg.flow.dit.static_chunk_size) == (32, 64, 30)


@pytest.mark.parametrize("text, words", [
    ("flow: [1, 2", "not valid YAML"),
    ("sample_rate: 24000\n", "no `flow:` and `hift:`"),
    (RELEASED_STYLE_YAML.format(pre="many", dim=1024), "pre_lookahead_channels"),
    (RELEASED_STYLE_YAML.format(pre=1024, dim=1024).replace("<chunk_size> * <token_mel_ratio>",
                                                            "<chunk_size> ** <token_mel_ratio>"), "cannot evaluate"),
])
def test_yaml_reader_errors(tmp_path, text, words):
    path = tmp_path / "cosyvoice3.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_cosyvoice_config(path)
