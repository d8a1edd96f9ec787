"""How much of the words a head trained on the mini's data can read from the frozen Whisper-tiny.en encoder: a CTC
probe from its 25 Hz frames (the mean pool of 2 and ln_post, before the trained projection) to characters, trained
on build-mini's ASR clips and scored (greedy, WER / CER) on held-out sentences in train voices and on test clips.
A linear probe says what a linear adapter could carry; a small MLP, what a few nonlinear layers add.

    .venv/bin/python bench/ctc_probe.py [--model runs/mini/hear2/final] [--clips 3000] [--epochs 15]
"""
from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

CHARS = " '" + "abcdefghijklmnopqrstuvwxyz0123456789"  # class 0 is the CTC blank


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^a-z0-9' ]", " ", text.lower())).strip()


def asr_clips(data: Path, name: str, limit: int | None = None) -> list[tuple[Path, str]]:
    """(wav, normalised transcript) of the ASR records of DATA/NAME.jsonl."""
    out = []
    for line in (data / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec["task"] == "asr":
            out.append((data / json.loads(rec["audio"][0])["path"], normalise(rec["messages"][-1]["content"])))
    return out[:limit]


class Frames:
    """The frozen encoder's 25 Hz frames [N, 384] of a wav."""

    def __init__(self, model_dir: Path):
        from funaudiochat.model.checkpoint import load_model

        self.tower = load_model(model_dir).continuous_audio_tower.eval()

    @torch.no_grad()
    def __call__(self, path: Path) -> torch.Tensor:
        from funaudiochat.audio.io import load_audio
        from funaudiochat.audio.mel import log_mel

        mel = log_mel(torch.from_numpy(load_audio(str(path), 16000)), self.tower.cfg.num_mel_bins)[None]
        frames = self.tower.encode_frames(mel, torch.tensor([mel.shape[-1]]))[0]  # [T', 384] at 50 Hz
        return self.tower.ln_post(F.avg_pool1d(frames.T[None], 2, 2)[0].T)


def greedy(logits: torch.Tensor) -> str:
    out, prev = [], 0
    for c in logits.argmax(-1).tolist():
        if c not in (0, prev):
            out.append(CHARS[c - 1])
        prev = c
    return re.sub(r"\s+", " ", "".join(out)).strip()


def train_and_score(head: nn.Module, name: str, train: list, evals: dict, epochs: int, lr: float = 3e-3) -> None:
    from funaudiochat.eval.asr import error_rates

    opt, ctc = torch.optim.Adam(head.parameters(), lr=lr), nn.CTCLoss(zero_infinity=True)
    order = list(range(len(train)))
    for epoch in range(1, epochs + 1):
        random.shuffle(order)
        total = 0.0
        for b in range(0, len(order), 64):
            batch = [train[i] for i in order[b:b + 64]]
            x = nn.utils.rnn.pad_sequence([f for f, _ in batch], batch_first=True)  # [B, N, 384]
            targets = [torch.tensor([CHARS.index(c) + 1 for c in text]) for _, text in batch]
            log_probs = head(x).log_softmax(-1).transpose(0, 1)  # [N, B, classes]
            loss = ctc(log_probs, torch.cat(targets), torch.tensor([len(f) for f, _ in batch]),
                       torch.tensor([len(t) for t in targets]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(batch)
        if epoch % 5 == 0 or epoch == epochs:
            with torch.no_grad():
                scores = {k: error_rates([t for _, t in v], [greedy(head(f[None])[0]) for f, _ in v])
                          for k, v in evals.items()}
            print(json.dumps({"head": name, "epoch": epoch, "train_ctc": round(total / len(order), 3),
                              **{k: {"wer": round(w, 3), "cer": round(c, 3)} for k, (w, c) in scores.items()}}),
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("runs/mini/hear2/final"), help="a mini checkpoint (its encoder)")
    ap.add_argument("--data", type=Path, default=Path("data/mini"), help="build-mini's output folder")
    ap.add_argument("--clips", type=int, default=3000, help="train clips from each of the two ASR files")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    random.seed(0)
    frames = Frames(args.model)

    def featurise(name, limit=None):
        t0 = time.perf_counter()
        clips = [(frames(path), text) for path, text in asr_clips(args.data, name, limit)]
        print(f"{name}: {len(clips)} clips, {time.perf_counter() - t0:.0f} s", flush=True)
        return clips

    train = featurise("train_clips_asr", args.clips) + featurise("train_answers_asr", args.clips)
    evals = {"heldout": featurise("train_voices_heldout_asr"), "test": featurise("test", 150)}
    dim, classes = train[0][0].shape[1], len(CHARS) + 1
    train_and_score(nn.Linear(dim, classes), "linear", train, evals, args.epochs)
    train_and_score(nn.Sequential(nn.Linear(dim, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(),
                                  nn.Linear(512, classes)), "mlp", train, evals, args.epochs)


if __name__ == "__main__":
    main()
