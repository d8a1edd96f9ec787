"""Forward + backward of one optimizer step of a real recipe (the mini's, on its data), by precision and by where the
text head runs: the levers of CPU training time, side by side on the same micro-batches, rounds interleaved.

  fp32, head everywhere   the step as it ran before 2026-12-01 (49k-vocab head over every position, SRH always run)
  fp32, head at targets   the text head only where a text target is, a frozen SRH skipped without speech targets
  bf16, head at targets   the same under bf16 autocast (parameters and optimizer state stay fp32; AMX where the CPU
                          has it)

It also reports how far each variant's gradient is from the first one's (cosine over all trainable parameters, in
float64: a float32 sum over millions of elements rounds a vector's cosine with itself to 1.0002).

    OMP_NUM_THREADS=2 .venv/bin/python bench/train_step_mini.py recipes/mini/core_cocktail_stage1.yaml --rounds 3
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from funaudiochat.train import loop
from funaudiochat.train.config import load_recipe

from machine import machine_line  # bench/machine.py: CPU model and SIMD flags

VARIANTS = {  # name -> (autocast bf16, text_logits, run the SRH without speech targets)
    "fp32, head everywhere": (False, "all", True),
    "fp32, head at targets": (False, "targets", False),
    "bf16, head at targets": (True, "targets", False),
}


def forward_backward(trainer: loop.Trainer, micro: list, bf16: bool, text_logits: str, srh_always: bool) -> float:
    model = trainer.model
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    for b in micro:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(**b.model_inputs("cpu"), text_logits=text_logits, speech=srh_always or trainer.runs_srh(b))
        out.loss.backward()
    return time.perf_counter() - t0


def gradient(trainer: loop.Trainer) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]).double()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="recipe fields to override, as section.key=value")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print(machine_line(), f"threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = loop.Trainer(load_recipe(args.recipe, [*args.overrides, f"run_dir={tmp}/run"]))
        trainer.setup()
        data = loop.StepData(trainer.items, trainer.plan, trainer.collate, trainer.info, trainer.accum, pairs=False)
        micro = data[0]
        tokens = sum(b.n_tokens for b in micro)
        targets = sum(b.n_text_targets for b in micro)
        print(f"{args.recipe}: {len(micro)} micro-batches, {tokens} tokens, {targets} text targets")
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        grads: dict[str, torch.Tensor] = {}
        for r in range(args.rounds + 1):  # round 0 warms up (allocator, oneDNN kernels) and is not counted
            for name, variant in (VARIANTS.items() if r % 2 else reversed(VARIANTS.items())):
                t = forward_backward(trainer, micro, *variant)
                if r:
                    times[name].append(t)
                grads.setdefault(name, gradient(trainer))
    base_name = next(iter(VARIANTS))
    base = statistics.median(times[base_name])
    print(f"\n| variant | forward + backward, s (median of {args.rounds}) | tokens/s | vs {base_name} "
          f"| gradient cosine vs {base_name} |\n|---|---|---|---|---|")
    for name, ts in times.items():
        t = statistics.median(ts)
        cos = torch.nn.functional.cosine_similarity(grads[name], grads[base_name], dim=0).item()
        print(f"| {name} | {t:.2f} ({min(ts):.2f}-{max(ts):.2f}) | {tokens / t:.0f} | {t / base:.2f}x | {cos:.5f} |")


if __name__ == "__main__":
    main()
