"""The word reader alone (model/word_reader.py): what it reads from a split's ASR clips, and how long a read takes.

For each ASR record of DATA/SPLIT.jsonl: the clip's log-mel, the encoder on the reader's padded windows, the reader's
beam search, its tokens decoded with Whisper's tokenizer; WER against the transcript (the project's English normaliser),
and the median time of the encoder and of the read per clip. Settings are overridden on the checkpoint's reader
(`--window`, `--beam`, `--no-cut`), and its products read the weights in each of `--compute` in turn (fp32, bf16 copies,
or auto: bf16 where the CPU computes it natively; fp32-plain: fp32 with the vocabulary product on the plain weight
instead of oneDNN's packed copy; fp32-half-vocab: packed fp32 but the vocabulary product compiled over an fp16 copy, as
with `--decode-weights fp16`), on the same clips in one run; each setting after the first also says on how many clips it
reads the same words as the first.

    .venv/bin/python bench/word_reader.py --model checkpoints/mini -n 150 --threads 2 [--window 10] [--beam 5] \
        [--compute fp32 fp32-plain auto]

Prints the machine line, then one row per setting: WER, clips, encode and read medians.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from funaudiochat.model import word_reader

sys.path.insert(0, str(Path(__file__).parent))  # bench/machine.py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("checkpoints/mini"), help="a checkpoint with a word reader")
    ap.add_argument("--data", type=Path, default=Path("data/mini"), help="build-mini's output folder")
    ap.add_argument("--split", default="test")
    ap.add_argument("-n", type=int, default=150, help="the split's first N ASR records (default 150)")
    ap.add_argument("--window", type=int, default=None, help="window_s override (seconds)")
    ap.add_argument("--beam", type=int, default=None, help="beam_size override (1: greedy)")
    ap.add_argument("--no-cut", action="store_true", help="keep a looping transcript as read")
    ap.add_argument("--compute", nargs="+", default=["fp32", "auto"],
                    choices=list(word_reader.COMPUTE_DTYPES) + ["fp32-plain", "fp32-half-vocab"],
                    help="what the reader's products read, each measured in turn (default fp32 auto; auto: bf16 "
                         "copies of the weights where the CPU computes bf16 natively)")
    ap.add_argument("--load-dtype", default=None, choices=["fp32", "bf16"],
                    help="cast the checkpoint's weights as `infer --dtype` does (default: as stored); in bf16 the "
                         "reader's products, sums and residual stream are all bf16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None,
                    help="write each clip's id, reference and reading (of the last --compute) to this JSON file")
    args = ap.parse_args()

    import tokenizers

    from machine import machine_line
    from funaudiochat.assets.whisper_encoder import whisper_model_dir
    from funaudiochat.audio.mel import WhisperFrontend
    from funaudiochat.audio.io import load_audio
    from funaudiochat.eval.asr import error_rates
    from funaudiochat.eval.mini import read_split
    from funaudiochat.eval.normalize import normalize_english
    from funaudiochat.model.checkpoint import load_model

    torch.set_num_threads(args.threads)
    print(machine_line())
    model = load_model(args.model, dtype=args.load_dtype).eval()
    reader, tower = model.word_reader, model.continuous_audio_tower
    if reader is None:
        raise SystemExit(f"{args.model}: no word reader (audio_config.word_reader)")
    overrides = {k: v for k, v in (("window_s", args.window), ("beam_size", args.beam)) if v is not None}
    reader.cfg = word_reader.WordReaderConfig.from_dict({**reader.cfg.to_dict(), **overrides}, "--window / --beam")
    if args.no_cut:
        word_reader.cut_loop = lambda tokens: tokens
    tok = tokenizers.Tokenizer.from_file(str(whisper_model_dir() / "tokenizer.json"))
    records = [r for r in read_split(args.data, args.split) if r.task == "asr"][: args.n]
    frontend = WhisperFrontend(model.cfg.audio_config.num_mel_bins)
    dtype = next(tower.parameters()).dtype
    clips = [(f.to(dtype), m) for f, m in (frontend([load_audio(r.wavs[0])], padding="longest") for r in records)]
    print(f"{len(records)} ASR clips of {args.data / args.split}.jsonl; reader {json.dumps(reader.cfg.to_dict())}")
    packs, first = word_reader._packs_for_cpu, None
    for dtype in args.compute:
        reader.set_compute_dtype("fp32" if dtype in ("fp32-plain", "fp32-half-vocab") else dtype)
        word_reader._packs_for_cpu = (lambda device: False) if dtype == "fp32-plain" else packs
        reader.use_half_vocabulary(dtype == "fp32-half-vocab")
        hyps, encode_s, read_s = [], [], []
        with torch.no_grad():
            for features, mask in clips:
                t0 = time.perf_counter()
                windows = tower.ln_post(tower.window_frames(features, mask.sum(-1), reader.cfg.window_frames)[0])
                t1 = time.perf_counter()
                tokens, count = reader.read(windows, 448)
                t2 = time.perf_counter()
                encode_s.append(t1 - t0)
                read_s.append(t2 - t1)
                hyps.append(" ".join(tok.decode(tokens[i, : int(count[i])].tolist()) for i in range(len(count))))
        refs = [normalize_english(r.answer) for r in records]
        wer = error_rates(refs, [normalize_english(h) for h in hyps])[0]
        same = "" if first is None else f"; the same words as {args.compute[0]} on " \
            f"{sum(a == b for a, b in zip(first, hyps))} of {len(hyps)}"
        first = hyps if first is None else first
        print(f"compute {dtype}: WER {wer:.3f} on {len(records)} clips; encode {statistics.median(encode_s):.3f} s, "
              f"read {statistics.median(read_s):.3f} s (medians per clip){same}")
    if args.out is not None:
        items = [{"id": r.id, "reference": r.answer, "reading": h} for r, h in zip(records, hyps)]
        args.out.write_text(json.dumps(items, indent=1) + "\n")


if __name__ == "__main__":
    main()
