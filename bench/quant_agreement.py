"""Greedy token agreement of int8 / bf16 decoding with fp32: the goldens' prompts and mini questions.

    .venv/bin/python bench/quant_agreement.py [--golden ../shared/golden/tiny-dense] [--mini checkpoints/mini-base]
        [--questions 50] [--max-new-tokens 32] [--threads 2] [--dtypes int8 bf16] [--no-golden]
        [--prompt-products auto|bf16|fp32]

For each prompt, fp32 and the other dtype decode greedily (eager engine, text and, where the model speaks, speech
tokens). Reported per dtype: prompts whose tokens are all equal, and the share of tokens before the first
difference (a greedy run that diverges once continues on another path, so later tokens are not comparable). The mini
questions are N single-turn test questions of `funaudiochat/data/mini_questions.py`, taken round robin over its
question families, asked in text (S2T
preset, its system prompt), decoded as left-padded batches (exact: rows equal single runs, tests/test_engine.py).
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from funaudiochat.check.generation import generation_config
from funaudiochat.engine.generate import Engine
from funaudiochat.engine.presets import default_system, generation_preset
from funaudiochat.engine.prompt import Prompt, build_prompt, stack_prompts
from funaudiochat.model.checkpoint import load_model
from funaudiochat.model.quantize import PROMPT_PRODUCTS, quantize_model, set_prompt_products
from funaudiochat.text.tokenizer import TextTokenizer

from machine import machine_line  # bench/machine.py

DTYPES = ["int8", "bf16"]


def variants(model):
    """fp32 model -> {dtype: model} (deep copies; the fp32 one is the reference)."""
    make = {"int8": lambda m: quantize_model(copy.deepcopy(m)), "bf16": lambda m: copy.deepcopy(m).bfloat16()}
    return {"fp32": model, **{d: make[d](model) for d in DTYPES}}


def prefix_agreement(ref: list[int], other: list[int]) -> int:
    """Tokens equal before the first difference."""
    n = 0
    for a, b in zip(ref, other):
        if a != b:
            break
        n += 1
    return n


class Tally:
    def __init__(self):
        self.prompts = self.equal = self.tokens = self.before_diff = 0

    def add(self, ref: list[int], other: list[int]) -> None:
        self.prompts += 1
        self.equal += ref == other
        self.tokens += len(ref)
        self.before_diff += prefix_agreement(ref, other) if ref != other else len(ref)

    def line(self) -> str:
        return (f"{self.equal}/{self.prompts} prompts identical, "
                f"{self.before_diff}/{self.tokens} tokens ({100 * self.before_diff / max(self.tokens, 1):.1f}%) "
                f"before the first difference")


def golden_agreement(golden: Path) -> dict:
    records = json.loads((golden / "golden.json").read_text())
    models = variants(load_model(golden / "model", dtype="fp32"))
    engines = {name: Engine(m) for name, m in models.items()}
    tallies = {(d, kind): Tally() for d in DTYPES for kind in ("text", "speech")}
    for case in ("gen", "gen_rep", "gen_s2t", "gen_single_b"):
        prompt = Prompt.from_tensors(load_file(str(golden / case / "inputs.safetensors")))
        gen = generation_config(records, case)
        outs = {name: e.generate(prompt, gen) for name, e in engines.items()}
        for d in DTYPES:
            tallies[d, "text"].add(outs["fp32"].new_text_ids[0].tolist(), outs[d].new_text_ids[0].tolist())
            if outs["fp32"].speech_ids[0]:
                tallies[d, "speech"].add(outs["fp32"].speech_ids[0], outs[d].speech_ids[0])
    return tallies


def mini_agreement(ckpt: Path, n: int, max_new_tokens: int, batch: int = 25) -> dict:
    from funaudiochat.data.mini_questions import generate

    tok = TextTokenizer.from_file(ckpt)
    models = variants(load_model(ckpt, dtype="fp32", speech_head=False))
    cfg = models["fp32"].cfg
    by_family: dict[str, list] = {}
    for q in generate():
        if q.split == "test" and len(q.turns) == 1:
            by_family.setdefault(q.family, []).append(q)
    # round robin over the families (facts, arithmetic, definitions, how-to, ...), in each its first questions
    questions = [q for rank in zip(*by_family.values()) for q in rank][:n]
    prompts = [build_prompt(tok, cfg, [{"role": "system", "content": default_system("s2t")},
                                       {"role": "user", "content": q.turns[0]}], []) for q in questions]
    gen = generation_preset("s2t", tok, max_new_tokens=max_new_tokens)
    pad = gen.pad_token_id
    answers = {name: [] for name in models}
    for name, m in models.items():
        engine = Engine(m)
        for i in range(0, len(prompts), batch):
            out = engine.generate(stack_prompts(prompts[i:i + batch], pad, cfg.audio_config.pad_token_id), gen)
            for row in out.new_text_ids.tolist():  # cut at the first end of turn (later ids are padding)
                ends = [j for j, t in enumerate(row) if t in gen.eos_ids]
                answers[name].append(row[: ends[0] + 1] if ends else row)
    tallies = {d: Tally() for d in DTYPES}
    for d in DTYPES:
        for ref, other in zip(answers["fp32"], answers[d]):
            tallies[d].add(ref, other)
    example = tok.decode(answers[DTYPES[0]][0]), tok.decode(answers["fp32"][0])
    return tallies, len(prompts), example


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--golden", type=Path, default=Path("../shared/golden/tiny-dense"))
    ap.add_argument("--mini", type=Path, default=Path("checkpoints/mini-base"))
    ap.add_argument("--questions", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=DTYPES, choices=DTYPES)
    ap.add_argument("--no-golden", action="store_true")
    ap.add_argument("--prompt-products", default="auto", choices=PROMPT_PRODUCTS,
                    help="how int8 prefills multiply (model/quantize.py: auto = bf16 where the CPU computes it "
                         "natively)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    set_prompt_products(args.prompt_products)
    DTYPES[:] = args.dtypes
    print(machine_line())
    if args.golden.is_dir() and not args.no_golden:
        tallies = golden_agreement(args.golden)
        for (d, kind), t in tallies.items():
            print(f"goldens ({args.golden.name}: gen, gen_rep, gen_s2t, gen_single_b), {d} vs fp32, {kind}: "
                  + t.line())
    if args.mini.is_dir():
        tallies, n, (int8_text, fp32_text) = mini_agreement(args.mini, args.questions, args.max_new_tokens)
        for d, t in tallies.items():
            print(f"mini ({args.mini.name}, {n} test questions, S2T greedy, <= {args.max_new_tokens} tokens), "
                  f"{d} vs fp32, text: " + t.line(), flush=True)
        print(f"first question, fp32: {fp32_text!r}\n                {DTYPES[0]}: {int8_text!r}")


if __name__ == "__main__":
    main()
