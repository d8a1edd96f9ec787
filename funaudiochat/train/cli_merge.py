"""`funaudiochat merge BASE STAGE1 OUT [--alpha 0.5]`: the Core-Cocktail merge M = a*M1 + (1-a)*M0 of the LLM.

BASE (M0) is the model before stage 1: the pre-aligned checkpoint (its LLM is the original one, frozen during
pre-alignment), or a plain causal-LM checkpoint. STAGE1 (M1) is the stage-1 result. Every `language_model.*`
tensor is interpolated; the audio encoder, adapter and speech head come from STAGE1 (see merge.py). A STAGE1
trained with LoRA (its lora.safetensors) merges as BASE + alpha * its LoRA delta, from the factors.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", type=Path, help="M0: checkpoint folder before stage 1 (released format or causal LM)")
    p.add_argument("stage1", type=Path, help="M1: the stage-1 checkpoint folder (e.g. RUN_DIR/final)")
    p.add_argument("out", type=Path, help="output checkpoint folder")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of STAGE1 (default 0.5)")


def main(args: argparse.Namespace) -> int:
    from funaudiochat.train.merge import merge_checkpoints

    from funaudiochat.model.lora import DELTA_FILE

    merge_checkpoints(args.base, args.stage1, args.out, args.alpha)
    how = f"LoRA: BASE + {args.alpha} x STAGE1's delta" if (args.out / DELTA_FILE).is_file() else f"alpha {args.alpha}"
    print(f"merged {args.base} and {args.stage1} ({how}) into {args.out}")
    return 0
