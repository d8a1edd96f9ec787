"""`funaudiochat assets mini-deltas TRAINED OUT [--base checkpoints/mini-base]`: what fun-audio-chat-mini ships.

Writes OUT/deltas.safetensors: the tensors TRAINED changed against BASE (the adapter, trained encoder layers) and
the LLM's LoRA delta (TRAINED/lora.safetensors, folded factors), after checking that BASE + deltas is TRAINED and
that the file fits the 60 MB budget (`--bf16` halves it: the assembled model is then the rounded one, which is what
ships and what its figures must be measured on).
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trained", type=Path, help="the trained checkpoint (e.g. runs/mini/core_cocktail_stage2/final)")
    p.add_argument("out_dir", type=Path, help="folder for deltas.safetensors (e.g. models/mini)")
    p.add_argument("--base", type=Path, default=Path("checkpoints/mini-base"),
                   help="the checkpoint training started from (default checkpoints/mini-base)")
    p.add_argument("--stage", default=None,
                   help="the recipe stage TRAINED ends (recorded in the file; recipes/mini/pipeline.sh restores that "
                        "stage from it on a machine without runs/)")
    p.add_argument("--bf16", action="store_true",
                   help="store the deltas in bfloat16 (half the size; measure the assembled model, not TRAINED)")


def main(args: argparse.Namespace) -> int:
    from funaudiochat.assets import mini_deltas
    from funaudiochat.errors import CheckpointError

    for d in (args.trained, args.base):
        if not (d / "config.json").is_file():
            raise CheckpointError(f"{d}: no checkpoint folder with a config.json")
    deltas, meta = mini_deltas.extract(args.trained, args.base, stage=args.stage)
    path = mini_deltas.write(deltas, meta, args.out_dir, bf16=args.bf16)
    print(f"wrote {path}: {len(deltas)} tensors, {path.stat().st_size / 1e6:.1f} MB; trained {meta['trained']}")
    return 0
