"""`funaudiochat eval mini-speech --model DIR --data data/mini --split test [--limit N]`: fun-audio-chat-mini's
speaking figures (speech WER against its own text, where the speech ends, first-audio latency, RTF, speaking-rate
and loudness instructions), as OUT/report.json and OUT/report.md (printed). See eval/mini_speech.py."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="a speaking checkpoint (e.g. checkpoints/mini)")
    p.add_argument("--data", type=Path, default=Path("data/mini"), help="build-mini's output folder")
    p.add_argument("--split", default="test", help="SPLIT_s2s.jsonl of --data")
    p.add_argument("--limit", type=int, default=None,
                   help="the first N spoken questions (and their instruction variants)")
    p.add_argument("--ids", default=None, help="only these spoken questions: their record ids, comma separated")
    p.add_argument("--no-variants", action="store_true", help="the plain questions only, not their instruction "
                                                              "variants")
    p.add_argument("--detokenizer", type=Path, default=None,
                   help="a detokenizer folder (default: the checkpoint's own detokenizer.json), e.g. to score a "
                        "training checkpoint: a folder holding detokenizer.json {\"kind\": \"piper-joe\"}")
    p.add_argument("--compile", action="store_true", help="decode with the compiled step")
    p.add_argument("--no-judge", action="store_true", help="skip the ASR judge (no speech WER)")
    p.add_argument("--max-new-tokens", type=int, default=400, help="LLM steps per answer (5 speech tokens each)")
    p.add_argument("--allow-untrained", action="store_true",
                   help="measure a model whose config marks hearing or speaking as untrained")
    p.add_argument("--free-speech", action="store_true",
                   help="let a head with the pending-units view choose its units freely (default: text-locked, it "
                        "only times the text's units; GenerationConfig.speech_follows_text)")
    p.add_argument("--save-audio", action="store_true", help="also write each answer as OUT/audio/ID.wav")
    p.add_argument("--out", type=Path, default=None,
                   help="report folder (default outputs/eval-mini-speech/MODEL_NAME)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "int8"],
                   help="cast the weights (default: as stored, fp32); int8 is weight-only with a scale per output "
                        "channel, bf16 is faster only where the CPU computes it natively (AVX-512 BF16 or AMX)")
    p.add_argument("--decode-weights", default="fp32", choices=["fp32", "fp16"],
                   help="fp16: the compiled decode steps of an fp32 model read fp16 copies of its weights (needs "
                        "--compile; faster where int8 is slow, on AVX2 CPUs)")


def main(args: argparse.Namespace) -> int:
    from funaudiochat import fileio
    from funaudiochat.engine.loading import check_decode_weights_flag, read_config
    from funaudiochat.errors import InputError

    for name in ("limit", "max_new_tokens", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    check_decode_weights_flag(args)
    read_config(args.model)  # a clear error before anything loads
    if not args.data.is_dir():
        raise InputError(f"--data {args.data}: no such folder (`funaudiochat data build-mini --out {args.data}`)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from funaudiochat.eval.mini_speech import evaluate_speech, markdown

    out = args.out or Path("outputs/eval-mini-speech") / args.model.resolve().name
    audio_dir = out / "audio" if args.save_audio else None
    if audio_dir is not None:
        audio_dir.mkdir(parents=True, exist_ok=True)
    report = evaluate_speech(args.model, args.data, args.split, args.limit, judge=not args.no_judge,
                             max_new_tokens=args.max_new_tokens, compiled=args.compile,
                             allow_untrained=args.allow_untrained, progress=True, audio_dir=audio_dir,
                             detokenizer=args.detokenizer, follow_text=not args.free_speech,
                             ids=[i for i in args.ids.split(",") if i] if args.ids else None,
                             variants=not args.no_variants, dtype=args.dtype, decode_weights=args.decode_weights)
    out.mkdir(parents=True, exist_ok=True)
    json_path = fileio.write_text(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    fileio.write_text(out / "report.md", markdown(report))
    print(markdown(report), end="")
    print(f"wrote {json_path} and {json_path.with_suffix('.md')}")
    return 0
