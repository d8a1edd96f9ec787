"""The word reader on text it never trained on: the split's spoken-QA *answers* (declarative sentences; the reader
trains on questions) spoken by espeak-ng voices, clean and with noise at 10 dB SNR (white and pink in turn).

    .venv/bin/python bench/reader_out_of_domain.py --model checkpoints/mini -n 60 --threads 2

Prints the machine line and the reader's WER (the project's English normaliser) in each condition. The wavs are made
in a temporary folder and deleted.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))  # bench/machine.py

VOICES = ("en-us", "en", "en-us+f3", "en+m2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("checkpoints/mini"), help="a checkpoint with a word reader")
    ap.add_argument("--data", type=Path, default=Path("data/mini"), help="build-mini's output folder")
    ap.add_argument("--split", default="test")
    ap.add_argument("-n", type=int, default=60, help="the split's first N distinct answers of 20-140 characters")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import tokenizers

    from machine import machine_line
    from funaudiochat.assets.whisper_encoder import whisper_model_dir
    from funaudiochat.audio.io import load_audio
    from funaudiochat.audio.mel import WhisperFrontend
    from funaudiochat.data import augment
    from funaudiochat.eval.asr import error_rates
    from funaudiochat.eval.normalize import normalize_english
    from funaudiochat.model.checkpoint import load_model

    torch.set_num_threads(args.threads)
    print(machine_line())
    model = load_model(args.model).eval()
    reader = model.word_reader
    if reader is None:
        raise SystemExit(f"{args.model}: no word reader (audio_config.word_reader)")
    tok = tokenizers.Tokenizer.from_file(str(whisper_model_dir() / "tokenizer.json"))
    frontend = WhisperFrontend(model.cfg.audio_config.num_mel_bins)
    texts: list[str] = []
    with open(args.data / f"{args.split}.jsonl") as f:
        for line in f:
            record = json.loads(line)
            answer = record["messages"][-1]["content"]
            if record.get("task") == "qa" and 20 < len(answer) < 140 and answer not in texts:
                texts.append(answer)
    texts = texts[: args.n]
    rng = np.random.default_rng(0)
    hyps: dict[str, list[str]] = {"clean": [], "10 dB": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(texts):
            path = Path(tmp) / f"{i}.wav"
            subprocess.run(["espeak-ng", "-v", VOICES[i % len(VOICES)], "-w", str(path), text], check=True,
                           capture_output=True)
            wav = load_audio(path)
            for condition, hyp in hyps.items():
                heard = wav if condition == "clean" else augment.add_noise(wav, 10.0, rng, augment.NOISE_COLORS[i % 2])
                features, mask = frontend([heard], padding="longest")
                with torch.no_grad():
                    tokens, count = reader.read(model.reader_memory(features, mask.sum(-1))[0], 448)
                hyp.append(" ".join(tok.decode(tokens[j, : int(count[j])].tolist()) for j in range(len(count))))
    refs = [normalize_english(t) for t in texts]
    for condition, hyp in hyps.items():
        wer = error_rates(refs, [normalize_english(h) for h in hyp])[0]
        print(f"{condition}: WER {wer:.3f} on {len(texts)} answers ({', '.join(VOICES)})")


if __name__ == "__main__":
    main()
