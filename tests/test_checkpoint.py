"""Checkpoint I/O: bit-identical round trips, shards, tied weights under either name, clear errors."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from funaudiochat.errors import CheckpointError
from funaudiochat.model.checkpoint import INDEX_FILE, SPEECH_EMBED, SPEECH_HEAD, load_model, save_model
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.presets import tiny


def _random_model(backbone="qwen3"):
    torch.manual_seed(1)
    model = FunAudioChatModel(tiny(backbone))
    model.init_weights(0.5)
    return model


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("backbone", ["qwen3", "qwen3_moe", "llama"])
def test_round_trip_is_bit_identical(tmp_path, backbone):
    model = _random_model(backbone)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    _assert_same(model, loaded)
    # the tie survives loading: one tensor serves the adapter embedding and the SRH output layer
    assert loaded.audio_invert_tower.lm_head.weight is loaded.audio_tower.embed_tokens.weight
    assert SPEECH_HEAD not in load_file(str(tmp_path / "model.safetensors"))


def test_sharded_checkpoint_loads(tmp_path):
    model = _random_model()
    save_model(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (tmp_path / "model.safetensors").exists()
    _assert_same(model, load_model(tmp_path))


def test_tied_embedding_stored_under_the_head_name(tmp_path):
    model = _random_model()
    save_model(model, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state[SPEECH_HEAD] = state.pop(SPEECH_EMBED)
    save_file(state, str(tmp_path / "model.safetensors"))
    _assert_same(model, load_model(tmp_path))


def _edit(tmp_path, fn):
    model = _random_model()
    save_model(model, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    fn(state)
    save_file(state, str(tmp_path / "model.safetensors"))


def test_missing_tensor_is_named(tmp_path):
    _edit(tmp_path, lambda s: s.pop("language_model.model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): language_model\.model\.layers\.1\.mlp\.up_proj"):
        load_model(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    _edit(tmp_path, lambda s: s.__setitem__("language_model.model.layers.9.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): language_model\.model\.layers\.9\.extra"):
        load_model(tmp_path)


def test_mis_shaped_tensor_is_named(tmp_path):
    _edit(tmp_path, lambda s: s.__setitem__("audio_tower.output_matching.weight", torch.zeros(64, 63)))
    with pytest.raises(CheckpointError, match=r"audio_tower\.output_matching\.weight: checkpoint \(64, 63\) vs model \(64, 64\)"):
        load_model(tmp_path)


def test_truncated_file_and_missing_shard(tmp_path):
    model = _random_model()
    save_model(model, tmp_path / "a")
    data = (tmp_path / "a/model.safetensors").read_bytes()
    (tmp_path / "a/model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        load_model(tmp_path / "a")
    save_model(model, tmp_path / "b", max_shard_bytes=200_000)
    next((tmp_path / "b").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="do not exist"):
        load_model(tmp_path / "b")
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope")


def test_checkpoint_without_speech_head_loads_as_speech_to_text(tmp_path):
    _edit(tmp_path, lambda s: [s.pop(k) for k in list(s) if k.startswith("audio_invert_tower.")])
    model = load_model(tmp_path)
    assert model.audio_invert_tower is None
    # a partial speech head is an error, not a silent S2T model
    _edit(tmp_path, lambda s: s.pop("audio_invert_tower.pre_matching.bias"))
    with pytest.raises(CheckpointError, match="pre_matching.bias"):
        load_model(tmp_path)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_dtype_option(tmp_path, dtype):
    model = _random_model()
    save_model(model, tmp_path)
    loaded = load_model(tmp_path, dtype=dtype)
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert all(p.dtype == want for p in loaded.parameters())
    ref = model.state_dict()["language_model.lm_head.weight"].to(want)
    assert torch.equal(loaded.state_dict()["language_model.lm_head.weight"], ref)
    with pytest.raises(CheckpointError, match="unknown dtype"):
        load_model(tmp_path, dtype="int3")


def test_golden_checkpoint_loads_with_the_tie(shared_dir):
    model = load_model(shared_dir / "golden/tiny-dense/model")
    state = load_file(str(shared_dir / "golden/tiny-dense/model/model.safetensors"))
    assert SPEECH_HEAD not in state
    assert torch.equal(model.audio_invert_tower.lm_head.weight, state[SPEECH_EMBED])
