"""`funaudiochat eval speechfc PREDICT.jsonl`: score SpeechFCEval predictions like the released scorer.

Writes OUT/records.jsonl (one line per item: dataset_key, valid, error_type, reason) and OUT/summary.json (correct,
total, accuracy, error-type counts). Without --scorer/--category the dataset named in the file name picks them
(SpeechFC-BFCL-Single -> bfcl/multiple, ... as in the released compute_metrics_speech_fc.py).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from funaudiochat.eval.speechfc.score import CATEGORIES, SCORERS, resolve_setup, score_file, write_outputs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("predictions", type=Path, help="JSON-lines predictions (the released predict-MODEL-DATASET.json)")
    p.add_argument("--scorer", choices=SCORERS, default=None, help="default: from the dataset in the file name")
    p.add_argument("--category", choices=CATEGORIES, default=None, help="default: from the dataset in the file name")
    p.add_argument("--model-name", default=None,
                   help="model name (default: from predict-MODEL-DATASET.json); 'gpt-4o' names get BFCL's '.'->'_'")
    p.add_argument("--out", type=Path, required=True, help="folder for records.jsonl and summary.json")


def main(args: argparse.Namespace) -> int:
    setup = resolve_setup(args.predictions, args.scorer, args.category, args.model_name)
    records, summary = score_file(args.predictions, setup)
    write_outputs(args.out, records, summary)
    print(f"{setup.scorer}/{setup.category}: accuracy {100 * summary['accuracy']:.2f} % "
          f"({summary['correct']} / {summary['total']})")
    for error_type, count in summary["error_types"].items():
        if error_type != "correct":
            print(f"  {error_type}: {count}")
    print(f"records in {args.out / 'records.jsonl'}, summary in {args.out / 'summary.json'}")
    return 0
