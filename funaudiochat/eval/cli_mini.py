"""`funaudiochat eval mini --model DIR --data data/mini --split test [--limit N]`: fun-audio-chat-mini's
must-show figures (ASR WER beside Whisper tiny.en, spoken-QA accuracy vs the base's typed accuracy, agreement,
robustness, knowledge retention, latency), as OUT/report.json and OUT/report.md (printed). See eval/mini.py."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="the checkpoint to measure (e.g. checkpoints/mini)")
    p.add_argument("--data", type=Path, default=Path("data/mini"), help="build-mini's output folder")
    p.add_argument("--split", default="test", help="SPLIT.jsonl (and SPLIT_snr10 / SPLIT_phone) of --data")
    p.add_argument("--limit", type=int, default=None, help="at most N records of each task (ASR, QA)")
    p.add_argument("--base", type=Path, default=None,
                   help="answer the typed questions with this base model (default: the typed answers the data "
                        "build recorded, which are the base SmolLM2's)")
    p.add_argument("--baseline", type=Path, default=None,
                   help="also the typed accuracy of this model (the single-stage high-LR run)")
    p.add_argument("--latency", type=int, default=50, help="questions timed for the latency (0: none)")
    p.add_argument("--compile", action="store_true", help="also time the compiled decoder")
    p.add_argument("--no-whisper", action="store_true", help="skip Whisper tiny.en's WER on the ASR clips")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--allow-untrained", action="store_true",
                   help="measure a model whose config marks hearing as untrained (e.g. the base)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default outputs/eval-mini/MODEL_NAME)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "int8"],
                   help="cast the weights of every model measured (default: as stored, fp32); bf16 is faster only "
                        "where the CPU computes it natively (AVX-512 BF16 or AMX)")


def main(args: argparse.Namespace) -> int:
    from funaudiochat.engine.loading import read_config
    from funaudiochat.errors import InputError

    for name in ("limit", "latency", "max_new_tokens", "threads"):
        value = getattr(args, name)
        if value is not None and value < (1 if name != "latency" else 0):
            raise InputError(f"--{name.replace('_', '-')} must be >= {1 if name != 'latency' else 0}, got {value}")
    for flag in ("model", "base", "baseline"):
        if getattr(args, flag) is not None:
            read_config(getattr(args, flag))  # a clear error before anything loads
    if not args.data.is_dir():
        raise InputError(f"--data {args.data}: no such folder (`funaudiochat data build-mini --out {args.data}`)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from funaudiochat.eval.mini import evaluate, markdown, write_report

    report = evaluate(args.model, args.data, args.split, args.limit, args.base, args.baseline,
                      whisper=not args.no_whisper, latency_n=args.latency, compiled=args.compile,
                      max_new_tokens=args.max_new_tokens, allow_untrained=args.allow_untrained, progress=True,
                      dtype=args.dtype)
    out = args.out or Path("outputs/eval-mini") / args.model.resolve().name
    json_path, _ = write_report(report, out)
    print(markdown(report), end="")
    print(f"wrote {json_path} and {json_path.with_suffix('.md')}")
    return 0
