"""`funaudiochat check-reference DIR`: replay golden reference outputs and compare.

DIR may be one golden directory or a folder of them. Kinds are recognised by their files:
  model/config.json + golden.json or case folders (train_fwd*/, gen*/ with inputs.safetensors)
                               Fun-Audio-Chat model goldens                          -> check.model
  flow.pt / hift.pt            CosyVoice3 flow + HiFT detokenizer goldens            -> check.cosyvoice
  s3_io.safetensors            S3 speech tokenizer goldens                           -> check.s3
A checkpoint folder alone (a training run's checkpoints/step-N/model/config.json) is not a golden directory.
Zero cases compared is a failure, never a pass.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from funaudiochat.errors import InputError


def _is_model_golden(d: Path) -> bool:
    return (d / "model/config.json").is_file() and (
        (d / "golden.json").is_file() or any((c / "inputs.safetensors").is_file() for c in d.iterdir()))


def _has(name: str):
    return lambda d: (d / name).exists()


# (what it is, test, module with `run(directory: Path, args) -> list[CaseResult]`)
KINDS = [
    ("model/config.json with golden.json or case folders", _is_model_golden, "funaudiochat.check.model"),
    ("flow.pt", _has("flow.pt"), "funaudiochat.check.cosyvoice"),
    ("hift.pt", _has("hift.pt"), "funaudiochat.check.cosyvoice"),
    ("s3_io.safetensors", _has("s3_io.safetensors"), "funaudiochat.check.s3"),
]
EXPECTED = ("a golden directory holds model/config.json with golden.json and case folders (train_fwd*, gen*) of "
            "inputs.safetensors + outputs.safetensors, or flow.pt / hift.pt, or s3_io.safetensors")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path, help="a golden directory (or a folder of them)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def find_golden_dirs(root: Path) -> list[tuple[Path, str]]:
    """Golden directories under `root` (itself first), each with the module that checks it."""
    found: list[tuple[Path, str]] = []
    for _, is_kind, module in KINDS:
        if is_kind(root):
            found.append((root, module))
            return found
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        found.extend(find_golden_dirs(sub))
    return found


def training_runs(root: Path) -> list[Path]:
    """Training run folders under `root` (they hold checkpoints/step-N/trainer.json)."""
    return sorted({p.parents[2] for p in root.rglob("checkpoints/step-*/trainer.json")})


def main(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    root: Path = args.directory
    if not root.is_dir():
        raise InputError(f"{root} is not a directory")
    dirs = find_golden_dirs(root)
    if not dirs:
        runs = training_runs(root)
        what = f"{runs[0]} is a training run folder (checkpoints/step-N), not a golden reference directory; " \
            if runs else ""
        raise InputError(f"no golden reference directory found under {root}: {what}{EXPECTED}")
    all_ok, n_cases = True, 0
    for directory, module_name in dirs:
        print(f"== {directory}")
        try:
            results = importlib.import_module(module_name).run(directory, args)
        except Exception as err:  # an unreadable golden folder is one failure; the other folders still run
            print(f"  FAIL {directory}: cannot replay it ({type(err).__name__}: {err})")
            all_ok = False
            continue
        for r in results:
            print("  " + r.line())
            all_ok &= r.ok
        if not results:
            print(f"  FAIL {directory}: no cases found in it ({EXPECTED})")
            all_ok = False
        n_cases += len(results)
    if n_cases == 0:
        print("FAIL: no case was checked")
    print(f"all cases pass ({n_cases} checked)" if all_ok else "SOME CASES FAIL")
    return 0 if all_ok else 1
