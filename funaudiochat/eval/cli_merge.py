"""`funaudiochat eval merge OUT`: join the shard prediction files of an `eval run --shard` output, score, report."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from funaudiochat.errors import InputError
from funaudiochat.eval.cli_run import add_judge_arguments, finish, judge_client
from funaudiochat.eval.run import runner


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="the --out folder of the sharded runs")
    p.add_argument("--suites-dir", type=Path, default=Path("runs/eval-suites"), help="where the suites were built")
    add_judge_arguments(p)


def main(args: argparse.Namespace) -> int:
    path = args.out / "run.json"
    if not path.is_file():
        raise InputError(f"{args.out}: no run.json (not an `eval run` output folder)")
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        run = err
    if not (isinstance(run, dict) and isinstance(run.get("suites"), list) and "model" in run):
        raise InputError(f"{path}: not a readable run record (`eval run` writes it; run it again)")
    for name in run["suites"]:
        runner.merge(args.out / name)
    finish(args.out, run["suites"], args.suites_dir, run["model"], judge_client(args))
    return 0
