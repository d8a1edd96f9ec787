"""Weight-streaming products on CPU: BLAS vs inductor's product-and-sum reductions, for the engine's decode shapes.

    .venv/bin/python bench/matvec.py [--threads 2] [--rows 1 2 4 8] [--config bench|mini] [--decode-weights fp32|fp16|int8]

One decode step multiplies a few rows (one per conversation of a batch) by every weight of the model once, so it is
bound by how fast the weights are read. This times the matrices of one S2S step (`bench`: `bench_config.json`, the
LLM once and the SRH 5 times, 86 MB fp32; `mini`: the mini's LLM layers, 30 x 3.5 M weights) as a chain of products,
each input depending on the previous output as in a forward pass:

- `blas row-major` / `blas column-major`: x @ W^T through ATen (MKL) with W [N, K] stored row- or column-major;
- `broadcast`: (x[:, None, :] * W).sum(-1) compiled, what `Engine(compile=True)` runs (engine/compiled.py, and
  model/quantize.py for fp16 weights, and for int8 ones without the kernel): one reduction over all rows, which
  loads W once per row;
- `grouped`: the same products 4 rows at a time (`grouped` below), each group's reductions fused into one kernel
  that loads W once for its rows: not in the engine (docs/mini.md, "Batched decode products");
- with `--decode-weights fp16` both product-sum columns read fp16 copies of W, products and sums in fp32; with
  `--decode-weights int8`, the int8 weights of `--dtype int8` (per-channel scales applied after the sums);
- `int8 kernel`: the C++ int8 product the engine runs for `--dtype int8` (model/int8_kernel.py), compiled into the
  chain as the engine's graphs call it: each int8 weight read once for all rows;
- `read only`: W.sum() over the same bytes, the rate at which this machine streams them.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from funaudiochat import native
from funaudiochat.model import int8_kernel
from funaudiochat.model.quantize import quantize_weight
from machine import machine_line  # bench/machine.py: CPU model and SIMD flags

ROWS_PER_PASS = 4  # `grouped`: rows that share one pass over W


def step_matrices(hidden=256, inner=768, heads=8, kv_heads=4, head_dim=32, llm_layers=4, srh_layers=2,
                  text_vocab=4096, speech_vocab=6564, group=5) -> list[torch.Tensor]:
    """Row-major weights of one S2S step in order: LLM layers + text head, then the SRH layers + speech head x5."""
    def layer():
        return [torch.randn((heads + 2 * kv_heads) * head_dim, hidden), torch.randn(hidden, heads * head_dim),
                torch.randn(2 * inner, hidden), torch.randn(hidden, inner)]
    llm = [w for _ in range(llm_layers) for w in layer()] + [torch.randn(text_vocab, hidden)]
    srh = [w for _ in range(srh_layers) for w in layer()] + [torch.randn(speech_vocab, hidden)]
    return llm + srh * group


def mini_matrices(layers=30, hidden=576, inner=1536, qkv=960) -> list[torch.Tensor]:
    """Row-major weights of the mini's 30 LLM layers (SmolLM2-135M: fused q|k|v, o, gate|up, down)."""
    return [w for _ in range(layers) for w in (torch.randn(qkv, hidden), torch.randn(hidden, hidden),
                                               torch.randn(2 * inner, hidden), torch.randn(hidden, inner))]


def chain(weights, x, product):
    """Feed each product's first output column back into the next input (no two products are independent)."""
    for w in weights:
        y = product(x[:, : w.shape[1]], w)
        x = x + y[:, :1] * 1e-3
    return x


def int8_chain(quantized, x, kernel):
    """`chain` through the int8 kernel: quantized holds (q [N, K] int8, scale [N]) per weight."""
    for q, scale in quantized:
        y = kernel(x[:, : q.shape[1]].contiguous(), q, scale)
        x = x + y[:, :1] * 1e-3
    return x


def blas(x, w):
    return x @ w.t()


def broadcast(x, w):
    return (x[:, None, :] * w).sum(-1)


def grouped(x, w):
    """ROWS_PER_PASS rows at a time: inductor fuses a group's reductions into one kernel that loads each weight once
    for all its rows (the broadcast form loads it once per row)."""
    rows = x.shape[0]
    return torch.cat([torch.stack([(w * x[j]).sum(-1) for j in range(i, min(i + ROWS_PER_PASS, rows))])
                      for i in range(0, rows, ROWS_PER_PASS)])


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
    ap.add_argument("--config", choices=("bench", "mini"), default="bench")
    ap.add_argument("--decode-weights", choices=("fp32", "fp16", "int8"), default="fp32",
                    help="what the product-and-sum columns read (BLAS always reads fp32)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # a graph per row count and product (else: eager past 8)
    print(machine_line())
    torch.manual_seed(0)
    weights = step_matrices() if args.config == "bench" else mini_matrices()
    column_major = [w.t().contiguous().t() for w in weights]
    quantized = [quantize_weight(w) for w in weights]
    read = {"fp32": weights, "fp16": [w.half() for w in weights], "int8": [q for q, _ in quantized]}[args.decode_weights]
    mb = sum(w.numel() * w.element_size() for w in weights) / 1e6
    compiled = {name: torch.compile(lambda x, ws, p=product: chain(ws, x, p), dynamic=False)
                for name, product in (("broadcast", broadcast), ("grouped", grouped))}
    kernel = int8_kernel.op(native.this_cpus_variant())
    compiled["int8 kernel"] = torch.compile(lambda x, qs: int8_chain(qs, x, kernel), dynamic=False)
    read_ms = median_ms(lambda: [w.sum() for w in weights])
    print(f"{args.config}: {mb:.0f} MB of fp32 weights per step, product-sums read {args.decode_weights}, "
          f"{args.threads} threads, torch {torch.__version__}")
    print(f"read only (W.sum(), fp32): {read_ms:.2f} ms, {mb / read_ms:.1f} GB/s")
    print(f"{'rows':>4s} {'blas row-major':>15s} {'blas col-major':>15s} {'broadcast':>12s} {'grouped':>12s} "
          f"{'grouped / best blas':>20s} {'int8 kernel':>12s}")
    for rows in args.rows:
        x = torch.randn(rows, max(w.shape[1] for w in weights))
        row_ms = median_ms(lambda: chain(weights, x, blas))
        col_ms = median_ms(lambda: chain(column_major, x, blas))
        bc_ms = median_ms(lambda: compiled["broadcast"](x, read))
        gr_ms = median_ms(lambda: compiled["grouped"](x, read))
        k_ms = median_ms(lambda: compiled["int8 kernel"](x, quantized))
        print(f"{rows:4d} {row_ms:12.2f} ms {col_ms:12.2f} ms {bc_ms:9.2f} ms {gr_ms:9.2f} ms "
              f"{gr_ms / min(row_ms, col_ms):20.2f} {k_ms:9.2f} ms")


if __name__ == "__main__":
    main()
