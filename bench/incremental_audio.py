"""End of a spoken question -> first text token, with its audio encoded after the end or while it is spoken.

    .venv/bin/python bench/incremental_audio.py checkpoints/mini-base|checkpoints/mini [--seconds 10] [--rounds 7]
        [--threads 2] [--dtype bf16]

One process, the variants taking turns round by round; each run is a new ChatSession's first turn (S2T, greedy,
the s2t system prompt, whose keys and values the warm-up round stored on the engine, as a running server has them),
timed from `ask()` (the end of speech) to its first TextDelta:
  - whole clip, the model's own window (mini-base: n_window 1500, 30 s attention): encoded after the end;
  - whole clip, 2 s window (n_window 100, the released chunking): the same weights;
  - incremental, 2 s window: `session.start_audio(prefill=False)` fed the clip in 100 ms pieces before `ask()` (that
    work is not timed: the user is still speaking; its cost per second of audio is reported beside);
  - incremental + prefill ahead, 2 s window: `session.start_audio()`, whose complete chunks' LLM positions are
    prefilled while the clip is fed too (engine/prefill_ahead.py).
Also printed: the largest difference of the incremental vectors from the whole clip's, exact (the floor handled)
and with no re-encoding after the running maximum rises (tolerance = inf), relative to the largest vector value.
The question is espeak-ng speech cut or padded to --seconds.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from funaudiochat.data.synth import Utterance, synthesize
from funaudiochat.engine.events import TextDelta
from funaudiochat.engine.incremental_audio import IncrementalAudio
from funaudiochat.engine.loading import load_runtime
from funaudiochat.engine.presets import default_system, generation_preset
from funaudiochat.engine.prompt import build_prompt
from funaudiochat.engine.session import ChatSession
from funaudiochat.text.chat import user_content

from machine import machine_line  # bench/machine.py: CPU model and SIMD flags

QUESTION = ("Hello there. I would like to know what the weather will be like in Paris tomorrow afternoon, because "
            "I am planning a long walk along the river with my two children and my grandmother.")
PIECE = 1600  # samples fed at a time: 100 ms


def spoken_question(seconds: float) -> np.ndarray:
    wav = synthesize(Utterance("bench-question", QUESTION, voice="espeak:en-us"), 16000)
    n = int(seconds * 16000)
    return np.pad(wav[:n], (0, max(0, n - len(wav))))


def set_window(model, n_window: int) -> None:
    """The encoder's attention window in place: chunks of 2 * n_window mel frames (same weights)."""
    model.cfg.audio_config.n_window = n_window
    model.continuous_audio_tower.chunk = 2 * n_window


def first_token_seconds(rt, gen, system, wav, kind: str, finish: bool = False) -> tuple[float, float, float]:
    """(wall, CPU) seconds from ask() to the first TextDelta of a new session's first turn, and the CPU seconds of
    feeding the audio before (kind "whole": none; "encoded" / "prefilled": an IncrementalAudio without / with
    prefill ahead). `finish`: run the turn to its end (a completed first turn stores the system prompt's keys and
    values for the sessions after it)."""
    session = ChatSession(rt.engine, rt.tokenizer, gen, system, allow_untrained=True)
    audio, fed_cpu = wav, 0.0
    if kind != "whole":
        audio = session.start_audio(prefill=kind == "prefilled")
        start_cpu = time.process_time()
        for pos in range(0, len(wav), PIECE):
            audio.add(wav[pos:pos + PIECE])
        fed_cpu = time.process_time() - start_cpu
    start, start_cpu = time.perf_counter(), time.process_time()
    stream = session.ask(audio=audio)
    for event in stream:
        if isinstance(event, TextDelta) and not finish:
            break
    elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    stream.close()
    return elapsed, cpu, fed_cpu


def fed(rt, wav) -> tuple[IncrementalAudio, float]:
    """An IncrementalAudio fed the clip piece by piece, and the seconds its add() calls took."""
    inc = IncrementalAudio(rt.engine.model)
    start = time.process_time()
    for pos in range(0, len(wav), PIECE):
        inc.add(wav[pos:pos + PIECE])
    return inc, time.process_time() - start


def vector_errors(rt, wav) -> tuple[float, float]:
    """Largest |incremental - whole| / largest |whole|, exact and without recompute (tolerance inf)."""
    model, cfg = rt.engine.model, rt.engine.model.cfg
    p = build_prompt(rt.tokenizer, cfg, [{"role": "user", "content": user_content(1, None)}], [wav])
    with torch.no_grad():
        whole = model.encode_audio(p.speech_ids, p.speech_attention_mask, p.input_features,
                                   p.feature_attention_mask, p.feature_exist_mask)
    want = whole.features[0, : int(whole.n_groups[0])]
    errors = []
    for tolerance in (0.0, float("inf")):
        inc = IncrementalAudio(model, tolerance)
        for pos in range(0, len(wav), PIECE):
            inc.add(wav[pos:pos + PIECE])
        _, got = inc.finish()
        errors.append(float((got - want).abs().max() / want.abs().max()))
    return errors[0], errors[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--dtype", choices=("fp32", "bf16", "int8"), default=None,
                        help="cast the weights (default: as stored); int8: quantized linears, bf16 prompt passes "
                             "where native")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line())
    rt = load_runtime(args.model, dtype=args.dtype, speech=False)
    gen = generation_preset("s2t", rt.tokenizer, max_new_tokens=args.max_new_tokens)
    system = default_system("s2t")
    wav = spoken_question(args.seconds)
    own_window = rt.engine.model.cfg.audio_config.n_window
    variants = {f"whole clip, n_window {own_window}": (own_window, "whole")}
    # a word reader (the shipped mini) reads windows of 10 s inside one attention chunk: no 2 s chunking for it
    chunked = rt.engine.model.word_reader is None
    if chunked:
        variants.update({"whole clip, n_window 100 (2 s)": (100, "whole"),
                         "incremental, n_window 100 (2 s)": (100, "encoded"),
                         "incremental + prefill ahead, 2 s": (100, "prefilled")})
    else:
        print("a word reader reads 10 s windows within one attention chunk: only its own window is timed")
    times, cpu = {name: [] for name in variants}, {name: [] for name in variants}
    feed_seconds = {name: [] for name in variants}
    finish_seconds = []
    for i in range(args.rounds + 1):  # round 0 warms up
        for name, (n_window, kind) in variants.items():
            set_window(rt.engine.model, n_window)
            elapsed, used, fed_cpu = first_token_seconds(rt, gen, system, wav, kind, finish=i == 0)
            if i:
                times[name].append(elapsed)
                cpu[name].append(used)
                feed_seconds[name].append(fed_cpu)
                if kind == "encoded":
                    alone, _ = fed(rt, wav)  # the end-of-speech encoding alone (last chunk + adapter)
                    start = time.process_time()
                    alone.finish()
                    finish_seconds.append(time.process_time() - start)
    print(f"{args.seconds:g} s question, {args.threads} threads, S2T, {args.rounds} interleaved rounds: end of speech "
          f"-> first text token, median (fastest); median CPU time of the process (all threads)")
    for name, t in times.items():
        print(f"  {name:<34} {1e3 * statistics.median(t):8.1f} ms ({1e3 * min(t):.1f}); CPU "
              f"{1e3 * statistics.median(cpu[name]):.1f} ms")
    for name, (_, kind) in variants.items():
        if kind != "whole":
            print(f"  {name}: add() {1e3 * statistics.median(feed_seconds[name]) / args.seconds:.1f} ms CPU per second "
                  f"of audio while it is spoken (median)")
    if not chunked:
        return
    print(f"  finish() alone (last chunk + adapter): {1e3 * statistics.median(finish_seconds):.1f} ms CPU (median)")
    set_window(rt.engine.model, 100)
    exact, loose = vector_errors(rt, wav)
    print(f"  vectors vs whole clip (relative max): exact {exact:.1e}, without re-encoding after the maximum rose "
          f"{loose:.1e}")


if __name__ == "__main__":
    main()
