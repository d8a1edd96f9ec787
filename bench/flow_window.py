"""The streaming flow's cost per chunk against its window, and what a smaller `flow_window` changes in the audio.

    .venv/bin/python bench/flow_window.py [--detokenizer tiny|DIR] [--windows 200 100 50] [--tokens 400]

Part 1: CPU ms per row of one non-final `TokenToMelFlow.inference_rows` call (chunk mask) over windows of 18 to 218
tokens, 1 and 8 rows. Part 2: one stream of `--tokens` random codes, hop 15, per `flow_window`: CPU ms per chunk and
the RMS of its audio's difference from the first window's, relative to that audio's RMS. Random weights (tiny):
the difference says how much the window changes the output, not whether one hears it.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve import prepare_detokenizer  # noqa: E402  (bench/serve.py: 'tiny' or a folder)
from funaudiochat.speech.detokenizer import Detokenizer  # noqa: E402

HOP = 15


def flow_cost(detok: Detokenizer, tokens: list[int], rows: int, repeats: int = 3) -> float:
    """Best CPU seconds per row of a non-final flow call on `tokens`, `rows` rows."""
    emb = detok.speaker_embedding().repeat(rows, 1)
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        detok.flow.inference_rows([tokens] * rows, emb, streaming=True)
        best = min(best, time.process_time() - t)
    return best / rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--detokenizer", default="tiny")
    ap.add_argument("--windows", type=int, nargs="+", default=[200, 100, 50])
    ap.add_argument("--tokens", type=int, default=400)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        detok = Detokenizer.from_dir(prepare_detokenizer(args.detokenizer, Path(tmp)))
    g = torch.Generator().manual_seed(0)
    for n in (18, 68, 118, 168, 218):
        tokens = torch.randint(0, 6561, (n,), generator=g).tolist()
        per_row = [flow_cost(detok, tokens, rows) * 1000 for rows in (1, 8)]
        print(f"window {n} tokens: {per_row[0]:.1f} / {per_row[1]:.1f} ms CPU per row at 1 / 8 rows", flush=True)
    tokens = torch.randint(0, 6561, (args.tokens,), generator=g).tolist()
    runs = {}
    for window in args.windows:
        stream = detok.stream(None, HOP, flow_window=window, hift_reset=500)
        t = time.process_time()
        chunks = [c for i in range(0, len(tokens), HOP) for c in stream.push(tokens[i:i + HOP])] + [stream.finalize()]
        runs[window] = np.concatenate(chunks), time.process_time() - t, len(chunks)
    ref = runs[args.windows[0]][0]
    rms = lambda x: float(np.sqrt(np.mean(x ** 2)))  # noqa: E731
    for window, (wav, cpu, n) in runs.items():
        print(f"flow_window {window}: {n} chunks, {cpu * 1000 / n:.0f} ms CPU per chunk; audio differs from "
              f"flow_window {args.windows[0]}'s by {rms(wav - ref) / rms(ref):.1%} of its RMS", flush=True)


if __name__ == "__main__":
    main()
