"""Named model configurations: the released 8B shape and tiny ones for tests and benchmarks.

The tiny token layout follows the golden references (shared/golden/README.md): text vocab 512 with
<|endoftext|> 500, <|im_start|> 501, <|im_end|> 502, <|audio_bos|> 503, <|audio_eos|> 504, <|AUDIO|> 505,
<|sil|> 506; speech codebook 300 with bos 296, eos 297, pad 298.
"""
from __future__ import annotations

from funaudiochat.config import AudioConfig, BackboneConfig, FunAudioChatConfig


def fun_audio_chat_8b() -> FunAudioChatConfig:
    """Fun-Audio-Chat-8B as the public ports describe it (SPEC.md §1.2)."""
    return FunAudioChatConfig()


def tiny(backbone: str = "qwen3", hidden: int = 64, layers: int = 2, srh_layers: int = 2, vocab: int = 512,
         codebook: int = 300, mode: str = "replace", encoder_layers: int = 2, **text_overrides) -> FunAudioChatConfig:
    """A few-hundred-kB model with the golden token layout; `backbone` is qwen3, qwen3_moe or llama."""
    text = dict(model_type=backbone, vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                rope_theta=1e6, max_position_embeddings=4096, bos_token_id=vocab - 12, eos_token_id=vocab - 10,
                pad_token_id=vocab - 12, audio_bos_index=vocab - 9, audio_eos_index=vocab - 8, sil_index=vocab - 6,
                tie_word_embeddings=backbone == "llama")
    if backbone == "qwen3_moe":
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden // 2, norm_topk_prob=True)
    text.update(text_overrides)
    srh = BackboneConfig(model_type="qwen3", vocab_size=codebook, hidden_size=hidden // 2, intermediate_size=hidden,
                         num_hidden_layers=srh_layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=hidden // 8, rope_theta=1e4, max_position_embeddings=16384)
    audio = AudioConfig(num_mel_bins=128, d_model=32, encoder_layers=encoder_layers, encoder_attention_heads=4,
                        encoder_ffn_dim=64, output_dim=hidden, codebook_size=codebook, bos_token_id=codebook - 4,
                        eos_token_id=codebook - 3, pad_token_id=codebook - 2, continuous_features_mode=mode,
                        crq_transformer_config=srh)
    cfg = FunAudioChatConfig(BackboneConfig(**text), audio, audio_token_index=vocab - 7)
    cfg.text_config.validate("text_config")
    cfg.validate()
    return cfg
