"""The int8 prefill's layer products: fp32 scratch (as decoding's eager products), bf16 scratch with bf16 products
(the prompt passes where the CPU computes bf16 natively), and plain fp32 weights, side by side in one process.

    .venv/bin/python bench/int8_prefill.py [--positions 43 160] [--threads 2] [--runs 5]

The matrices of SmolLM2-135M's 30 layers (q|k|v 960 x 576, o 576 x 576, gate|up 3072 x 576, down 576 x 1536), random
int8 weights with per-row scales, multiplied by `positions` rows (one prompt's new positions); the time of all 120
products, fastest of `runs`. Only the products: the prefill also runs attention, norms, and the audio encoder.
"""
from __future__ import annotations

import argparse
import time

import torch

from funaudiochat.model import quantize
from machine import machine_line  # bench/machine.py: CPU model and SIMD flags

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30


def timed(fn, runs: int) -> float:
    fn()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--positions", type=int, nargs="+", default=[43, 160])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = [(torch.randint(-127, 128, s, dtype=torch.int8), torch.rand(s[0]) * 0.01) for s in SHAPES]
    fp32 = [q.float() * scale[:, None] for q, scale in weights]
    cpu = torch.device("cpu")

    def int8_products(mode: str, xs: dict):
        def run():
            quantize.set_prompt_products(mode)
            try:
                with quantize.prompt_products(cpu):
                    for q, scale in weights:
                        quantize.int8_linear(xs[q.shape[1]], q, scale)
            finally:
                quantize.set_prompt_products("auto")
        return run

    print(machine_line())
    print("| positions | int8, fp32 scratch | int8, bf16 products | fp32 weights | fp32 scratch / bf16 |")
    print("|---|---|---|---|---|")
    for n in args.positions:
        xs = {k: torch.randn(n, k) for k in (576, 1536)}
        old = timed(int8_products("fp32", xs), args.runs)
        new = timed(int8_products("bf16", xs), args.runs)
        ref = timed(lambda: [xs[w.shape[1]] @ w.t() for w in fp32], args.runs)
        print(f"| {n} | {old:.1f} ms | {new:.1f} ms | {ref:.1f} ms | {old / new:.2f}x |")


if __name__ == "__main__":
    main()
