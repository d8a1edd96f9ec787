"""The `funaudiochat` command. Each sub-command lives in its own module, imported only when used.

Commands are one or two words (`infer`, `data synth`).

A sub-command module defines `add_arguments(parser)` and `main(args) -> int`.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
from pathlib import Path

from funaudiochat import fileio
from funaudiochat.errors import FunAudioChatError

# name -> (module, one-line help). Keep sorted by topic, not alphabet.
COMMANDS: dict[str, tuple[str, str]] = {
    "infer": ("funaudiochat.engine.cli_infer", "answer one spoken (or typed) question: text, speech tokens, wav"),
    "chat": ("funaudiochat.engine.cli_chat", "multi-turn voice/text chat in the terminal"),
    "serve": ("funaudiochat.serve.cli", "OpenAI-compatible speech server: many sessions batched on one engine"),
    "check-reference": ("funaudiochat.check.cli", "replay a golden reference directory and compare outputs"),
    "data synth": ("funaudiochat.data.cli_synth", "synthesise text lines / a JSONL of utterances to wav + manifest"),
    "eval asr": ("funaudiochat.eval.cli_asr", "transcribe a manifest's wavs with Whisper tiny.en and report WER/CER"),
    "eval speechfc": ("funaudiochat.eval.cli_speechfc", "score SpeechFCEval tool-call predictions (BFCL / ACEBench)"),
    "eval mini": ("funaudiochat.eval.cli_mini", "fun-audio-chat-mini's must-show figures: WER, spoken QA, latency"),
    "eval mini-speech": ("funaudiochat.eval.cli_mini_speech", "fun-audio-chat-mini's speaking figures: WER, ends, rate"),
    "eval voicebench": ("funaudiochat.eval.cli_voicebench", "score VoiceBench predictions (rules, or an LLM judge)"),
    "eval mcq": ("funaudiochat.eval.cli_mcq", "score MMAU / MMSU multiple-choice predictions (official rules)"),
    "eval run": ("funaudiochat.eval.cli_run", "answer, score and report evaluation suites (local or OpenAI model)"),
    "eval merge": ("funaudiochat.eval.cli_merge", "join the shards of a sharded `eval run`, score and report"),
    "assets qwen-vocab": ("funaudiochat.assets.cli_qwen_vocab", "Qwen3 vocabulary + audio specials -> tokenizer.json"),
    "assets whisper": ("funaudiochat.assets.cli_whisper", "Whisper tiny.en encoder (CTranslate2) -> our encoder"),
    "assets smollm2": ("funaudiochat.assets.cli_smollm2", "SmolLM2 + Whisper tiny.en -> fun-audio-chat-mini start"),
    "assets mini-deltas": ("funaudiochat.assets.cli_mini_deltas", "a trained mini checkpoint -> models/mini deltas"),
    "assets mini": ("funaudiochat.assets.cli_mini", "fun-audio-chat-mini: pip-shipped parts + models/mini deltas"),
    "assets quantize": ("funaudiochat.assets.cli_quantize", "a checkpoint -> weight-only int8 checkpoint (CPU)"),
    "data distill": ("funaudiochat.data.cli_distill", "answer prompts with SmolLM2 (text mode) -> filtered Q/A JSONL"),
    "data build-mini": ("funaudiochat.data.cli_build_mini", "fun-audio-chat-mini's data: questions, answers, voices"),
    "data prepare": ("funaudiochat.train.cli_data_prepare", "validate a training JSONL, tokenize assistant speech"),
    "train": ("funaudiochat.train.cli_train", "run a training stage from a recipe (one process or torchrun)"),
    "merge": ("funaudiochat.train.cli_merge", "Core-Cocktail merge: alpha*stage1 + (1-alpha)*base over the LLM"),
    "plot": ("funaudiochat.train.cli_plot", "plot the loss curves of a training run to a PNG"),
}


def _top_parser() -> argparse.ArgumentParser:
    lines = [f"  {name:<18} {help_}" for name, (_, help_) in COMMANDS.items()]
    return argparse.ArgumentParser(
        prog="funaudiochat",
        description="Fun-Audio-Chat: speech in, text and speech out.",
        epilog="commands:\n" + "\n".join(lines) + "\n\nRun `funaudiochat COMMAND --help` for its options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="funaudiochat [-v] COMMAND [options]",
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = False
    while argv and argv[0] in ("-v", "--verbose"):
        verbose = True
        argv.pop(0)
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        return 0 if argv else 2
    # commands may be two words ("data synth"): the longer match wins
    two = " ".join(argv[:2])
    name, rest = (two, argv[2:]) if two in COMMANDS else (argv[0], argv[1:])
    if name not in COMMANDS:
        print(f"funaudiochat: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"funaudiochat {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    # INTERMIXED: options may come between repeated positionals (`train R --resume a=1 b=2`)
    args = parser.parse_intermixed_args(rest) if getattr(module, "INTERMIXED", False) else parser.parse_args(rest)
    try:
        return int(module.main(args) or 0)
    except FunAudioChatError as err:
        print(f"funaudiochat {name}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # a full disk under a writer that does not go through fileio: one line, not a traceback
        if err.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise
        where = fileio.no_space_message(Path(err.filename)) if err.filename else "no space left on the device"
        print(f"funaudiochat {name}: error: {where}; free some space and run it again", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
