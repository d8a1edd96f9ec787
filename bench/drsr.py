"""The paper's DRSR claim at the mini's scale (issue 14 must-show 5): training steps of the speaking stage at group
size k = 5 (the LLM at 5 Hz, the SRH making 5 speech tokens per LLM step) vs k = 1 (the LLM at 25 Hz), on the same
S2S records (a spoken question, an answer in text + 25 Hz speech), through the real data path.

The model has the mini's shape (the config of `assets smollm2`'s checkpoint: SmolLM2-135M, Whisper tiny.en, SRH
2 x 256) with random weights (time does not depend on them), and trains what recipes/mini/speak.yaml trains (LoRA
on the LLM, the SRH, the speech embedding and projections, the hearing adapter). Steps alternate k = 5 / k = 1;
after a warm-up round each, the medians are reported: step time (forward + backward + AdamW), LLM positions per
sample and speech tokens trained per second.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/drsr.py [--config checkpoints/mini-base --steps 3]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from funaudiochat.config import FunAudioChatConfig  # noqa: E402
from funaudiochat.model import lora  # noqa: E402
from funaudiochat.model.funaudiochat import FunAudioChatModel  # noqa: E402
from funaudiochat.text.tokenizer import AUDIO_TEMPLATE, TextTokenizer  # noqa: E402
from funaudiochat.train.batching import Collator  # noqa: E402
from funaudiochat.train.config import load_recipe  # noqa: E402
from funaudiochat.train.data import SampleBuilder, assistant_token_string, load_records  # noqa: E402
from funaudiochat.train.optim import select_trainable  # noqa: E402
from tests.helpers import write_wav  # noqa: E402

from machine import machine_line  # noqa: E402  (bench/machine.py: CPU model and SIMD flags)

ANSWER = ("Sure. The river runs from the hills down to the sea, and in spring it carries the melted snow past the "
          "old mill, where children watch the boats go by.")


def make_records(folder: Path, n: int, question_s: float, answer_s: float, num_codes: int) -> Path:
    """`n` S2S records in the released format: a spoken question (a tone), the answer's text and speech codes."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        wav = write_wav(folder / f"q{i}.wav", question_s, seed=i, freq=150.0 + 30 * i)
        user = {"path": str(wav), "text": "", "token": "<|audio_pad|>" * int(question_s * 25), "ref_path": "",
                "ref_text": ""}
        codes = rng.integers(0, num_codes, int(answer_s * 25)).tolist()
        answer = {"path": "", "text": ANSWER, "token": assistant_token_string(codes), "ref_path": "", "ref_text": ""}
        lines.append(json.dumps({"id": f"s2s{i}", "system": "You are a friendly voice assistant.",
                                 "messages": [{"role": "user", "content": AUDIO_TEMPLATE},
                                              {"role": "assistant", "content": AUDIO_TEMPLATE}],
                                 "audio": [json.dumps(user), json.dumps(answer)]}))
    path = folder / "s2s.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def build(cfg: FunAudioChatConfig, k: int, recipe, tok: TextTokenizer, data: Path):
    """The model at group size k with speak.yaml's trainable set, its optimizer, and one micro-batch of all records."""
    cfg = copy.deepcopy(cfg)
    cfg.audio_config.group_size = k
    torch.manual_seed(0)
    model = FunAudioChatModel(cfg)
    model.init_weights()
    lora.attach(model, recipe.lora.rank, recipe.lora.alpha, recipe.lora.targets)
    select_trainable(model, recipe.train.trainable, recipe.train.frozen)
    samples, report = load_records([data], SampleBuilder(tok, cfg, 100_000).sample)
    if not samples:
        raise SystemExit(f"no usable record at k={k}: {report.summary()}")
    batch = Collator(cfg, 100_000, packing=False)(samples)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4), batch, samples


def step(model, optim, inputs) -> tuple[float, float]:
    """One training step: (wall seconds, CPU seconds of this process; the closer guide on a shared machine)."""
    t0, c0 = time.perf_counter(), time.process_time()
    model(**inputs).loss.backward()
    optim.step()
    optim.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=Path("checkpoints/mini-base"),
                   help="checkpoint folder whose config.json and tokenizer.json give the shape (default mini-base)")
    p.add_argument("--recipe", type=Path, default=Path("recipes/mini/speak.yaml"), help="trainable set and LoRA")
    p.add_argument("--batch", type=int, default=2, help="S2S records per step")
    p.add_argument("--question", type=float, default=4.0, help="seconds of user speech")
    p.add_argument("--answer", type=float, default=10.0, help="seconds of assistant speech (25 tokens/s)")
    p.add_argument("--steps", type=int, default=3, help="measured steps per k (after one warm-up step)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line())
    cfg = FunAudioChatConfig.load(args.config)
    tok = TextTokenizer.from_file(args.config / "tokenizer.json")
    recipe = load_recipe(args.recipe)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_records(Path(tmp), args.batch, args.question, args.answer, cfg.audio_config.num_codes)
        variants = {k: build(cfg, k, recipe, tok, data) for k in (5, 1)}
        times: dict[int, list[float]] = {k: [] for k in variants}
        cpu: dict[int, list[float]] = {k: [] for k in variants}
        inputs = {k: v[2].model_inputs("cpu") for k, v in variants.items()}
        for i in range(args.steps + 1):  # round 0 warms up
            for k, (model, optim, _, _) in variants.items():
                t, c = step(model, optim, inputs[k])
                if i:
                    times[k].append(t)
                    cpu[k].append(c)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {args.config} shape, "
          f"{sum(p.numel() for p in variants[5][0].parameters()) / 1e6:.0f}M parameters; batch {args.batch} x "
          f"({args.question:g} s question + {args.answer:g} s spoken answer); {args.steps} steps per k, interleaved")
    for k, (_, _, batch, samples) in variants.items():
        t, c = statistics.median(times[k]), statistics.median(cpu[k])
        positions = statistics.mean(len(s) for s in samples)
        print(f"  k={k} ({25 // k:>2} Hz LLM): {positions:6.0f} LLM positions/sample  step {t:7.2f} s wall, "
              f"{c:7.2f} s CPU  {batch.n_speech_targets / t:7.1f} speech tokens/s trained (wall), "
              f"{batch.n_speech_targets / c:7.1f} (CPU)")
    for name, d in (("wall", times), ("CPU", cpu)):
        print(f"  step time k=1 / k=5 ({name}) = {statistics.median(d[1]) / statistics.median(d[5]):.2f}")


if __name__ == "__main__":
    main()
