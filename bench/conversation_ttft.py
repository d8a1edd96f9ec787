"""Time to first text token on turns 1..N of a spoken conversation, with and without conversation KV reuse.

    .venv/bin/python bench/conversation_ttft.py checkpoints/mini-base [--turns 5] [--seconds 20] [--rounds 3]
        [--threads 2] [--mode s2t|s2s] [--max-new-tokens 48]

Each turn asks a ~`--seconds` spoken question (espeak-ng speech, a different question each turn, cut or padded)
in one `ChatSession` (greedy, the mode's system prompt; `allow_untrained`: timing only), timed from `ask()` (the
end of speech) to its first TextDelta. Two sessions take turns, turn by turn, in every round: one keeps its keys
and values between turns (`reuse_cache=True`, the default), the other prefills the whole history every turn
(`reuse_cache=False`, as before issue 15). Both are given the same audio; printed per turn: median (fastest) first
text token in wall-clock and in this process's CPU seconds (all threads; steadier than wall-clock on a shared,
loaded machine), prompt tokens and the tokens copied from the cache, and whether both sessions answered alike. One
uncounted turn per variant warms up first.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from funaudiochat.data.synth import Utterance, synthesize
from funaudiochat.engine.events import TextDelta, TurnEnd
from funaudiochat.engine.loading import load_runtime
from funaudiochat.engine.presets import default_system, generation_preset
from funaudiochat.engine.session import ChatSession

from machine import machine_line  # bench/machine.py: CPU model and SIMD flags

QUESTIONS = [
    "Hello there. I would like to know what the weather will be like in Paris tomorrow afternoon, because I am "
    "planning a long walk along the river with my two children and my grandmother, and she does not like the rain.",
    "Thank you. Could you also tell me which museums near the river are open on Sunday mornings, and whether the "
    "children can get in for free, since the youngest one is only six years old and very curious about painting?",
    "That sounds good. What would be a nice place for lunch around there, somewhere quiet with a terrace and simple "
    "food, not too expensive, where my grandmother could sit comfortably for an hour or two after the walk?",
    "Perfect. And how should we get back to our hotel in the evening if the children are tired, would a taxi be "
    "better than the metro, and roughly how long would each of them take from the old town at about seven?",
    "One last thing. Can you summarise the whole plan for the day in a few short steps, so that I can read it out "
    "loud to my family at breakfast tomorrow and everybody knows when and where we are going to meet?",
]


def spoken(text: str, seconds: float, name: str) -> np.ndarray:
    wav = synthesize(Utterance(name, text, voice="espeak:en-us"), 16000)
    n = int(seconds * 16000)
    return np.pad(wav[:n], (0, max(0, n - len(wav)))).astype(np.float32)


def turn(session: ChatSession, audio: np.ndarray) -> tuple[tuple | None, TurnEnd]:
    """(wall, CPU) seconds from ask() to the first TextDelta (None if the answer had no text), and the turn's end."""
    start, cpu = time.perf_counter(), time.process_time()
    first = None
    end = None
    for event in session.ask(audio=audio):
        if first is None and isinstance(event, TextDelta):
            first = time.perf_counter() - start, time.process_time() - cpu
        if isinstance(event, TurnEnd):
            end = event
    return first, end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", choices=("s2t", "s2s"), default="s2t")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line())
    rt = load_runtime(args.model, speech=args.mode == "s2s")
    gen = generation_preset(args.mode, rt.tokenizer, max_new_tokens=args.max_new_tokens, do_sample=False)
    system = default_system(args.mode)
    audios = [spoken(QUESTIONS[i % len(QUESTIONS)], args.seconds, f"bench-turn-{i}") for i in range(args.turns)]
    variants = {"reuse": True, "whole history": False}
    times = {name: [[] for _ in range(args.turns)] for name in variants}
    usage = {name: [None] * args.turns for name in variants}
    alike = [0] * args.turns
    for reuse in variants.values():  # warm-up
        turn(ChatSession(rt.engine, rt.tokenizer, gen, system, allow_untrained=True, reuse_cache=reuse), audios[0])
    for r in range(args.rounds):
        sessions = {name: ChatSession(rt.engine, rt.tokenizer, gen, system, max_turns=8, allow_untrained=True,
                                      reuse_cache=reuse) for name, reuse in variants.items()}
        for t, audio in enumerate(audios):
            ends = {}
            for name, session in sessions.items():
                first, ends[name] = turn(session, audio)
                if first is not None:
                    times[name][t].append(first)
                usage[name][t] = ends[name].usage
            alike[t] += ends["reuse"].text_ids == ends["whole history"].text_ids
    print_turns(times, usage, alike, ("reuse", "whole history"), args, "ask()")


def print_turns(times: dict, usage: dict, alike: list, names: tuple[str, str], args, what: str) -> None:
    """The per-turn table: median (fastest) wall-clock ms and median CPU s to the first text token for both
    variants (names[0] is the one whose usage is shown), then turn N / turn 1 for each."""
    turns = len(alike)
    print(f"{turns} turns of a {args.seconds:g} s spoken question, {args.mode.upper()}, greedy, "
          f"max_new_tokens {args.max_new_tokens}, {args.threads} threads, {args.rounds} rounds (turns interleaved): "
          f"{what} -> first text token, median (fastest) wall-clock ms | median CPU s")
    print(f"  {'turn':>4}  {names[0]:>28}  {names[1]:>28}  prompt  cached  same answer")
    for t in range(turns):
        cells = []
        for x in (times[names[0]][t], times[names[1]][t]):
            wall, cpu = [w for w, _ in x], [c for _, c in x]
            cells.append(f"{1e3 * statistics.median(wall):8.0f} ({1e3 * min(wall):6.0f}) | {statistics.median(cpu):5.2f}"
                         if x else f"{'no text':>28}")
        u = usage[names[0]][t]
        print(f"  {t + 1:>4}  {cells[0]}  {cells[1]}  {u.prompt_tokens:>6}  {u.cached_tokens:>6}  "
              f"{alike[t]}/{args.rounds}")
    for name in names:
        first, last = times[name][0], times[name][-1]
        if first and last:
            ratios = [statistics.median(v[i] for v in last) / statistics.median(v[i] for v in first) for i in (0, 1)]
            print(f"  {name}: turn {turns} / turn 1 = {ratios[0]:.2f} wall-clock, {ratios[1]:.2f} CPU (medians)")


if __name__ == "__main__":
    main()
