"""`funaudiochat check-reference DIR`: replay golden reference outputs and compare.

DIR may be one golden directory or a folder of them. Kinds are recognised by their files:
  model/config.json            Fun-Audio-Chat model goldens (train_fwd*, gen*)      -> check.model
  flow.pt / hift.pt            CosyVoice3 flow + HiFT detokenizer goldens            -> check.cosyvoice
  s3_io.safetensors            S3 speech tokenizer goldens                           -> check.s3
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from funaudiochat.errors import InputError

# marker file -> module with `run(directory: Path, args) -> list[CaseResult]`
KINDS = [
    ("model/config.json", "funaudiochat.check.model"),
    ("flow.pt", "funaudiochat.check.cosyvoice"),
    ("hift.pt", "funaudiochat.check.cosyvoice"),
    ("s3_io.safetensors", "funaudiochat.check.s3"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path, help="a golden directory (or a folder of them)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def find_golden_dirs(root: Path) -> list[tuple[Path, str]]:
    """Golden directories under `root` (itself first), each with the module that checks it."""
    found: list[tuple[Path, str]] = []
    for marker, module in KINDS:
        if (root / marker).exists():
            found.append((root, module))
            return found
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        found.extend(find_golden_dirs(sub))
    return found


def main(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    root: Path = args.directory
    if not root.is_dir():
        raise InputError(f"{root} is not a directory")
    dirs = find_golden_dirs(root)
    if not dirs:
        raise InputError(f"no golden reference directory found under {root} "
                         f"(looked for {', '.join(m for m, _ in KINDS)})")
    all_ok = True
    for directory, module_name in dirs:
        print(f"== {directory}")
        results = importlib.import_module(module_name).run(directory, args)
        for r in results:
            print("  " + r.line())
            all_ok &= r.ok
    print("all cases pass" if all_ok else "SOME CASES FAIL")
    return 0 if all_ok else 1
