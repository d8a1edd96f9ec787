"""Weight-streaming products on CPU: BLAS vs inductor's product-and-sum reduction, for the engine's decode shapes.

    .venv/bin/python bench/matvec.py [--threads 2] [--rows 1 2 4 8]

One decode step multiplies a few rows by every weight of the model once, so it is bound by how fast the weights
are read. This times the matrices of one S2S step of `bench_config.json` (the LLM once, the SRH 5 times, 86 MB fp32)
as a chain of products, each input depending on the previous output as in a forward pass:

- `blas row-major` / `blas column-major`: x @ W^T through ATen (MKL) with W [N, K] stored row- or column-major;
- `inductor product-sum`: (x[:, None, :] * W).sum(-1) compiled, W row-major: what `Engine(compile=True)` runs;
- `read only`: W.sum() over the same bytes, the rate at which this machine streams them.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from machine import machine_line  # bench/machine.py: CPU model and SIMD flags


def step_matrices(hidden=256, inner=768, heads=8, kv_heads=4, head_dim=32, llm_layers=4, srh_layers=2,
                  text_vocab=4096, speech_vocab=6564, group=5) -> list[torch.Tensor]:
    """Row-major weights of one S2S step in order: LLM layers + text head, then the SRH layers + speech head x5."""
    def layer():
        return [torch.randn((heads + 2 * kv_heads) * head_dim, hidden), torch.randn(hidden, heads * head_dim),
                torch.randn(2 * inner, hidden), torch.randn(hidden, inner)]
    llm = [w for _ in range(llm_layers) for w in layer()] + [torch.randn(text_vocab, hidden)]
    srh = [w for _ in range(srh_layers) for w in layer()] + [torch.randn(speech_vocab, hidden)]
    return llm + srh * group


def chain(weights, x, product):
    """Feed each product's first output column back into the next input (no two products are independent)."""
    for w in weights:
        y = product(x[:, : w.shape[1]], w)
        x = x + y[:, :1] * 1e-3
    return x


def blas(x, w):
    return x @ w.t()


def product_sum(x, w):
    return (x[:, None, :] * w).sum(-1)


def median_ms(fn, repeats=30):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line())
    torch.manual_seed(0)
    weights = step_matrices()
    column_major = [w.t().contiguous().t() for w in weights]
    mb = sum(w.numel() * w.element_size() for w in weights) / 1e6
    compiled = torch.compile(lambda x, ws: chain(ws, x, product_sum), dynamic=False)
    read_ms = median_ms(lambda: [w.sum() for w in weights])
    print(f"{mb:.0f} MB of fp32 weights per S2S step, {args.threads} threads, torch {torch.__version__}")
    print(f"read only (W.sum()): {read_ms:.2f} ms, {mb / read_ms:.1f} GB/s")
    print(f"{'rows':>4s} {'blas row-major':>15s} {'blas col-major':>15s} {'inductor prod-sum':>18s} "
          f"{'prod-sum / best blas':>21s}")
    for rows in args.rows:
        x = torch.randn(rows, max(w.shape[1] for w in weights))
        row_ms = median_ms(lambda: chain(weights, x, blas))
        col_ms = median_ms(lambda: chain(column_major, x, blas))
        ps_ms = median_ms(lambda: compiled(x, weights))
        print(f"{rows:4d} {row_ms:12.2f} ms {col_ms:12.2f} ms {ps_ms:15.2f} ms {ps_ms / min(row_ms, col_ms):21.2f}")


if __name__ == "__main__":
    main()
