"""`funaudiochat infer`: answer one spoken (and/or typed) question.

    funaudiochat infer --model DIR --audio question.wav [--text "..."] [--mode s2s|s2t] [--task asr]
                       [--tools tools.json] [--detokenizer COSYVOICE_DIR] [--out answer/]

Prints the text as it is generated; writes OUT/answer.txt, OUT/speech_tokens.json (speech codes), OUT/answer.wav
(with --detokenizer) and OUT/tool_calls.json (with --tools).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from funaudiochat.engine.events import TextDelta, TurnEnd, stream_turn
from funaudiochat.engine.loading import add_runtime_arguments, add_sampling_arguments, load_runtime, sampling_overrides
from funaudiochat.engine.presets import default_system, generation_preset
from funaudiochat.engine.prompt import build_prompt
from funaudiochat.errors import InputError
from funaudiochat.text.chat import ASR_INSTRUCTION, SYSTEM_PRESETS, user_content
from funaudiochat.text.tools import parse_tool_calls, tools_system_prompt


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_runtime_arguments(p)
    p.add_argument("--audio", type=Path, action="append", default=[], help="user audio file (repeat for several)")
    p.add_argument("--text", default=None, help="typed question or instruction (after the audio)")
    p.add_argument("--mode", default=None, choices=["s2s", "s2t"], help="s2s: text + speech (default); s2t: text only")
    p.add_argument("--task", default=None, choices=["asr"], help="asr: transcribe the audio (S2T)")
    p.add_argument("--tools", type=Path, default=None, help="JSON list of OpenAI-style tool definitions")
    p.add_argument("--system", default=None,
                   help=f"system prompt text, or a preset name: {', '.join(SYSTEM_PRESETS)} (default: the mode's)")
    p.add_argument("--out", type=Path, default=Path("answer"), help="output folder (default: ./answer)")
    add_sampling_arguments(p)


def main(args: argparse.Namespace) -> int:
    from funaudiochat.audio.io import load_audio, save_wav

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.audio and not args.text:
        raise InputError("give --audio and/or --text")
    mode = args.mode or ("s2t" if args.task == "asr" or args.tools else "s2s")
    audios = [load_audio(a) for a in args.audio]
    text = ASR_INSTRUCTION if args.task == "asr" and not args.text else args.text
    system = SYSTEM_PRESETS.get(args.system, args.system) if args.system else default_system(mode)
    if args.tools:
        try:
            tools = json.loads(args.tools.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"{args.tools}: cannot read tools JSON ({err})") from err
        system = tools_system_prompt(tools)

    rt = load_runtime(args.model, args.dtype, args.device, speech=mode == "s2s", detokenizer_dir=args.detokenizer,
                      speaker=args.speaker, max_seq_len=args.max_seq_len, compile=args.compile)
    gen = generation_preset(mode, rt.tokenizer, **sampling_overrides(args))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user_content(len(audios), text)}]
    prompt = build_prompt(rt.tokenizer, rt.engine.cfg, messages, audios)
    detok = rt.detokenizer.stream() if rt.detokenizer is not None and mode == "s2s" else None

    end = None
    for event in stream_turn(rt.engine, prompt, gen, rt.tokenizer, detok):
        if isinstance(event, TextDelta):
            print(event.text, end="", flush=True)
        elif isinstance(event, TurnEnd):
            end = event
    print()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "answer.txt").write_text(end.text + "\n")
    if mode == "s2s":
        (args.out / "speech_tokens.json").write_text(json.dumps(list(end.speech_codes)) + "\n")
        if end.audio is not None:
            save_wav(args.out / "answer.wav", end.audio, rt.detokenizer.sample_rate)
    if args.tools:
        parsed = parse_tool_calls(end.text)
        calls = [{"name": c.name, "arguments": c.arguments} for c in parsed.calls]
        report = {"calls": calls, "errors": parsed.errors}
        (args.out / "tool_calls.json").write_text(json.dumps(report, indent=2) + "\n")
        for c in calls:
            print("tool call:", json.dumps(c, ensure_ascii=False))
        for e in parsed.errors:
            print("malformed tool call:", e, file=sys.stderr)
    u = end.usage
    print(f"[{end.finish_reason}] prompt {u.prompt_tokens} tokens, {u.text_tokens} text + {u.speech_tokens} speech "
          f"tokens, prefill {u.prefill_s * 1e3:.0f} ms, total {u.total_s:.2f} s; wrote {args.out}/", file=sys.stderr)
    return 0
