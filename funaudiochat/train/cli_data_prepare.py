"""`funaudiochat data prepare INPUT OUTPUT --tokenizer TOK [--speech-tokenizer ONNX]`: validate a training JSONL
(released sharegpt records or native manifests, see prepare.py), tokenize assistant speech, add the 10-token delay,
and write released sharegpt records; prints what was skipped and why (with line numbers)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help="JSONL: released sharegpt records or native manifest records")
    p.add_argument("output", type=Path, help="JSONL of released sharegpt records for `funaudiochat train`")
    p.add_argument("--tokenizer", type=Path, required=True, help="text tokenizer.json (or a checkpoint folder)")
    p.add_argument("--config", type=Path, default=None,
                   help="model config.json or checkpoint folder (speech token ids, group size); default: the "
                        "released Fun-Audio-Chat layout")
    p.add_argument("--speech-tokenizer", type=Path, default=None,
                   help="S3 speech tokenizer ONNX file (speech_tokenizer_v3.onnx), for assistant audio")
    p.add_argument("--backend", choices=("onnx", "torch"), default="onnx", help="speech tokenizer runtime")
    p.add_argument("--max-len", type=int, default=2048, help="context length in tokens (default 2048)")
    p.add_argument("--delay", type=int, default=10, help="speech delay in tokens (default 10)")
    p.add_argument("--on-error", choices=("skip", "reject"), default="skip",
                   help="skip bad records (default) or stop at the first one")
    p.add_argument("--report", type=Path, default=None, help="also write the problems as JSON here")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def main(args: argparse.Namespace) -> int:
    from funaudiochat import fileio
    from funaudiochat.config import FunAudioChatConfig
    from funaudiochat.text.tokenizer import TextTokenizer
    from funaudiochat.train.data import SampleBuilder
    from funaudiochat.train.prepare import Preparer, prepare_file

    cfg = FunAudioChatConfig.load(args.config) if args.config else FunAudioChatConfig()
    tokenize = None
    if args.speech_tokenizer:
        from funaudiochat.speech.s3onnx import load_speech_tokenizer
        from funaudiochat.speech.s3tokenizer import tokenize_audio

        backend = load_speech_tokenizer(args.speech_tokenizer, args.backend)
        tokenize = lambda wav: tokenize_audio(wav, backend)  # noqa: E731
    builder = SampleBuilder(TextTokenizer.from_file(args.tokenizer), cfg, args.max_len)
    report = prepare_file(args.input, args.output, Preparer(builder, tokenize, args.delay), args.on_error,
                          progress=not args.no_progress)
    print(f"{args.output}: {report.summary()}")
    if args.report:
        fileio.write_text(args.report, json.dumps(report.to_dict(), indent=2) + "\n")
    return 0
