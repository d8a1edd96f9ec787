"""`funaudiochat eval mcq PREDICTIONS --benchmark mmau|mmsu --out DIR`: score MMAU / MMSU multiple-choice predictions.

The input is the published format with the model's answers: MMAU's JSON list with `model_output`, or MMSU's JSON
lines with `response`. Writes OUT/records.jsonl (one line per entry) and OUT/summary.json (accuracy overall and per
task / difficulty / category, as the official scripts print them).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from funaudiochat import fileio
from funaudiochat.eval.audio_mcq import BENCHMARKS, score_file


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("predictions", type=Path, help="MMAU JSON (with model_output) or MMSU JSON lines (with response)")
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS, help="which official scorer")
    p.add_argument("--out", type=Path, required=True, help="folder for records.jsonl and summary.json")


def main(args: argparse.Namespace) -> int:
    records, summary = score_file(args.predictions, args.benchmark)
    fileio.write_text(args.out / "records.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    fileio.write_text(args.out / "summary.json", json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    acc = summary.get("acc")
    print(f"{args.benchmark}: acc " + ("n/a" if acc is None else f"{acc:.2f} %") +
          f" ({summary['scored']} scored, {summary['failed']} failed" +
          (f", {summary['wrong_format']} wrong format" if "wrong_format" in summary else "") + ")")
    if summary["failed"]:
        first = next(r for r in records if "error" in r)
        print(f"  e.g. entry {first['line']}: {first['error']}")
    return 0
