"""LoRA on the LLM: adapters start at the base and merge into it exactly; a LoRA stage trains only the adapters
(and the parts the recipe names), exports merged weights + the folded delta, resumes its adapters, and the
Core-Cocktail merge of a LoRA stage is base + alpha * delta (checked against the dense interpolation)."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from helpers import make_tiny_checkpoint, synthetic_s2s

from funaudiochat.errors import CheckpointError, ConfigError
from funaudiochat.model import lora
from funaudiochat.model.checkpoint import load_model, read_state_dict
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.presets import tiny
from funaudiochat.train import loop
from funaudiochat.train.config import recipe_from_dict
from funaudiochat.train.merge import merge_checkpoints, merge_state_dicts

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _llm_out(model, ids):
    return model.language_model.lm_head(model.language_model.model.embed_tokens(ids))


def test_adapters_start_at_base_and_merge_exactly():
    torch.manual_seed(0)
    model = FunAudioChatModel(tiny())
    model.init_weights(0.02)
    layer = model.language_model.model.layers[0].self_attn
    x = torch.randn(2, 5, layer.q_proj.in_features)
    before = layer.q_proj(x)
    names = lora.attach(model, rank=4, alpha=8.0, targets=TARGETS)
    assert len(names) == 3 * len(model.language_model.model.layers)
    assert all(n.startswith("language_model.") for n in names)  # the SRH's linears are not adapted
    torch.testing.assert_close(layer.q_proj(x), before, rtol=0, atol=0)  # B = 0: exactly the base
    with torch.no_grad():
        layer.q_proj.lora_B.normal_()
    after = layer.q_proj(x)
    assert (after - before).abs().max() > 1e-3
    dense, folded = lora.merged_state(model.state_dict(), 8.0 / 4)
    w = dense["language_model.model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(torch.nn.functional.linear(x, w, layer.q_proj.bias), after, rtol=1e-5, atol=1e-5)
    # folded deltas concatenate along the rank and add up
    both = lora.concat(folded, lora.scaled(folded, 0.5))
    name = "language_model.model.layers.0.self_attn.q_proj"
    assert both[name + ".lora_A"].shape[0] == 8
    torch.testing.assert_close(lora.delta(both, name), 1.5 * lora.delta(folded, name), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="lora.targets"):
        lora.attach(FunAudioChatModel(tiny()), 4, 8.0, ["qproj"])


def test_recipe_lora_section_is_checked():
    base = {"model": {"preset": "tiny", "tokenizer": "t.json"}, "data": {"train": ["x.jsonl"]}}
    assert recipe_from_dict(base).lora.rank == 0
    with pytest.raises(ConfigError) as err:
        recipe_from_dict({**base, "lora": {"rank": -1, "alpha": 0, "targets": ["lm_head"]}})
    text = str(err.value)
    assert "lora.rank" in text and "lora.alpha" in text and "lora.targets" in text


def _recipe(tmp_path, start, data, run, steps=2, every=0, lr=5e-2):
    return recipe_from_dict({
        "run_dir": str(tmp_path / run), "model": {"checkpoint": str(start)},
        "data": {"train": [str(data)], "max_len": 256},
        "optim": {"lr": lr, "min_lr": lr / 10, "warmup_steps": 0},
        "train": {"steps": steps, "global_batch": 4, "micro_batch": 2, "trainable": ["*"],
                  "frozen": ["continuous_audio_tower.*"]},
        "lora": {"rank": 2, "alpha": 4.0, "targets": TARGETS},
        "checkpoint": {"every": every, "keep_last": 3},
        "log": {"progress": False, "tensorboard": False}})


def test_lora_stages_merge_and_resume(tmp_path):
    torch.set_num_threads(1)
    start = make_tiny_checkpoint(tmp_path / "base")
    data = synthetic_s2s(tmp_path / "data", n=4)
    loop.run(_recipe(tmp_path, start, data, "stage1", every=1))
    final = tmp_path / "stage1" / "final"
    base, tuned = read_state_dict(start), read_state_dict(final)
    delta = lora.load_delta(final)
    assert sorted({k.rsplit(".", 2)[-2] for k in delta}) == sorted(TARGETS)
    # the LLM's own weights stayed frozen: the export is base + B A on the adapted layers, base elsewhere
    torch.testing.assert_close(tuned, lora.apply(base, delta) | {k: tuned[k] for k in tuned
                                                                   if not k.startswith("language_model.")},
                               rtol=0, atol=1e-6)
    assert max(float(lora.delta(delta, n).abs().max()) for n in lora.modules_of(delta)) > 1e-4
    assert any(not torch.equal(base[k], tuned[k]) for k in tuned if k.startswith("audio_tower."))
    assert all(torch.equal(base[k], tuned[k]) for k in tuned if k.startswith("continuous_audio_tower."))
    # inference on a training checkpoint folds its live adapters (scale recorded beside them), as the export does
    last = tmp_path / "stage1" / "checkpoints" / "step-2" / "model"
    from_step = load_model(last).state_dict()
    for k, v in load_model(final).state_dict().items():
        torch.testing.assert_close(from_step[k], v, rtol=0, atol=1e-6)
    assert lora.adapters_scale(last) == 4.0 / 2
    # an adapter file written before the scale was recorded takes it from the run's recipe.yaml, else a clear error
    old = tmp_path / "old" / "checkpoints" / "step-2" / "model"
    shutil.copytree(last, old)
    from safetensors.torch import save_file
    save_file(lora.load(old / lora.ADAPTER_FILE), str(old / lora.ADAPTER_FILE), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="without their scale"):
        load_model(old)
    shutil.copy(tmp_path / "stage1" / "recipe.yaml", tmp_path / "old" / "recipe.yaml")
    torch.testing.assert_close(load_model(old).state_dict(), from_step, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="training checkpoint"):  # merging it would leave the adapters out
        merge_checkpoints(start, last, tmp_path / "merged-step", alpha=0.5)
    # a resumed run reads its adapters back: deleting the last step and resuming gives the same export
    step1 = tmp_path / "stage1" / "checkpoints" / "step-1"
    assert (step1 / "model" / lora.ADAPTER_FILE).is_file()
    shutil.rmtree(tmp_path / "stage1" / "checkpoints" / "step-2")
    shutil.rmtree(final)
    loop.run(_recipe(tmp_path, start, data, "stage1", every=1), resume=True)
    again = read_state_dict(final)
    for k in tuned:
        torch.testing.assert_close(again[k], tuned[k], rtol=0, atol=1e-6)

    # Core-Cocktail merge with LoRA = base + alpha * delta = the dense interpolation
    merged_dir = merge_checkpoints(start, final, tmp_path / "merged", alpha=0.5)
    merged = read_state_dict(merged_dir)
    dense = merge_state_dicts(base, tuned, 0.5)
    for k in dense:
        torch.testing.assert_close(merged[k], dense[k], rtol=0, atol=1e-6)
    half = lora.load_delta(merged_dir)
    name = lora.modules_of(delta)[0]
    torch.testing.assert_close(lora.delta(half, name), 0.5 * lora.delta(delta, name), rtol=1e-6, atol=1e-7)

    # stage 2 from the merge: its delta file holds the merged delta followed by its own adapters
    loop.run(_recipe(tmp_path, merged_dir, data, "stage2", lr=1e-2))
    final2 = tmp_path / "stage2" / "final"
    total = lora.load_delta(final2)
    assert total[name + ".lora_A"].shape[0] == 4
    tuned2 = read_state_dict(final2)
    rebuilt = lora.apply(base, total)
    for k in tuned2:
        if k.startswith("language_model."):
            torch.testing.assert_close(tuned2[k], rebuilt[k], rtol=0, atol=1e-5)
    load_model(final2)  # an ordinary inference checkpoint

    # a stage-1 model whose LLM changed outside the adapters is refused (no silent inexact merge)
    bad = tmp_path / "bad"
    shutil.copytree(final, bad)
    state = read_state_dict(bad)
    state["language_model.model.layers.0.mlp.up_proj.weight"] += 0.1
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not trained from BASE"):
        merge_checkpoints(start, bad, tmp_path / "merged-bad", alpha=0.5)
    proc = subprocess.run([sys.executable, "-m", "funaudiochat.cli", "merge", str(start), str(bad),
                           str(tmp_path / "merged-bad"), "--alpha", "0.5"], capture_output=True, text=True)
    assert proc.returncode == 1 and "funaudiochat merge: error:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "merged-bad").exists()
