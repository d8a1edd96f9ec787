"""Where a served answer's CPU time goes, in process and in CPU seconds (so a loaded machine changes little): one
decode step of B batched rows, and one streaming-detokenizer round of B sessions' chunks, batched vs one at a time.

    .venv/bin/python bench/serve_cost.py [--model tiny|CONFIG.json|DIR] [--detokenizer tiny|DIR] [--rows 1 4 8 16]
        [--vocoder incremental whole] [--depth 0 10]

Per B: decode CPU ms per step and per row-token, detokenizer CPU ms per chunk batched (`detokenizer.drain` of B
streams, as the server's worker does) and alone (each stream drained by itself), and the detokenizer's share of a
speech token's CPU cost (25 speech tokens per second of audio; hop 15 tokens per chunk).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from machine import machine_line  # bench/machine.py
from serve import prepare_detokenizer, prepare_model  # bench/serve.py: the same model and detokenizer makers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HOP = 15


def decode_cost(model_dir: Path, rows: int, steps: int) -> float:
    """CPU seconds of one batched decode step of `rows` rows (s2s, speech on), median over `steps` steps."""
    from funaudiochat.engine.loading import load_runtime
    from funaudiochat.engine.presets import generation_preset
    from funaudiochat.engine.prompt import build_prompt, stack_prompts

    rt = decode_cost.rt = getattr(decode_cost, "rt", None) or load_runtime(model_dir, speech=True)
    msgs = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello there"}]
    prompt = build_prompt(rt.tokenizer, rt.engine.cfg, msgs, [])
    gen = generation_preset("s2s", rt.tokenizer, max_new_tokens=steps + 1, do_sample=False)
    gen = gen.with_(eos_token_id=-1)  # random weights: run every row to the end
    if rows > 1:
        prompt = stack_prompts([prompt] * rows, gen.pad_token_id, rt.engine.cfg.audio_config.pad_token_id)
    times, t = [], time.process_time()
    for i, _ in enumerate(rt.engine.steps(prompt, gen)):
        now = time.process_time()
        if i:  # (the first yield includes the prefill)
            times.append(now - t)
        t = now
    return sorted(times)[len(times) // 2]


def detok_cost(detok_dir: Path, rows: int, repeats: int = 3, vocoder: str = "incremental", depth: int = 0
               ) -> tuple[float, float, float, float]:
    """CPU seconds per chunk: B streams' next chunks drained together, the same chunks one stream at a time, and
    the batched time's flow and HiFT parts. Stream b is 1 + b % 4 + `depth` chunks into its answer."""
    import copy

    from funaudiochat.speech import detokenizer as detok_module
    from funaudiochat.speech.detokenizer import Detokenizer, drain

    detok = detok_cost.cache.get(detok_dir) or Detokenizer.from_dir(detok_dir)
    detok_cost.cache[detok_dir] = detok
    g = torch.Generator().manual_seed(0)
    bases = []
    for b in range(rows):  # each stream a few chunks in, of different lengths (as sessions are), one chunk ready
        s = detok.stream(None, HOP, flow_window=200, hift_reset=500, vocoder=vocoder)
        s.feed(torch.randint(0, 6561, (HOP * (1 + b % 4 + depth) + 3,), generator=g).tolist())
        drain([s])
        s.feed(torch.randint(0, 6561, (HOP,), generator=g).tolist())
        bases.append(s)

    def streams():  # copies of the prepared streams (the same chunk is made again)
        out = []
        for base in bases:
            s = detok.stream(None, HOP, flow_window=200, hift_reset=500, vocoder=vocoder)
            s.state = copy.deepcopy(base.state)
            out.append(s)
        return out

    spent = {"flow": 0.0, "hift": 0.0}

    def timed(name, fn):
        def run(*args, **kwargs):
            t = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.process_time() - t
        return run

    together = alone = 0.0
    for _ in range(repeats):
        batch = streams()
        flow_rows, hift_rows, vocode = detok.flow.inference_rows, detok.hift.forward_rows, detok_module.vocode_rows
        detok.flow.inference_rows, detok.hift.forward_rows = timed("flow", flow_rows), timed("hift", hift_rows)
        detok_module.vocode_rows = timed("hift", vocode)
        t = time.process_time()
        drain(batch)
        together += time.process_time() - t
        del detok.flow.inference_rows, detok.hift.forward_rows  # (the instance attributes shadowed the methods)
        detok_module.vocode_rows = vocode
        single = streams()
        t = time.process_time()
        for s in single:
            drain([s])
        alone += time.process_time() - t
    n = repeats * rows
    return together / n, alone / n, spent["flow"] / n, spent["hift"] / n


detok_cost.cache = {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--detokenizer", default="tiny")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--vocoder", nargs="+", default=["incremental"], choices=["incremental", "whole"],
                    help="the streaming vocoder: incremental (the default) or whole (HiFT re-run on the whole mel)")
    ap.add_argument("--depth", type=int, nargs="+", default=[0],
                    help="extra chunks each stream has made before the measured one (its answer so far)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        model = prepare_model(args.model, Path(tmp))
        detok = prepare_detokenizer(args.detokenizer, Path(tmp))
        print(f"model {args.model}, detokenizer {args.detokenizer}, one torch thread, CPU time (process_time)")
        print("| vocoder | depth | B | decode ms/step | decode ms/row-token | detok ms/chunk batched (flow + HiFT) "
              "| detok ms/chunk alone | detok share of a speech token's CPU, batched |")
        print("|---|---|---|---|---|---|---|---|")
        results = []
        for rows in args.rows:
            step = decode_cost(model, rows, args.steps)
            for vocoder in args.vocoder:
                for depth in args.depth:
                    together, alone, flow, hift = detok_cost(detok, rows, vocoder=vocoder, depth=depth)
                    # per speech token: a decode step makes k speech tokens per row; a chunk covers HOP tokens
                    k = decode_cost.rt.engine.k
                    per_token_decode, per_token_detok = step / rows / k, together / HOP
                    share = per_token_detok / (per_token_decode + per_token_detok)
                    print(f"| {vocoder} | {depth} | {rows} | {step * 1000:.1f} | {step * 1000 / rows:.1f} | "
                          f"{together * 1000:.1f} ({flow * 1000:.1f} + {hift * 1000:.1f}) | "
                          f"{alone * 1000:.1f} | {share:.0%} |", flush=True)
                    results.append({"vocoder": vocoder, "depth": depth, "rows": rows, "step_s": step,
                                    "detok_batched_s": together, "detok_alone_s": alone, "flow_s": flow,
                                    "hift_s": hift})
        print(json.dumps(results))


if __name__ == "__main__":
    main()
