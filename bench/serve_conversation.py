"""Time to first text token on turns 1..N of a spoken conversation served by the scheduler (the engine of
`funaudiochat serve`), with and without the server's conversation cache.

    .venv/bin/python bench/serve_conversation.py checkpoints/mini-base [--turns 5] [--seconds 20] [--rounds 2]
        [--threads 1] [--mode s2s|s2t] [--max-new-tokens 24]

Each turn asks a ~`--seconds` spoken question (espeak-ng, bench/conversation_ttft.py's questions) in a conversation
kept as /v1/realtime keeps it (its items -> `conversation_messages`, the answer's text as the assistant turn) and
submitted with the conversation's key, as the realtime WebSocket does. Two schedulers on one engine take turns, turn
by turn: one keeps each conversation's last turn (`conversation_cache=True`, the server's default), the other
prefills the whole history every turn (`--no-conversation-cache`). Greedy (text and speech), no detokenizer (the
first text token is timed). Timed: `submit()` (the end of speech: the prompt is built, its audio's features made)
-> the first TextDelta, wall-clock and this process's CPU seconds. One uncounted turn per variant warms up first.
"""
from __future__ import annotations

import argparse
import asyncio
import time

import torch

from conversation_ttft import QUESTIONS, print_turns, spoken  # bench/conversation_ttft.py: same questions, table
from funaudiochat.engine.events import TextDelta, TurnEnd
from funaudiochat.engine.loading import load_runtime
from funaudiochat.serve.realtime_state import Item, conversation_messages, new_id
from funaudiochat.serve.scheduler import Request, Scheduler

from machine import machine_line  # bench/machine.py: CPU model and SIMD flags


async def ask(sched: Scheduler, items: list, mode: str, conversation: str, max_new: int):
    """One turn -> ((wall, CPU) s to the first TextDelta or None, TurnEnd)."""
    msgs, audios = conversation_messages(items, None)
    request = Request(msgs, audios, mode, generation=dict(max_new_tokens=max_new, do_sample=False),
                      audio_out=False, conversation=conversation)
    start, cpu = time.perf_counter(), time.process_time()
    first = end = None
    async for event in await sched.submit(request):
        if first is None and isinstance(event, TextDelta):
            first = time.perf_counter() - start, time.process_time() - cpu
        if isinstance(event, TurnEnd):
            end = event
    return first, end


async def run(args, rt, audios) -> None:
    variants = {"cache": True, "no cache": False}
    scheds = {name: Scheduler(rt.engine, rt.tokenizer, max_sessions=2, allow_untrained=True,
                              conversation_cache=on) for name, on in variants.items()}
    for sched in scheds.values():
        sched.start()
    times = {name: [[] for _ in audios] for name in variants}
    usage = {name: [None] * len(audios) for name in variants}
    alike = [0] * len(audios)
    try:
        for name, sched in scheds.items():  # warm-up
            await ask(sched, [Item(new_id("item"), "user", audio=audios[0])], args.mode, "warm-up", args.max_new_tokens)
        for r in range(args.rounds):
            items = {name: [] for name in variants}
            for t, audio in enumerate(audios):
                ends = {}
                for name, sched in scheds.items():
                    items[name].append(Item(new_id("item"), "user", audio=audio))
                    first, ends[name] = await ask(sched, items[name], args.mode, f"round-{r}", args.max_new_tokens)
                    items[name].append(Item(new_id("item"), "assistant", text=ends[name].text.strip()))
                    if first is not None:
                        times[name][t].append(first)
                    usage[name][t] = ends[name].usage
                alike[t] += ends["cache"].text_ids == ends["no cache"].text_ids
    finally:
        for sched in scheds.values():
            await sched.stop()
    print_turns(times, usage, alike, ("cache", "no cache"), args, "submit")

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", choices=("s2t", "s2s"), default="s2s")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line())
    rt = load_runtime(args.model, speech=args.mode == "s2s")
    audios = [spoken(QUESTIONS[i % len(QUESTIONS)], args.seconds, f"bench-turn-{i}") for i in range(args.turns)]
    asyncio.run(run(args, rt, audios))


if __name__ == "__main__":
    main()
