"""`funaudiochat eval run --suite sample-all --model checkpoints/mini-base`: answer, score and report suites.

Suites are built on first use under --suites-dir (spoken with our synthesis, deterministic). Predictions are
appended to OUT/SUITE/predictions.jsonl as they are made, so a rerun resumes where an interrupt stopped it. With
`--shard I/N` only every N-th item (from I) is answered, into a shard file; `funaudiochat eval merge OUT --suite ...`
then joins the shards, scores and reports. Writes OUT/report.md, OUT/summary.json and OUT/scores.png.
`--mode s2s` asks for spoken answers too (saved as OUT/SUITE/answers/ID.wav, scored for speech quality);
`--judge-url/--judge-model` name the judge of judge-scored suites; `--suite mmau:FILE` / `mmsu:FILE` runs a
published MMAU / MMSU file.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from funaudiochat import fileio
from funaudiochat.errors import InputError
from funaudiochat.eval.run import runner, suites
from funaudiochat.eval.run.adapters import make_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", default="sample-all",
                   help=f"sample-all, or suites (comma list): {', '.join(suites.SUITES)}; mmau:FILE / mmsu:FILE "
                        f"runs a published MMAU / MMSU file")
    p.add_argument("--model", required=True, help="checkpoint folder (local engine) or openai:NAME with --url")
    p.add_argument("--url", default=None, help="OpenAI-compatible base URL for --model openai:NAME")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the endpoint's key")
    p.add_argument("--out", type=Path, default=Path("runs/eval"), help="output folder (default runs/eval)")
    p.add_argument("--suites-dir", type=Path, default=Path("runs/eval-suites"), help="where suites are built")
    p.add_argument("--limit", type=int, default=None, help="only the first N items of each suite")
    p.add_argument("--shard", default=None, help="I/N: answer every N-th item from I (then `eval merge`)")
    p.add_argument("--device", default="cpu", help="local model device (default cpu)")
    p.add_argument("--batch-size", type=int, default=4, help="local model: items per batched generation (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="local model answer length (default 256)")
    p.add_argument("--mode", default="s2t", choices=["s2t", "s2s"],
                   help="s2t: text answers (default); s2s: text and speech (speech-quality scoring of the answers)")
    p.add_argument("--detokenizer", type=Path, default=None,
                   help="local model, --mode s2s: CosyVoice3 folder that turns speech tokens into wavs")
    add_judge_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_judge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible judge endpoint for judge-scored suites "
                                                     "(sample-commoneval, sample-sdqa), e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--judge-model", default=None, help="judge model name")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the judge's key")


def judge_client(args):
    """The judge of --judge-url / --judge-model (both or neither); None without them (judged suites then record
    each item as failed, saying so)."""
    if not (args.judge_url or args.judge_model):
        return None
    if not (args.judge_url and args.judge_model):
        raise InputError("--judge-url and --judge-model go together")
    from funaudiochat.eval.voicebench.judge import JudgeClient

    return JudgeClient(args.judge_url, args.judge_model, os.environ.get(args.judge_key_env))


def finish(out: Path, names: list[str], suites_dir: Path, label: str, judge) -> None:
    summaries = [runner.score(suites_dir / name, out / name, judge) for name in names]
    runner.write_report(out, summaries, label)
    for s in summaries:
        value = runner._percent(s)
        print(f"{s['suite']:<18} {s['metric']:<13} " + ("n/a" if value is None else f"{value:6.2f} %"))
    print(f"report: {out / 'report.md'}, chart: {out / 'scores.png'}")


def main(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
        raise InputError("--batch-size, --max-new-tokens and --limit must be at least 1")
    if not args.model.startswith("openai:"):  # a device this machine lacks: said now, under the flag's name
        from funaudiochat.engine.device import resolve_device

        resolve_device(args.device)
    specs = suites.expand(args.suite)
    shard = runner.parse_shard(args.shard)
    judge = judge_client(args)
    if args.detokenizer is not None and args.mode != "s2s":
        raise InputError("--detokenizer is for --mode s2s")
    model = make_model(args.model, args.url, os.environ.get(args.api_key_env), args.device, args.max_new_tokens,
                       speech=args.mode == "s2s", detokenizer=args.detokenizer)
    folders = [suites.build(spec, args.suites_dir, args.limit) for spec in specs]
    names = [folder.name for folder in folders]
    fileio.write_text(args.out / "run.json", json.dumps({"model": model.label, "suites": names}) + "\n")
    for name, folder in zip(names, folders):
        made = runner.predict(folder, model, args.out / name, shard, progress=not args.no_progress,
                              batch_size=args.batch_size)
        print(f"{name}: " + ("skipped: its answers must be spoken (--mode s2s)" if made < 0 else
                             f"{made} new predictions"))
    if shard is None:
        finish(args.out, names, args.suites_dir, model.label, judge)
    else:
        print(f"shard {args.shard} done; when every shard is, run: funaudiochat eval merge {args.out}")
    return 0
