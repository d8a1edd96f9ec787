"""Training step time at 5 Hz (k=5 grouping, the paper's DRSR) vs a 25 Hz variant (k=1): same data, same model
otherwise. The paper reports about 50% fewer GPU hours for the 5 Hz backbone.

Both variants take the same conversations (a spoken question, an answer in text + speech) through the real data
path, so only the LLM sequence length changes: one <|AUDIO|> position per 5 speech tokens vs one per token. The SRH
runs at 25 Hz in both. Two timings per variant, interleaved A/B and reported as medians:
  step:     forward + backward + AdamW of the whole model (encoder, adapter, LLM, SRH)
  backbone: forward + backward of the LLM decoder alone on the same sequence lengths

    .venv/bin/python -m bench.train_step [--hidden 384 --layers 8 --batch 4 --question 8 --answer 6 --steps 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from funaudiochat.model import presets
from funaudiochat.model.backbone import attention_mask_4d
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.train.batching import Collator
from funaudiochat.train.data import SampleBuilder, load_records
from tests.helpers import make_tiny_tokenizer, sharegpt_record, words, write_wav

from machine import machine_line  # bench/machine.py: CPU model and SIMD flags


def make_data(folder: Path, batch: int, question_s: float, answer_s: float) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(batch):
        wav = write_wav(folder / f"q{i}.wav", question_s, seed=i)
        n_words = int(answer_s * 3)  # ~3 words per second of speech
        codes = rng.integers(0, 290, int(answer_s * 25)).tolist()
        lines.append(json.dumps(sharegpt_record(words([40, 41]), wav, rng.integers(30, 500, n_words), codes,
                                                question_s)))
    path = folder / "bench.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def build(group_size: int, args, tok, data: Path):
    cfg = presets.tiny(hidden=args.hidden, layers=args.layers, srh_layers=args.srh_layers)
    cfg.audio_config.group_size = group_size
    torch.manual_seed(0)
    model = FunAudioChatModel(cfg)
    model.init_weights()
    samples, _ = load_records([data], SampleBuilder(tok, cfg, 100_000).sample)
    batch = Collator(cfg, 100_000, packing=False)(samples).model_inputs("cpu")
    return model, torch.optim.AdamW(model.parameters(), lr=1e-5), batch


def full_step(model, optim, batch) -> float:
    t0 = time.perf_counter()
    model(**batch).loss.backward()
    optim.step()
    optim.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def backbone_step(model, batch) -> float:
    ids = batch["input_ids"]
    b, l = ids.shape
    x = torch.randn(b, l, model.cfg.text_config.hidden_size, requires_grad=True)
    positions = torch.arange(l)[None].expand(b, -1)
    mask = attention_mask_4d(batch["attention_mask"], l, l, 0, b, x.device)
    t0 = time.perf_counter()
    model.language_model.model(x, positions, mask).square().mean().backward()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--srh-layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="conversations per step")
    p.add_argument("--question", type=float, default=8.0, help="seconds of user speech")
    p.add_argument("--answer", type=float, default=6.0, help="seconds of assistant speech")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = make_tiny_tokenizer(tmp / "tok")
        data = make_data(tmp, args.batch, args.question, args.answer)
        variants = {k: build(k, args, tok, data) for k in (5, 1)}
        times: dict[int, dict[str, list[float]]] = {k: {"step": [], "backbone": []} for k in variants}
        for i in range(args.steps + 1):  # the first round warms up
            for k, (model, optim, batch) in variants.items():
                step, bb = full_step(model, optim, batch), backbone_step(model, batch)
                if i:
                    times[k]["step"].append(step)
                    times[k]["backbone"].append(bb)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; LLM d={args.hidden} x {args.layers} "
          f"layers, SRH {args.srh_layers} layers; batch {args.batch} x ({args.question:g} s question + "
          f"{args.answer:g} s answer)")
    for k, (_, _, batch) in variants.items():
        rate = 25 // k
        print(f"  {rate:>2} Hz (k={k}): LLM length {batch['input_ids'].shape[1]:>4}  "
              f"step {statistics.median(times[k]['step']) * 1e3:8.1f} ms  "
              f"backbone {statistics.median(times[k]['backbone']) * 1e3:8.1f} ms")
    for part in ("step", "backbone"):
        ratio = statistics.median(times[5][part]) / statistics.median(times[1][part])
        print(f"  {part}: 5 Hz / 25 Hz time = {ratio:.3f} ({(1 - ratio) * 100:.0f}% less)")


if __name__ == "__main__":
    main()
