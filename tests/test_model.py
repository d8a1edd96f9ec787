"""Model parts against independent oracles (transformers' own Qwen3 / Qwen3-MoE / Llama) and invariants."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from funaudiochat.config import BackboneConfig
from funaudiochat.model.backbone import CausalLM, KVCache, attention_mask_4d
from funaudiochat.model.encoder import AudioEncoder, conv_output_lengths
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.presets import tiny

transformers = pytest.importorskip("transformers")


def _hf_model(cfg: BackboneConfig):
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
              num_key_value_heads=cfg.num_key_value_heads, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
              tie_word_embeddings=cfg.tie_word_embeddings, max_position_embeddings=cfg.max_position_embeddings)
    if cfg.model_type == "llama":
        hf_cfg = transformers.LlamaConfig(**kw)
        return transformers.LlamaForCausalLM(hf_cfg)
    if cfg.model_type == "qwen3_moe":
        hf_cfg = transformers.Qwen3MoeConfig(**kw, head_dim=cfg.dim_head, num_experts=cfg.num_experts,
                                             num_experts_per_tok=cfg.num_experts_per_tok, norm_topk_prob=cfg.norm_topk_prob,
                                             moe_intermediate_size=cfg.moe_intermediate_size, decoder_sparse_step=1)
        return transformers.Qwen3MoeForCausalLM(hf_cfg)
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kw, head_dim=cfg.dim_head))


@pytest.mark.parametrize("backbone", ["qwen3", "llama", "qwen3_moe"])
def test_backbone_matches_transformers(backbone):
    cfg = tiny(backbone).text_config
    torch.manual_seed(0)
    ours = CausalLM(cfg)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.3)
    hf = _hf_model(cfg).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    # transformers 5 may store MoE experts fused; map them when needed
    if missing:
        sd = ours.state_dict()
        fused = {}
        for name in missing:
            if "experts" in name:
                layer = name.split(".layers.")[1].split(".")[0]
                e = cfg.num_experts
                pre = f"model.layers.{layer}.mlp.experts"
                if name.endswith("gate_up_proj"):
                    fused[name] = torch.stack([torch.cat([sd[f"{pre}.{i}.gate_proj.weight"], sd[f"{pre}.{i}.up_proj.weight"]])
                                               for i in range(e)])
                elif name.endswith("down_proj"):
                    fused[name] = torch.stack([sd[f"{pre}.{i}.down_proj.weight"] for i in range(e)])
        hf.load_state_dict(fused, strict=False)
        still = [m for m in missing if m not in fused]
        assert not still, still
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 8:] = 0  # right padding
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        pos = torch.arange(11)[None].expand(2, -1)
        ours_logits = ours.lm_head(ours.model(ours.embed(ids), pos, attention_mask_4d(mask, 11, 11, 0, 2, "cpu")))
    valid = mask.bool()
    diff = (ours_logits - ref)[valid].abs().max()
    assert diff <= 1e-4 * ref[valid].abs().max(), float(diff)


@pytest.mark.parametrize("backbone", ["qwen3", "qwen3_moe"])
def test_last_only_prefill_equals_the_last_row_and_fills_the_same_cache(backbone):
    cfg = tiny(backbone).text_config
    torch.manual_seed(0)
    model = CausalLM(cfg).eval()
    x = torch.randn(2, 9, cfg.hidden_size)
    mask2d = torch.ones(2, 9, dtype=torch.long)
    mask2d[1, :3] = 0  # left padding
    pos = (mask2d.cumsum(-1) - 1).clamp(min=0)
    mask = attention_mask_4d(mask2d, 9, 9, 0, 2, "cpu")
    full_cache, last_cache = (KVCache(cfg, 2, 12, torch.float32, "cpu") for _ in range(2))
    with torch.no_grad():
        full = model.model(x, pos, mask, full_cache, 0, 9)
        last = model.model(x, pos, mask, last_cache, 0, 9, last_only=True)
    assert last.shape == (2, 1, cfg.hidden_size)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)
    for a, b in zip(full_cache.k + full_cache.v, last_cache.k + last_cache.v):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_encoder_features_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    cfg = tiny().audio_config
    enc = AudioEncoder(cfg).eval()
    feats = torch.randn(3, 128, 450)
    lens = torch.tensor([450, 130, 0])
    with torch.no_grad():
        batched = enc(feats, lens, 120)
        single = enc(feats[1:2, :, :130], lens[1:2], 120)
    assert (batched[1] - single[0]).abs().max() < 1e-5
    assert batched[2].abs().max() == 0  # zero-length audio gives zero features
    n25 = int(conv_output_lengths(torch.tensor(450))[1])
    assert batched[0, :n25].abs().sum(-1).min() > 0 and batched[0, n25:].abs().max() == 0


def test_encoder_attention_stays_inside_chunks():
    """Changing frames in one 2 s chunk leaves the other chunks' outputs (before pooling) unchanged."""
    torch.manual_seed(0)
    enc = AudioEncoder(tiny().audio_config).eval()
    a = torch.randn(1, 128, 400)
    b = a.clone()
    b[..., 250:] += 1.0  # second chunk only (chunks are 200 mel frames)
    with torch.no_grad():
        fa = enc.encode_frames(a, torch.tensor([400]))[0]
        fb = enc.encode_frames(b, torch.tensor([400]))[0]
    assert torch.equal(fa[:100], fb[:100]) and not torch.equal(fa[100:], fb[100:])


def test_packed_segments_attend_within_their_segment():
    mask = attention_mask_4d(torch.tensor([[1, 1, 2, 2, 2, 0]]), 6, 6, 0, 1, "cpu")[0, 0]
    assert mask[3].tolist() == [False, False, True, True, False, False]
    assert mask[5].tolist() == [True, True, True, True, True, False] or mask[5].sum() >= 1


def test_training_forward_after_generation_still_works():
    """Generation keeps no state on modules (the released generate leaves the SRH patched, SPEC §13 item 2)."""
    from funaudiochat.engine.generate import Engine, GenerationConfig
    from funaudiochat.engine.prompt import Prompt

    torch.manual_seed(0)
    model = FunAudioChatModel(tiny())
    ids = torch.randint(0, 400, (1, 12))
    before = model(ids, labels=ids).loss
    Engine(model).generate(Prompt(ids), GenerationConfig(max_new_tokens=4, force_text_abos=True, eos_token_id=502,
                                                         pad_token_id=500))
    after = model(ids, labels=ids).loss
    assert torch.allclose(before, after, atol=1e-6)


OWN_GOLDENS = Path(__file__).parent / "golden"  # official-code outputs for MoE / Llama backbones (see README.txt)
ALL_CASES = ("train_fwd", "train_fwd_posids", "train_fwd_packed", "gen", "gen_rep", "gen_s2t", "gen_single_b",
             "gen_batch2")


def _cases_pass(directory):
    from funaudiochat.check.model import run

    results = run(directory)
    bad = [r.line() for r in results if not r.ok]
    assert not bad, "\n".join(bad)
    return {r.case.split(" ")[0] for r in results}


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-dense-add"])
def test_shared_goldens_pass(shared_dir, name):
    assert _cases_pass(shared_dir / "golden" / name) == set(ALL_CASES)


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-moe-sparse", "tiny-llama"])
def test_moe_and_llama_goldens_pass(name):
    cases = _cases_pass(OWN_GOLDENS / name)
    assert {"train_fwd", "gen", "gen_s2t"} <= cases
    if name == "tiny-moe":
        assert "train_fwd_router_aux" in cases


def test_check_reference_cli_exit_codes(tmp_path):
    run = subprocess.run([sys.executable, "-m", "funaudiochat.cli", "check-reference", str(OWN_GOLDENS / "tiny-llama")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ok   train_fwd:" in run.stdout and "all cases pass" in run.stdout
    run = subprocess.run([sys.executable, "-m", "funaudiochat.cli", "check-reference", str(tmp_path)],
                         capture_output=True, text=True)
    assert run.returncode == 1 and "no golden reference directory" in run.stderr


def test_check_reference_fails_on_a_perturbed_model(shared_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src = shared_dir / "golden/tiny-dense"
    dst = tmp_path / "golden"
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model/model.safetensors"))
    state["audio_invert_tower.crq_transformer.layers.1.mlp.down_proj.weight"] *= 1.01
    save_file(state, str(dst / "model/model.safetensors"), metadata={"format": "pt"})
    run = subprocess.run([sys.executable, "-m", "funaudiochat.cli", "check-reference", str(dst)],
                         capture_output=True, text=True)
    assert run.returncode == 1
    assert "FAIL train_fwd:" in run.stdout and "speech_logits" in run.stdout
    assert "ok   train_fwd" not in run.stdout.replace("ok   train_fwd_", "")


def test_full_scale_user_audio_switch():
    """Released training averages every audio row's features with its transcript embedding, zero for user audio,
    so user audio enters at half scale in training only (SPEC §13 item 5, the default). The switch, on for models
    trained here from a fresh adapter, leaves rows without a transcript at full scale, as inference sees them."""
    torch.manual_seed(0)
    cfg = tiny()
    model = FunAudioChatModel(cfg).eval()
    k = cfg.audio_config.group_size
    ids = torch.randint(0, 100, (2, 4 * k))
    mask = torch.ones_like(ids)
    text = torch.randint(30, 100, (2, 4))
    has_text = torch.tensor([True, False])  # an assistant row with its transcript, a user row without
    with torch.no_grad():
        released = model.encode_audio(ids, mask, text_ids=text, text_attention_mask=has_text)
        groups = model.encode_audio(ids, mask).features
        assert torch.allclose(released.features[1], groups[1] / 2)
        cfg.audio_config.full_scale_user_audio = True
        switched = model.encode_audio(ids, mask, text_ids=text, text_attention_mask=has_text)
    assert torch.equal(switched.features[0], released.features[0])
    assert torch.equal(switched.features[1], groups[1])
    assert "full_scale_user_audio" in cfg.audio_config.to_dict()
    cfg.audio_config.full_scale_user_audio = False
    assert "full_scale_user_audio" not in cfg.audio_config.to_dict()  # released configs round-trip unchanged


def test_concat_grouping_converts_a_mean_adapter_exactly_and_hears_frame_order(tmp_path):
    """`continuous_grouping: concat` sets each group's k encoder frames side by side before the matching layer. A
    mean-grouping model converts to it exactly (the trainer's recipe switch), and unlike the mean it tells the
    order of the frames in a group apart once trained away from the converted weight."""
    from funaudiochat.errors import ConfigError
    from funaudiochat.model.adapter import regroup_continuous_weight
    from funaudiochat.model.checkpoint import save_model
    from funaudiochat.train.config import Recipe
    from funaudiochat.train.loop import _regrouped_model

    torch.manual_seed(0)
    cfg = tiny()
    a = cfg.audio_config
    mean_model = FunAudioChatModel(cfg).eval()
    mean_model.init_weights(0.3)
    k = a.group_size
    feats = torch.randn(2, a.num_mel_bins, 400)  # 4 s of log-mel at 100 Hz -> 100 frames at 25 Hz -> 20 groups
    fmask = torch.ones(2, 400, dtype=torch.long)
    ids = torch.full((2, 100), a.pad_token_id)
    smask = torch.ones_like(ids)

    def groups(model):
        with torch.no_grad():
            return model.encode_audio(ids, smask, feats, fmask).features

    save_model(mean_model, tmp_path)
    concat_cfg = tiny()
    concat_cfg.audio_config.continuous_grouping = "concat"
    concat_model = _regrouped_model(tmp_path, concat_cfg, Recipe(), fold_adapters=True).eval()
    w = concat_model.audio_tower.continual_output_matching.weight
    assert w.shape == (a.output_dim, k * a.output_dim)
    torch.testing.assert_close(groups(concat_model), groups(mean_model), rtol=1e-5, atol=1e-5)
    back = regroup_continuous_weight(w.detach(), k, True, k, False)  # and back to the mean weight
    torch.testing.assert_close(back, mean_model.audio_tower.continual_output_matching.weight, rtol=1e-6, atol=1e-6)

    frames = torch.randn(1, 2 * k, a.output_dim)  # two groups; the second with its frames in reverse order
    swapped = torch.cat([frames[:, :k], frames[:, k:].flip(1)], dim=1)
    mean_out = mean_model.audio_tower.group_continuous
    torch.testing.assert_close(mean_out(swapped), mean_out(frames))  # the mean cannot hear the order
    with torch.no_grad():
        w.add_(torch.randn_like(w) * 0.1)  # a trained concat weight: blocks differ per frame
        moved = concat_model.audio_tower.group_continuous(swapped) - concat_model.audio_tower.group_continuous(frames)
    assert moved[0, 0].abs().max() == 0 and moved[0, 1].abs().max() > 1e-3

    assert "continuous_grouping" not in cfg.audio_config.to_dict()  # released configs round-trip unchanged
    assert concat_cfg.audio_config.to_dict()["continuous_grouping"] == "concat"
    with pytest.raises(ConfigError, match="continuous_grouping"):
        type(a).from_dict({**a.to_dict(), "continuous_grouping": "max"})


def test_continuous_output_rms_holds_user_audio_at_the_text_scale():
    """`continuous_output_rms` RMS-normalises each continuous 5 Hz vector (no learned gain), so however large the
    adapter's weights grow, user audio enters the LLM at the scale set (the mini: its text embeddings' RMS)."""
    from funaudiochat.errors import ConfigError
    from funaudiochat.model.adapter import GroupingAdapter

    cfg = tiny().audio_config
    k, d = cfg.group_size, cfg.output_dim
    frames = torch.randn(2, 4 * k, d)
    free = GroupingAdapter(cfg)
    cfg.continuous_output_rms = 0.25
    held = GroupingAdapter(cfg)
    held.load_state_dict(free.state_dict())
    with torch.no_grad():
        for adapter in (free, held):
            adapter.continual_output_matching.weight.mul_(100.0)  # weights grown in training
        out_free, out_held = free.group_continuous(frames), held.group_continuous(frames)
    rms = out_held.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, 0.25), rtol=1e-4, atol=1e-5)
    assert out_free.pow(2).mean(-1).sqrt().min() > 10 * 0.25  # without it the scale follows the weights
    cos = torch.nn.functional.cosine_similarity(out_free, out_held, dim=-1)  # the direction is the adapter's own
    torch.testing.assert_close(cos, torch.ones_like(cos), rtol=1e-5, atol=1e-5)
    assert cfg.to_dict()["continuous_output_rms"] == 0.25
    cfg.continuous_output_rms = None
    assert "continuous_output_rms" not in cfg.to_dict()  # released configs round-trip unchanged
    for bad in (0, -1.0, float("nan"), "0.1", True):
        with pytest.raises(ConfigError, match="continuous_output_rms"):
            type(cfg).from_dict({**cfg.to_dict(), "continuous_output_rms": bad})


def test_srh_token_scale_is_applied_alike_in_training_and_generation():
    """`srh_token_scale` multiplies the previous-token embedding in the SRH's input: the teacher-forced forward (from
    the adapter's tied table) and the generation path (`embed`, one token at a time) build the same input, and a
    scale other than 1 changes the logits. Released configs round-trip without the field."""
    from funaudiochat.errors import ConfigError
    from funaudiochat.model.backbone import attention_mask_4d
    from funaudiochat.model.srh import SpeechRefinedHead

    cfg = tiny().audio_config
    k, n = cfg.group_size, 3
    torch.manual_seed(0)
    plain = SpeechRefinedHead(cfg)
    cfg.srh_token_scale = 7.0
    scaled = SpeechRefinedHead(cfg)
    scaled.load_state_dict(plain.state_dict())
    u = torch.randn(1, n, cfg.output_dim)
    labels = torch.randint(0, cfg.num_codes, (1, n * k))
    table = scaled.lm_head.weight  # the adapter's speech embedding is tied to it
    with torch.no_grad():
        train = scaled.forward_train(u, torch.nn.functional.embedding(labels, table), None, None)
        # generation: fine position q gets the ungrouped state plus embed(token q+k-1), as `Engine._srh_group` adds it
        z = scaled.ungroup(u) + torch.roll(scaled.embed(labels), shifts=-(k - 1), dims=1)
        mask = attention_mask_4d(None, n * k, n * k, 0, 1, "cpu")
        generated = scaled.decode(z, torch.arange(n * k)[None], mask)
        unscaled = plain.forward_train(u, torch.nn.functional.embedding(labels, table), None, None)
    torch.testing.assert_close(train, generated, rtol=1e-5, atol=1e-5)
    assert (train - unscaled).abs().max() > 1e-3
    assert cfg.to_dict()["srh_token_scale"] == 7.0
    cfg.srh_token_scale = 1.0
    assert "srh_token_scale" not in cfg.to_dict()
    for bad in (0, -2.0, float("inf"), "3", True):
        with pytest.raises(ConfigError, match="srh_token_scale"):
            type(cfg).from_dict({**cfg.to_dict(), "srh_token_scale": bad})
