"""`funaudiochat infer`: answer one spoken (and/or typed) question.

    funaudiochat infer --model DIR --audio question.wav [--text "..."] [--mode s2s|s2t] [--task asr]
                       [--tools tools.json] [--detokenizer COSYVOICE_DIR] [--out answer/]

Prints the text as it is generated; writes OUT/answer.txt, OUT/speech_tokens.json (speech codes), OUT/answer.wav
(with --detokenizer; without it a note says that no wav is made) and OUT/tool_calls.json (with --tools).

Every input (flags, --device, --text, audio files, --tools, --out) is checked before the model loads, so a mistake
costs no generation and a finished answer is never lost to an unwritable --out. A checkpoint whose config.json marks
its audio adapter as never trained (`trained.hearing: false`, as `assets smollm2` writes) refuses --audio; one whose
speech head was never trained answers S2S requests in text only, with a warning (--allow-untrained overrides both).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from funaudiochat import fileio
from funaudiochat.engine.events import TextDelta, TurnEnd, stream_turn
from funaudiochat.engine.inputs import check_trained, typed_text, user_audio, user_text
from funaudiochat.engine.loading import (add_runtime_arguments, add_sampling_arguments, check_runtime_arguments,
                                         load_runtime, read_config, sampling_overrides)
from funaudiochat.engine.presets import default_system, generation_preset
from funaudiochat.engine.prompt import build_prompt
from funaudiochat.errors import ContextLengthError, FunAudioChatError, InputError, StorageError
from funaudiochat.text.chat import ASR_INSTRUCTION, SYSTEM_PRESETS, user_content
from funaudiochat.text.tokenizer import TextTokenizer
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


def check_out_dir(out: Path, names: list[str], flag: str = "--out") -> None:
    """Make sure `out` is (or can become) a writable folder where `names` can be written, before any work."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{flag} {out}: exists and is not a folder; name a new or existing folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{flag} {out}: cannot create the folder ({err.strerror or err})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {out}: the folder is not writable")
    for name in names:
        if (out / name).is_dir():
            raise InputError(f"{flag} {out}: {out / name} is a folder, where the answer file would go; remove it or "
                             f"name another {flag}")


def main(args: argparse.Namespace) -> int:
    # everything the user gave is checked before the model is loaded
    device = check_runtime_arguments(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    text = user_text(args.text, "--text") if args.text is not None else None
    if not args.audio and not text:
        raise InputError("give --audio and/or --text")
    if args.task == "asr" and not args.audio:
        raise InputError("--task asr transcribes audio: give --audio")
    overrides = sampling_overrides(args)
    cfg = read_config(args.model)
    tokenizer = TextTokenizer.from_file(args.model)
    if text is not None:
        text = typed_text(tokenizer, text, "--text")
    audios = [user_audio(a) for a in args.audio]
    mode = args.mode or ("s2t" if args.task == "asr" or args.tools else "s2s")
    if not check_trained(cfg, bool(audios), mode == "s2s", args.allow_untrained):
        mode = "s2t"
    text = ASR_INSTRUCTION if args.task == "asr" and not text else text
    system = SYSTEM_PRESETS.get(args.system, args.system) if args.system else default_system(mode, cfg)
    system = user_text(system, "--system")
    if args.tools:
        try:
            tools = json.loads(args.tools.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"{args.tools}: cannot read tools JSON ({err})") from err
        system = tools_system_prompt(tools)
    gen = generation_preset(mode, tokenizer, cfg, **overrides)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user_content(len(audios), text)}]
    prompt = build_prompt(tokenizer, cfg, messages, audios)
    context = min(args.max_seq_len, cfg.text_config.max_position_embeddings)  # as the Engine bounds it
    if prompt.input_ids.shape[1] + gen.max_new_tokens > context:
        raise ContextLengthError(f"the prompt is {prompt.input_ids.shape[1]} tokens; with --max-new-tokens "
                                 f"{gen.max_new_tokens} that exceeds the context of {context} tokens (--max-seq-len); "
                                 f"send shorter audio or text, or lower --max-new-tokens")
    outputs = ["answer.txt"] + (["speech_tokens.json", "answer.wav"] if mode == "s2s" else []) + \
        (["tool_calls.json"] if args.tools else [])
    check_out_dir(args.out, outputs)
    if mode == "s2s" and args.detokenizer is None:
        print(f"note: no --detokenizer: the speech answer is written as codes to {args.out}/speech_tokens.json and no "
              f"wav is made (give --detokenizer COSYVOICE_DIR for {args.out}/answer.wav)", file=sys.stderr)

    rt = load_runtime(args.model, args.dtype, device, speech=mode == "s2s", detokenizer_dir=args.detokenizer,
                      speaker=args.speaker, max_seq_len=args.max_seq_len, compile=args.compile, tokenizer=tokenizer,
                      decode_weights=args.decode_weights)
    detok = rt.detokenizer.stream() if rt.detokenizer is not None and mode == "s2s" else None

    end = None
    for event in stream_turn(rt.engine, prompt, gen, rt.tokenizer, detok):
        if isinstance(event, TextDelta):
            print(event.text, end="", flush=True)
        elif isinstance(event, TurnEnd):
            end = event
    print(flush=True)
    try:
        _write_outputs(args, mode, end, rt)
    except FunAudioChatError as err:  # the answer itself is on stdout already: say so
        raise StorageError(f"{err} (the answer text is printed above)") from err
    except OSError as err:
        raise StorageError(f"cannot write to {args.out}: {err.strerror or err} (the answer text is printed above)") \
            from err
    u = end.usage
    print(f"[{end.finish_reason}] prompt {u.prompt_tokens} tokens, {u.text_tokens} text + {u.speech_tokens} speech "
          f"tokens, prefill {u.prefill_s * 1e3:.0f} ms, total {u.total_s:.2f} s; wrote {args.out}/", file=sys.stderr)
    return 0


def _write_outputs(args: argparse.Namespace, mode: str, end: TurnEnd, rt) -> None:
    from funaudiochat.audio.io import save_wav

    out = args.out
    fileio.write_text(out / "answer.txt", end.text + "\n")
    if mode == "s2s":
        fileio.write_text(out / "speech_tokens.json", json.dumps(list(end.speech_codes)) + "\n")
        if end.audio is not None:
            with fileio.atomic_path(out / "answer.wav") as tmp:
                save_wav(tmp, end.audio, rt.detokenizer.sample_rate)
    if args.tools:
        parsed = parse_tool_calls(end.text)
        calls = [{"name": c.name, "arguments": c.arguments} for c in parsed.calls]
        report = {"calls": calls, "errors": parsed.errors}
        fileio.write_text(out / "tool_calls.json", json.dumps(report, indent=2) + "\n")
        for c in calls:
            print("tool call:", json.dumps(c, ensure_ascii=False))
        for e in parsed.errors:
            print("malformed tool call:", e, file=sys.stderr)
