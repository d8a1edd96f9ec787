"""`funaudiochat assets quantize SRC OUT`: write SRC as a weight-only int8 checkpoint (model/quantize.py).

The linears of the LLM, its text head, the Speech Refined Head and its speech head become int8 weights (same key
names) with fp32 scales per output channel beside them (`NAME.weight_scale`); everything else is copied as stored
(config.json and tokenizer files verbatim). `infer` / `chat` / `serve --model OUT` load it as is, no --dtype needed.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", type=Path, help="a checkpoint folder (config.json, *.safetensors, tokenizer files)")
    p.add_argument("out", type=Path, help="a new (or empty) folder for the int8 checkpoint")


def main(args: argparse.Namespace) -> int:
    from funaudiochat import fileio
    from funaudiochat.errors import CheckpointError, InputError
    from funaudiochat.model.checkpoint import load_model, save_model

    if not (args.src / "config.json").is_file():
        raise CheckpointError(f"{args.src}: no checkpoint folder with a config.json")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise InputError(f"{args.out}: exists and is not an empty folder; name a new folder")
    model = load_model(args.src, dtype="int8")
    # the whole folder under a temporary name, renamed when complete: a failure (a full disk) leaves no half OUT
    with fileio.atomic_path(args.out, directory=True) as tmp:
        save_model(model, tmp)
        for f in args.src.iterdir():  # config.json as written (it may hold fields the model does not read), tokenizer
            if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")):
                shutil.copy2(f, tmp / f.name)
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors")) / 1e6  # noqa: E731
    print(f"wrote {args.out}: int8 weights, {size(args.out):.1f} MB of safetensors (was {size(args.src):.1f} MB)")
    return 0
