"""Config: the released config.json format reads, validates with field names, and round-trips."""
import json

import pytest

from funaudiochat.config import AudioConfig, BackboneConfig, FunAudioChatConfig
from funaudiochat.errors import ConfigError
from funaudiochat.model.presets import fun_audio_chat_8b, tiny


def _golden_config(shared_dir):
    return json.loads((shared_dir / "golden/tiny-dense/model/config.json").read_text())


def test_reads_released_layout(shared_dir):
    cfg = FunAudioChatConfig.from_dict(_golden_config(shared_dir))
    assert cfg.text_config.audio_bos_index == 503 and cfg.text_config.sil_index == 506
    assert cfg.audio_config.crq_transformer_config.hidden_size == 32
    assert cfg.audio_config.continuous_features_mode == "replace"
    assert cfg.audio_token_index == 505


def test_round_trip_keeps_every_field(shared_dir, tmp_path):
    raw = _golden_config(shared_dir)
    cfg = FunAudioChatConfig.from_dict(raw)
    cfg.save(tmp_path)
    again = json.loads((tmp_path / "config.json").read_text())

    def subset(a, b, path=""):  # every field of the original survives with its value
        for k, v in a.items():
            assert k in b, f"{path}{k} lost"
            if isinstance(v, dict):
                subset(v, b[k], f"{path}{k}.")
            else:
                assert b[k] == v, f"{path}{k}: {b[k]!r} != {v!r}"
    subset(raw, again)
    assert FunAudioChatConfig.from_dict(again).to_dict() == cfg.to_dict()
    mini = ("speech_opener", "srh_answer_style", "srh_answer_cue", "srh_answer_prosody", "srh_blind_gain")
    assert not set(mini) & set(again["audio_config"])  # settings off are not written: released configs unchanged
    for name in mini:
        setattr(cfg.audio_config, name, True)
    assert all(getattr(FunAudioChatConfig.from_dict(cfg.to_dict()).audio_config, name) for name in mini)
    assert "srh_level_scale" not in again["audio_config"]  # 1.0, the released head's levels: not written
    cfg.audio_config.srh_level_scale = 2.0
    assert FunAudioChatConfig.from_dict(cfg.to_dict()).audio_config.srh_level_scale == 2.0
    assert "srh_speedup_scale" not in again["audio_config"]
    cfg.audio_config.srh_speedup_scale = 1.25
    assert FunAudioChatConfig.from_dict(cfg.to_dict()).audio_config.srh_speedup_scale == 1.25


def test_default_config_is_the_8b_model():
    cfg = fun_audio_chat_8b()
    assert (cfg.text_config.hidden_size, cfg.text_config.num_hidden_layers) == (4096, 36)
    assert (cfg.audio_config.codebook_size, cfg.audio_config.bos_token_id, cfg.audio_config.pad_token_id) == (6565, 6561, 6563)
    assert cfg.text_config.audio_bos_index == 151670 and cfg.audio_token_index == 151669


def test_missing_fields_take_the_released_class_defaults():
    # a qwen3 text_config without rope_theta gets transformers' Qwen3 default, not the 8B value
    cfg = BackboneConfig.from_dict({"model_type": "qwen3", "vocab_size": 10, "hidden_size": 8, "num_attention_heads": 2,
                                    "num_hidden_layers": 1, "intermediate_size": 16})
    assert cfg.rope_theta == 10000.0 and cfg.head_dim == 128 and cfg.num_key_value_heads == 2
    llama = BackboneConfig.from_dict({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4})
    assert llama.dim_head == 16 and not llama.qk_norm


@pytest.mark.parametrize("path,value,field", [
    (("text_config", "model_type"), "gpt2", "text_config.model_type"),
    (("text_config", "num_key_value_heads"), 3, "text_config.num_key_value_heads"),
    (("audio_config", "continuous_features_mode"), "concat", "audio_config.continuous_features_mode"),
    (("audio_config", "eos_token_id"), 999, "audio_config.eos_token_id"),
    (("audio_config", "output_dim"), 48, "audio_config.output_dim"),
    (("audio_config", "speech_feedback"), "no", "audio_config.speech_feedback"),
    (("audio_config", "speech_opener"), 1, "audio_config.speech_opener"),
    (("audio_config", "srh_answer_style"), "yes", "audio_config.srh_answer_style"),
    (("audio_config", "srh_blind_gain"), 0, "audio_config.srh_blind_gain"),
    (("audio_config", "srh_answer_cue"), True, "audio_config.srh_answer_cue"),  # without srh_answer_style
    (("audio_config", "srh_answer_prosody"), True, "audio_config.srh_answer_prosody"),  # likewise
    (("audio_config", "srh_answer_prosody"), "on", "audio_config.srh_answer_prosody"),
    (("audio_config", "srh_level_scale"), 0, "audio_config.srh_level_scale"),
    (("audio_config", "srh_speedup_scale"), -1.0, "audio_config.srh_speedup_scale"),
    (("text_config", "sil_index"), 4096, "text_config.sil_index"),
    (("audio_config", "crq_transformer_config", "hidden_act"), "gelu", "crq_transformer_config.hidden_act"),
])
def test_validation_names_the_bad_field(shared_dir, path, value, field):
    raw = _golden_config(shared_dir)
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        FunAudioChatConfig.from_dict(raw)


def test_missing_sub_config_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="audio_config"):
        FunAudioChatConfig.from_dict({"model_type": "funaudiochat", "text_config": {}})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        FunAudioChatConfig.load(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        FunAudioChatConfig.load(tmp_path / "nowhere")


def test_moe_fields_round_trip():
    cfg = tiny("qwen3_moe")
    d = cfg.to_dict()
    assert d["text_config"]["num_experts"] == 4 and "num_experts" not in d["audio_config"]["crq_transformer_config"]
    assert FunAudioChatConfig.from_dict(d).text_config.num_experts_per_tok == 2
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        BackboneConfig.from_dict({**cfg.text_config.to_dict(), "num_experts_per_tok": 9})


def test_audio_config_accepts_num_hidden_layers_alias():
    a = AudioConfig.from_dict({"num_hidden_layers": 3, "codebook_size": 300, "bos_token_id": 296,
                               "eos_token_id": 297, "pad_token_id": 298})
    assert a.encoder_layers == 3
