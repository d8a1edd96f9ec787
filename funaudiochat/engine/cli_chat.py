"""`funaudiochat chat`: a multi-turn conversation in the terminal.

Type a message, or `/audio PATH [text]` to speak a wav file; `/reset` clears the history, `/quit` leaves.
Answers stream as text; with --detokenizer each spoken answer is written to OUT/turnN.wav.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from funaudiochat.engine.events import TextDelta, TurnEnd
from funaudiochat.engine.loading import add_runtime_arguments, add_sampling_arguments, load_runtime, sampling_overrides
from funaudiochat.engine.presets import default_system, generation_preset
from funaudiochat.engine.session import ChatSession
from funaudiochat.errors import FunAudioChatError
from funaudiochat.text.chat import SYSTEM_PRESETS


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_runtime_arguments(p)
    p.add_argument("--mode", default="s2s", choices=["s2s", "s2t"])
    p.add_argument("--system", default=None, help=f"system prompt or preset: {', '.join(SYSTEM_PRESETS)}")
    p.add_argument("--max-turns", type=int, default=8, help="user turns kept in the history (released: 8)")
    p.add_argument("--out", type=Path, default=Path("chat"), help="folder for spoken answers")
    add_sampling_arguments(p)


def main(args: argparse.Namespace) -> int:
    from funaudiochat.audio.io import load_audio, save_wav

    if args.threads:
        torch.set_num_threads(args.threads)
    rt = load_runtime(args.model, args.dtype, args.device, speech=args.mode == "s2s", detokenizer_dir=args.detokenizer,
                      speaker=args.speaker, max_seq_len=args.max_seq_len, compile=args.compile)
    gen = generation_preset(args.mode, rt.tokenizer, **sampling_overrides(args))
    system = SYSTEM_PRESETS.get(args.system, args.system) if args.system else default_system(args.mode)
    session = ChatSession(rt.engine, rt.tokenizer, gen, system, args.max_turns, rt.detokenizer)
    turn = 0
    print("chat ready: type a message, /audio PATH [text], /reset or /quit", file=sys.stderr)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            session.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        audio, text = None, line
        try:
            if line.startswith("/audio "):
                parts = line.split(maxsplit=2)
                audio = load_audio(parts[1])
                text = parts[2] if len(parts) > 2 else None
            turn += 1
            print("assistant: ", end="", flush=True)
            for event in session.ask(audio, text):
                if isinstance(event, TextDelta):
                    print(event.text, end="", flush=True)
                elif isinstance(event, TurnEnd):
                    print(flush=True)
                    if event.audio is not None:
                        args.out.mkdir(parents=True, exist_ok=True)
                        save_wav(args.out / f"turn{turn}.wav", event.audio, rt.detokenizer.sample_rate)
                        print(f"(spoken answer: {args.out}/turn{turn}.wav)", file=sys.stderr)
        except FunAudioChatError as err:  # one bad turn must not end the conversation
            print(f"\nerror: {err}", file=sys.stderr)
    return 0
