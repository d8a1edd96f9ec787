"""Streaming detokenizer A/B: B streams' whole answers through `detokenizer.drain`, one chunk per stream per round
as the server's worker drains them, in each mode: HiFT re-run on the whole mel (`whole`, the released loop), the
incremental vocoder (`incremental`), and the incremental vocoder with the flow's key/value cache (`cached`, the
server's default), interleaved round by round.

    .venv/bin/python bench/detok_stream_ab.py [--detokenizer tiny|DIR] [--streams 8] [--tokens 100] [--repeats 1]
        [--modes whole incremental cached]

Prints wall seconds and the thread's CPU seconds per mode (tiny random detokenizer by default, one thread).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve import prepare_detokenizer  # noqa: E402  (bench/serve.py: 'tiny' or a folder)
from funaudiochat.speech.detokenizer import Detokenizer, drain  # noqa: E402

PIECE = 6  # tokens arriving per stream between two rounds


MODES = {"whole": dict(vocoder="whole", flow_cache=False), "incremental": dict(vocoder="incremental", flow_cache=False),
         "cached": dict(vocoder="incremental", flow_cache=True)}


def answer(detok: Detokenizer, tokens: list[list[int]], mode: str) -> tuple[float, float]:
    streams = [detok.stream(None, 15, flow_window=200, hift_reset=500, **MODES[mode]) for _ in tokens]
    wall, cpu = time.perf_counter(), time.thread_time()
    for i in range(0, max(map(len, tokens)), PIECE):
        for stream, codes in zip(streams, tokens):
            stream.feed(codes[i:i + PIECE])
        drain(streams, rounds=1)
    drain(streams)
    for stream in streams:
        stream.finalize()
    return time.perf_counter() - wall, time.thread_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--detokenizer", default="tiny")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        detok = Detokenizer.from_dir(prepare_detokenizer(args.detokenizer, Path(tmp)))
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, 6561, (args.tokens,), generator=g).tolist() for _ in range(args.streams)]
    for _ in range(args.repeats):
        for mode in args.modes:
            wall, cpu = answer(detok, tokens, mode)
            print(f"{mode}: {args.streams} streams x {args.tokens} tokens: wall {wall:.1f} s, CPU {cpu:.1f} s",
                  flush=True)


if __name__ == "__main__":
    main()
