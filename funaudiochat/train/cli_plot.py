"""`funaudiochat plot RUN_DIR [--out PNG]`: loss curves (and DPO reward margin / accuracy) of a training run."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="a training run folder (holds metrics.jsonl)")
    p.add_argument("--out", type=Path, default=None, help="PNG path (default: RUN_DIR/loss.png)")


def main(args: argparse.Namespace) -> int:
    from funaudiochat.train.plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0
