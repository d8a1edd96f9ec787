"""`funaudiochat data synth INPUT --out-dir DIR`: text lines or a JSONL of utterances -> wav files + manifest.

Fields an utterance leaves out take the command-line defaults below.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from funaudiochat.data import augment, synth


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help=".txt (one sentence per line) or .jsonl ({\"id\", \"text\", \"voice\", "
                                            "\"rate\", \"pitch\", \"volume\", \"lang\", \"noise_snr\", \"noise\", "
                                            "\"reverb\", \"telephone\"} per line)")
    p.add_argument("--out-dir", type=Path, required=True, help="folder for the wav files")
    p.add_argument("--manifest", type=Path, default=None, help="manifest path (default: OUT_DIR/manifest.jsonl)")
    p.add_argument("--sample-rate", type=int, default=16000,
                   help="output rate in Hz: 16000 for user turns, 24000 for the assistant voice (default 16000)")
    p.add_argument("--voice", default=None,
                   help="default voice: piper, or espeak:NAME (English: " + ", ".join(synth.ESPEAK_ENGLISH_VOICES)
                        + "; Mandarin: cmn); default: piper for English, espeak:cmn for Mandarin")
    p.add_argument("--lang", default="en", choices=sorted(synth.LANG_DEFAULT_VOICE), help="default language")
    p.add_argument("--rate", type=float, default=1.0, help="speaking-rate factor, 0.5-2 (default 1)")
    p.add_argument("--pitch", type=float, default=0.0, help="pitch shift in semitones, -12..12 (default 0)")
    p.add_argument("--volume", type=float, default=1.0, help="linear gain after normalising to -1 dBFS (default 1)")
    p.add_argument("--noise-snr", type=float, default=None, help="add noise at this SNR in dB (default: none)")
    p.add_argument("--noise", default="white", choices=augment.NOISE_COLORS, help="noise color (default white)")
    p.add_argument("--reverb", type=float, default=None, help="add reverberation with this RT60 in seconds")
    p.add_argument("--telephone", action="store_true", help="telephone band: 300-3400 Hz via 8 kHz mu-law")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    p.add_argument("--seed", type=int, default=0, help="augmentation seed (default 0)")
    p.add_argument("--force", action="store_true", help="re-synthesise items an earlier run already made")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def main(args: argparse.Namespace) -> int:
    defaults = {"voice": args.voice, "lang": args.lang, "rate": args.rate, "pitch": args.pitch,
                "volume": args.volume, "noise_snr": args.noise_snr, "noise": args.noise, "reverb": args.reverb,
                "telephone": args.telephone}
    utterances = synth.parse_requests(args.input, defaults)
    report = synth.synthesize_many(utterances, args.out_dir, args.manifest, sample_rate=args.sample_rate,
                                   workers=args.workers, seed=args.seed, progress=not args.no_progress,
                                   force=args.force)
    speed = report.audio_seconds / report.wall_seconds if report.wall_seconds > 0 else 0.0
    print(f"{len(report.records)} utterances in {report.manifest} ({report.synthesized} synthesised, "
          f"{report.reused} reused); {report.audio_seconds:.1f} s of audio in {report.wall_seconds:.1f} s "
          f"({speed:.1f} audio-s/s)")
    return 0
