"""`funaudiochat chat`: a multi-turn conversation in the terminal.

Type a message, or a command: `/audio PATH [text]` speaks a wav file, `/reset` clears the history, `/help` lists
the commands, `/quit` leaves. Any other line starting with `/` is refused as an unknown command (start a message with
`//` to send a literal `/`). Answers stream as text; with --detokenizer each spoken answer is written to
OUT/turnN.wav.

Ctrl-C stops the answer being generated (the turn is dropped from the history); a second Ctrl-C within
`DOUBLE_INTERRUPT_S` seconds quits. A bad turn (missing file, bad audio, text that is not UTF-8) prints one error
line and the conversation goes on.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from funaudiochat import fileio
from funaudiochat.engine.cli_infer import check_out_dir
from funaudiochat.engine.events import TextDelta, TurnEnd
from funaudiochat.engine.inputs import check_trained, user_text
from funaudiochat.engine.loading import (add_runtime_arguments, add_sampling_arguments, check_runtime_arguments,
                                         load_runtime, read_config, sampling_overrides)
from funaudiochat.engine.presets import default_system, generation_preset
from funaudiochat.engine.session import ChatSession
from funaudiochat.errors import FunAudioChatError, InputError
from funaudiochat.text.chat import SYSTEM_PRESETS

COMMANDS = "/audio PATH [text], /reset, /help, /quit"
HELP = (f"commands: {COMMANDS}; any other line is sent as your message (start it with // to send a literal /); "
        "Ctrl-C stops an answer, twice quits")
DOUBLE_INTERRUPT_S = 2.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_runtime_arguments(p)
    p.add_argument("--mode", default="s2s", choices=["s2s", "s2t"])
    p.add_argument("--system", default=None, help=f"system prompt or preset: {', '.join(SYSTEM_PRESETS)}")
    p.add_argument("--max-turns", type=int, default=8,
                   help="most user turns kept in the history (released: 8); past it the oldest are dropped down to "
                        "half at once, so the cached history is prefilled again once per trim, not every turn")
    p.add_argument("--out", type=Path, default=Path("chat"), help="folder for spoken answers")
    add_sampling_arguments(p)


class Interrupts:
    """SIGINT handler: the first Ctrl-C stops the current answer (between answers it only says how to quit);
    a second one within DOUBLE_INTERRUPT_S seconds raises KeyboardInterrupt, which ends the program."""

    def __init__(self):
        self.cancel = threading.Event()
        self.answering = False
        self.last = float("-inf")

    def __call__(self, signum, frame) -> None:
        now = time.monotonic()
        if now - self.last < DOUBLE_INTERRUPT_S:
            raise KeyboardInterrupt
        self.last = now
        if self.answering:
            self.cancel.set()
        else:
            print(f"\n(Ctrl-C again within {DOUBLE_INTERRUPT_S:.0f} s to quit, or type /quit)", file=sys.stderr)


def parse_line(line: str) -> tuple[str, str | None, str | None]:
    """One input line -> (command, audio path, text); command is "say", "reset", "help" or "quit"."""
    if line.startswith("//"):
        return "say", None, line[1:]
    if not line.startswith("/"):
        return "say", None, line
    name, _, rest = line.partition(" ")
    if name in ("/quit", "/exit"):
        return "quit", None, None
    if name in ("/reset", "/help"):
        return name[1:], None, None
    if name == "/audio":
        parts = rest.split(maxsplit=1)
        if not parts:
            raise InputError("/audio needs a file: /audio PATH [text]")
        return "say", parts[0], parts[1] if len(parts) > 1 else None
    raise InputError(f"unknown command {name}; {HELP}")


def main(args: argparse.Namespace) -> int:
    from funaudiochat.audio.io import save_wav

    device = check_runtime_arguments(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_turns < 1:
        raise InputError(f"--max-turns must be >= 1, got {args.max_turns}")
    overrides = sampling_overrides(args)
    cfg = read_config(args.model)
    mode = args.mode if check_trained(cfg, False, args.mode == "s2s", args.allow_untrained) else "s2t"
    system = SYSTEM_PRESETS.get(args.system, args.system) if args.system else default_system(mode, cfg)
    system = user_text(system, "--system")
    if args.detokenizer is not None:
        check_out_dir(args.out, [])
    elif mode == "s2s":
        print("note: no --detokenizer: spoken answers are generated as speech codes only, no wav is written (give "
              "--detokenizer COSYVOICE_DIR for OUT/turnN.wav)", file=sys.stderr)
    rt = load_runtime(args.model, args.dtype, device, speech=mode == "s2s", detokenizer_dir=args.detokenizer,
                      speaker=args.speaker, max_seq_len=args.max_seq_len, compile=args.compile,
                      decode_weights=args.decode_weights)
    gen = generation_preset(mode, rt.tokenizer, cfg, **overrides)
    session = ChatSession(rt.engine, rt.tokenizer, gen, system, args.max_turns, rt.detokenizer,
                          allow_untrained=args.allow_untrained)
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 becomes one error, not a crash
        sys.stdin.reconfigure(errors="surrogateescape")
    interrupts = Interrupts()
    previous = signal.signal(signal.SIGINT, interrupts)
    try:
        _loop(session, interrupts, args.out, save_wav)
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0


def _loop(session: ChatSession, interrupts: Interrupts, out: Path, save_wav) -> None:
    turn = 0
    print(f"chat ready: type a message; {COMMANDS}", file=sys.stderr)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            command, audio, text = parse_line(user_text(line, "input"))
            if command == "quit":
                break
            if command == "reset":
                session.reset()
                print("(history cleared)", file=sys.stderr)
                continue
            if command == "help":
                print(HELP, file=sys.stderr)
                continue
            events = session.ask(audio, text, cancel=interrupts.cancel)  # refuses bad input before answering
            turn += 1
            interrupts.cancel.clear()
            interrupts.answering = True
            print("assistant: ", end="", flush=True)
            try:
                for event in events:
                    if isinstance(event, TextDelta):
                        print(event.text, end="", flush=True)
                    elif isinstance(event, TurnEnd):
                        print(flush=True)
                        if event.finish_reason == "cancelled":
                            print("(answer stopped; this turn is not kept in the history)", file=sys.stderr)
                        if event.audio is not None:
                            path = out / f"turn{turn}.wav"
                            with fileio.atomic_path(path) as tmp:
                                save_wav(tmp, event.audio, session.detokenizer.sample_rate)
                            print(f"(spoken answer: {path})", file=sys.stderr)
            finally:
                interrupts.answering = False
        except FunAudioChatError as err:  # one bad turn must not end the conversation
            print(f"error: {err}", file=sys.stderr)
