"""Compile a server's decode graphs before its traffic (`serve --compile`; docs/serve.md).

A compiled decode step is specialised on the shapes of its first call; the first call with another batch size or
cache length compiles one graph that takes them as symbols, and batches of one row keep graphs of their own
(engine/compiled.py). So each kind of request needs three graphs: one row on its first cache size, several rows, and
one row on another cache size. Each takes about a minute to compile for the mini on 2 cores (seconds to load from
the persistent caches), and every running session waits meanwhile: on machine F a one-row conversation whose cache
outgrew its first size stalled the whole server 7.4 s mid-traffic (BENCHMARKS.md, stop 44).

`warm_up` sends small synthetic requests of each kind through the scheduler in that order, so that real traffic finds
every graph compiled: one request alone (one row, the first cache size), two together whose prompts are longer than
a cache bucket (two rows, a longer cache: both sizes become symbols at once), and one of those alone (one row, a
longer cache). The speech kind synthesises its few codes too, which loads the detokenizer's sessions. The requests
go through the whole serving path and count in /metrics like any other.
"""
from __future__ import annotations

import asyncio
import logging
import time

from funaudiochat.engine.compiled import CACHE_BUCKET
from funaudiochat.engine.events import TurnEnd
from funaudiochat.errors import ContextLengthError, InputError
from funaudiochat.serve.scheduler import Request, Scheduler

log = logging.getLogger(__name__)

KINDS = ("s2s", "s2t")   # spoken answers (realtime, the web page, chat with audio out) and text answers
STEPS = 4                # answer tokens per warm-up request: the first from the prefill, then decode steps
QUESTION = "What is the capital of France?"
FILLER = "Please keep the answer short and simple. "


def parse_kinds(value: str) -> tuple[str, ...]:
    """`--warm-up` -> the kinds of requests to warm up ("none" or "" -> none)."""
    kinds = tuple(k.strip() for k in value.split(",") if k.strip() and k.strip() != "none")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise InputError(f"--warm-up: unknown kind(s) {', '.join(unknown)}; give a comma-separated list of "
                         f"{', '.join(KINDS)}, or none")
    return kinds


def _request(scheduler: Scheduler, mode: str, text: str) -> Request:
    # a text lead's first steps are taken before a session joins its batch: the answer outlasts them
    return Request([{"role": "user", "content": text}], mode=mode,
                   generation={"max_new_tokens": STEPS + scheduler.longest_lead(mode)},
                   audio_out=mode == "s2s" and scheduler.detokenizer is not None)


def _long_question(scheduler: Scheduler, mode: str) -> str | None:
    """A question whose prompt fills more than one cache bucket (None if the context cannot hold it)."""
    text = QUESTION
    while True:
        request = _request(scheduler, mode, text)
        try:
            prompt, _ = scheduler.prepare(request)
        except ContextLengthError:  # (a context of about one bucket: every cache has the same size)
            return None
        n = int(prompt.input_ids.shape[1])
        if n > CACHE_BUCKET:
            return text if n + request.generation["max_new_tokens"] <= scheduler.engine.max_seq_len else None
        text = FILLER + text


async def _answer(scheduler: Scheduler, requests: list[Request]) -> None:
    async def drain(session):
        async for event in session:
            if isinstance(event, TurnEnd):
                return
    await asyncio.gather(*(drain(s) for s in await scheduler.submit_together(requests)))


async def warm_up(scheduler: Scheduler, kinds: tuple[str, ...] = KINDS) -> float:
    """Run each kind's three shapes through the scheduler (see the module doc) -> seconds taken."""
    started = time.perf_counter()
    for mode in kinds:
        if mode == "s2s" and not scheduler.speech:
            log.info("warm-up: this model has no speech head; no spoken answers to warm up")
            continue
        steps = scheduler.metrics.step_seconds
        before = sum(steps.counts)
        t0 = time.perf_counter()
        long = await asyncio.get_running_loop().run_in_executor(None, _long_question, scheduler, mode)
        await _answer(scheduler, [_request(scheduler, mode, QUESTION)])  # one row
        # two rows on a longer cache: one graph takes both sizes as symbols (two rows on the first cache size would
        # keep that size fixed, and the first batch on a longer cache would compile again)
        rows = min(2, scheduler.max_sessions)
        await _answer(scheduler, [_request(scheduler, mode, long or QUESTION) for _ in range(rows)])
        if long is not None:
            await _answer(scheduler, [_request(scheduler, mode, long)])  # one row, a longer cache
        log.info("warm-up: %s answers' decode graphs ready in %.1f s (%d decode steps)", mode,
                 time.perf_counter() - t0, sum(steps.counts) - before)
    return time.perf_counter() - started
