"""`funaudiochat eval asr MANIFEST.jsonl`: transcribe every wav with Whisper tiny.en and print WER/CER.

`--max-wer X --filtered KEEP.jsonl` writes the manifest lines whose own WER is at most X (the paper's filter on
synthetic speech).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from funaudiochat import fileio
from funaudiochat.errors import InputError
from funaudiochat.eval.asr import AsrJudge, read_manifest


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", type=Path, help="JSONL with \"path\" (wav, relative to the manifest) and \"text\"")
    p.add_argument("--out", type=Path, default=None, help="write the full report (per item) as JSON here")
    p.add_argument("--beam-size", type=int, default=5, help="beam width (default 5; 1 = greedy)")
    p.add_argument("--compute-type", default="int8", choices=["int8", "float32"], help="weights type (default int8)")
    p.add_argument("--max-wer", type=float, default=None, help="with --filtered: keep items with WER <= this")
    p.add_argument("--filtered", type=Path, default=None, help="write the kept manifest lines here")


def _write_filtered(manifest: Path, report: dict, max_wer: float, out: Path) -> int:
    records = [record for _, record in fileio.read_jsonl(manifest)]  # read_manifest checked every line already
    kept = []
    for record, item in zip(records, report["items"]):
        if item["wer"] is not None and item["wer"] <= max_wer:
            record["path"] = os.path.relpath(Path(item["path"]).resolve(), out.parent.resolve())
            kept.append(json.dumps(record, ensure_ascii=False) + "\n")
    fileio.write_text(out, "".join(kept))
    return len(kept)


def main(args: argparse.Namespace) -> int:
    if (args.max_wer is None) != (args.filtered is None):
        raise InputError("--max-wer and --filtered go together: give both or neither")
    for flag, path in (("--out", args.out), ("--filtered", args.filtered)):
        if path is not None and path.is_dir():  # found now, not after every wav is transcribed
            raise InputError(f"{flag} {path}: is a folder; name a file")
    read_manifest(args.manifest)  # every line checked before the model loads
    report = AsrJudge(compute_type=args.compute_type, beam_size=args.beam_size).score(args.manifest)
    print(f"WER {100 * report['wer']:.2f} %  CER {100 * report['cer']:.2f} %  over {report['n']} utterances")
    worst = sorted((i for i in report["items"] if i["wer"]), key=lambda i: -i["wer"])[:5]
    for item in worst:
        print(f"  {item['id']}: WER {100 * item['wer']:.0f} %  ref {item['reference']!r}  hyp {item['hypothesis']!r}")
    if args.out:
        fileio.write_text(args.out, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    if args.filtered:
        kept = _write_filtered(args.manifest, report, args.max_wer, args.filtered)
        print(f"kept {kept} of {len(report['items'])} utterances with WER <= {args.max_wer} in {args.filtered}")
    return 0
