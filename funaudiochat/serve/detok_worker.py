"""The server's detokenizer thread: every session's speech codes become audio here, the sessions' chunks batched.

    worker = DetokenizerWorker(metrics)
    stream = worker.call(detokenizer.stream, voice, 15).result()  # any call, run in order on the worker thread
    worker.push(stream, codes, deliver)   # later, on the worker thread: deliver(chunks) or deliver(exception)
    last = worker.finalize(stream)        # a concurrent Future: the stream's last chunk, after all its pushes
    worker.close()

Each round takes everything that arrived while the previous round ran. A session's codes of that round are added
to its stream together; the CosyVoice3 streams (`StreamingDetokenizer`: `feed` + `detokenizer.drain`) then make one
ready chunk each in batched flow and HiFT calls, so N sessions cost far fewer calls than N one after another, and
the next round comes back for the rest: a new session's first chunk never waits behind another's whole backlog.
HiFT vocodes only each chunk's new mel frames (`speech/hift_stream.py`): a chunk costs the same late in a long
answer as early, so the rounds' batching is not eaten by answers growing.
A stream without `feed` (Piper: its HiFi-GAN decoder is not causal, so a right-padded window would change the
row's last frames; its chunk windows are bounded already) pushes alone. If a batched round fails, its streams are
retried alone, so only the stream at fault fails. Final calls, and other calls, run after the round's pushes, in
arrival order. On CPU each of a round's three parts (the pushes, the batched drain, the final chunks and calls)
takes one turn on the cores between the engine's steps (`cpu_turns`): N sessions' chunks come out back to back, not
one per engine step.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from contextlib import nullcontext

from funaudiochat.serve.cpu_turns import CpuTurns
from funaudiochat.serve.openmp import one_thread_here
from funaudiochat.speech.detokenizer import drain

log = logging.getLogger(__name__)


class DetokenizerWorker:
    def __init__(self, metrics=None, name: str = "detokenizer", turns: CpuTurns | None = None):
        self.metrics = metrics
        self.turns = turns or CpuTurns(enabled=False)
        self._cond = threading.Condition()
        self._items: list[tuple] = []
        self._closed = False
        self._backlog: dict = {}  # (worker thread) stream -> (deliver, alive): chunks still to make
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ any thread
    def push(self, stream, codes: list[int], deliver, alive=None, ahead: list[int] | None = None,
             done: threading.Event | None = None) -> None:
        """Add codes to `stream`; `deliver(list of chunks | exception)` is called on the worker thread. `alive()`
        False (the listener left): the codes are dropped unsynthesised, and so is what the stream still held.
        `ahead`: the units known to follow them (`PiperStream.push`), for a stream that takes them. `done` is set
        when the round that took them has run (whatever it delivered), or the worker closed."""
        self._put(("push", stream, list(codes), deliver, alive, ahead, done))

    def finalize(self, stream) -> Future:
        """The stream's last chunk (`stream.finalize()`), once every chunk of the pushes before it is delivered."""
        future: Future = Future()
        self._put(("final", stream, future))
        return future

    def call(self, fn, *args, **kwargs) -> Future:
        """Run `fn(*args, **kwargs)` on the worker thread, after the pushes that arrived before it."""
        future: Future = Future()
        self._put(("call", fn, args, kwargs, future))
        return future

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def _put(self, item: tuple) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the detokenizer worker is closed")
            self._items.append(item)
            self._cond.notify_all()

    # ------------------------------------------------------------------ the worker thread
    def _run(self) -> None:
        import torch

        torch.set_grad_enabled(False)
        one_thread_here()  # (the engine thread's OpenMP team is the only one: serve/openmp.py)
        while True:
            with self._cond:
                while not self._items and not self._backlog and not self._closed:
                    self._cond.wait()
                items, self._items = self._items, []
                closed = self._closed
            if closed:
                for item in items:
                    if item[0] != "push":
                        item[-1].set_exception(RuntimeError("the server is shutting down"))
                _rounds_done(items)
                return
            try:
                self._round(items)
                _rounds_done(items)
            except Exception as err:  # a bug here must not leave sessions waiting for ever: each gets the error
                log.exception("a detokenizer round failed")
                for item in items:
                    if item[0] != "push":
                        if not item[-1].done():
                            item[-1].set_exception(err)
                    else:
                        _deliver(item[3], err)
                for deliver, _ in self._backlog.values():
                    _deliver(deliver, err)
                self._backlog.clear()
                _rounds_done(items)

    def _round(self, items: list[tuple]) -> None:
        """New codes join their streams; then ONE chunk of every stream with one ready, batched, is delivered: a
        stream's further chunks wait for the next round, behind what arrived meanwhile (a new session's first chunk
        never waits for another's whole backlog, and a listener that left stops its stream at once)."""
        t0 = time.perf_counter()
        pushes: dict = {}  # stream -> [codes, deliver, alive], in order of arrival
        others = []
        for item in items:
            if item[0] != "push":
                others.append(item)
                continue
            _, stream, codes, deliver, alive, ahead, _ = item
            if alive is None or alive():
                entry = pushes.setdefault(stream, [[], deliver, alive, None])
                entry[0] += codes
                entry[3] = ahead  # (what follows the round's last codes)
        alone = [(stream, codes, deliver, ahead) for stream, (codes, deliver, _, ahead) in pushes.items()
                 if not hasattr(stream, "feed")]
        if alone:  # one turn for the round: N sessions' chunks come out back to back, not one per engine step
            with self.turns.turn():
                for stream, codes, deliver, ahead in alone:
                    _deliver(deliver, _outcome(stream.push, codes, ahead))
        for stream, (codes, deliver, alive, _) in pushes.items():
            if not hasattr(stream, "feed"):
                continue
            if (err := _outcome(stream.feed, codes)) is not None:  # bad codes: this stream alone fails
                _deliver(deliver, err)
            else:
                self._backlog[stream] = (deliver, alive)
        self._backlog = {s: v for s, v in self._backlog.items() if v[1] is None or v[1]()}
        streams = list(self._backlog)
        if streams:  # (a failed batched round is retried stream by stream: only the stream at fault fails)
            with self.turns.turn():
                results = drain(streams, isolate=True, rounds=1)
            for stream, result in zip(streams, results):
                deliver = self._backlog[stream][0]
                if isinstance(result, Exception) or not result:  # failed, or nothing more is ready
                    del self._backlog[stream]
                if isinstance(result, Exception) or result:
                    _deliver(deliver, result)
        with self.turns.turn() if others else nullcontext():  # (the round's last chunks and calls: one turn)
            for item in others:
                if item[0] == "final":
                    _, stream, future = item
                    if future.set_running_or_notify_cancel():
                        held = self._backlog.pop(stream, None)
                        if held is not None:  # its remaining chunks come first
                            rest = drain([stream], isolate=True)[0]
                            if isinstance(rest, Exception):
                                future.set_exception(rest)
                                continue
                            _deliver(held[0], rest)
                        _settle(future, stream.finalize)
                elif item[-1].set_running_or_notify_cancel():
                    _, fn, args, kwargs, future = item
                    _settle(future, fn, *args, **kwargs)
        synthesised = {s for s in pushes if not hasattr(s, "feed")} | set(streams)  # pushed alone (Piper), batched
        if self.metrics is not None and synthesised:
            self.metrics.detok_round_seconds.observe(time.perf_counter() - t0)
            self.metrics.detok_round_streams.observe(len(synthesised))


def _rounds_done(items: list[tuple]) -> None:
    """Set the `done` events of a round's pushes."""
    for item in items:
        if item[0] == "push" and item[-1] is not None:
            item[-1].set()


def _outcome(fn, *args):
    """fn(*args), or the exception it raised."""
    try:
        return fn(*args)
    except Exception as err:
        return err


def _deliver(deliver, result) -> None:
    try:
        deliver(result)
    except Exception:  # the listener is gone (e.g. its event loop closed): nothing to tell
        log.debug("a detokenizer result had no listener", exc_info=True)


def _settle(future: Future, fn, *args, **kwargs) -> None:
    try:
        future.set_result(fn(*args, **kwargs))
    except Exception as err:
        future.set_exception(err)
