"""`funaudiochat eval voicebench PREDICT.jsonl --subset NAME --out DIR`: score VoiceBench predictions.

Rule-based subsets (ifeval, advbench, openbookqa, mmsu, bbh) are scored as VoiceBench's evaluators do; judge subsets
(alpacaeval, commoneval, wildvoice, sd-qa) ask the OpenAI-compatible endpoint given by --judge-url / --judge-model.
Writes OUT/records.jsonl (one line per item) and OUT/summary.json.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from funaudiochat import fileio
from funaudiochat.errors import InputError
from funaudiochat.eval.voicebench.judge import JudgeClient
from funaudiochat.eval.voicebench.score import SUBSETS, score_file


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("predictions", type=Path, help="JSON lines with prompt, response (and reference, id, ...)")
    p.add_argument("--subset", required=True, choices=list(SUBSETS), help="VoiceBench subset the file answers")
    p.add_argument("--out", type=Path, required=True, help="folder for records.jsonl and summary.json")
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--judge-model", default=None, help="model name to send to the judge")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the judge's key")
    p.add_argument("--seed", type=int, default=0, help="seed of the random answer for unread mcq/bbh responses")


def main(args: argparse.Namespace) -> int:
    client = None
    if args.judge_url or args.judge_model:
        if not (args.judge_url and args.judge_model):
            raise InputError("--judge-url and --judge-model go together")
        client = JudgeClient(args.judge_url, args.judge_model, os.environ.get(args.judge_key_env))
    records, summary = score_file(args.predictions, args.subset, client, args.seed)
    fileio.write_text(args.out / "records.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    fileio.write_text(args.out / "summary.json", json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    metrics = {k: v for k, v in summary.items() if k not in ("file", "subset")}
    print(f"{args.subset}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in metrics.items()))
    if summary["failed"]:
        first = next(r for r in records if "error" in r)
        print(f"  {summary['failed']} item(s) failed, e.g. line {first['line']}: {first['error']}")
    return 0
