"""The server's detokenizer thread: every session's speech codes become audio here, the sessions' chunks batched.

    worker = DetokenizerWorker(metrics)
    stream = worker.call(detokenizer.stream, voice, 15).result()  # any call, run in order on the worker thread
    worker.push(stream, codes, deliver)   # later, on the worker thread: deliver(chunks) or deliver(exception)
    last = worker.finalize(stream)        # a concurrent Future: the stream's last chunk, after all its pushes
    worker.close()

Each round takes everything that arrived while the previous round ran. A session's codes of that round are added
to its stream together; the CosyVoice3 streams (`StreamingDetokenizer`: `feed` + `detokenizer.drain`) then make all
their ready chunks in batched flow and HiFT calls, so N sessions cost far fewer calls than N one after another.
A stream without `feed` (Piper: its HiFi-GAN decoder is not causal, so a right-padded window would change the
row's last frames; its chunk windows are bounded already) pushes alone. If a batched round fails, its streams are
retried alone, so only the stream at fault fails. Final calls, and other calls, run after the round's pushes, in
arrival order.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future

from funaudiochat.speech.detokenizer import drain

log = logging.getLogger(__name__)


class DetokenizerWorker:
    def __init__(self, metrics=None, name: str = "detokenizer"):
        self.metrics = metrics
        self._cond = threading.Condition()
        self._items: list[tuple] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ any thread
    def push(self, stream, codes: list[int], deliver, alive=None) -> None:
        """Add codes to `stream`; `deliver(list of chunks | exception)` is called on the worker thread. `alive()`
        False (the listener left): the codes are dropped unsynthesised."""
        self._put(("push", stream, list(codes), deliver, alive))

    def finalize(self, stream) -> Future:
        """The stream's last chunk (`stream.finalize()`), once the pushes before it are done."""
        return self.call(stream.finalize)

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
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                items, self._items = self._items, []
                closed = self._closed
            if closed:
                for item in items:
                    if item[0] == "call":
                        item[4].set_exception(RuntimeError("the server is shutting down"))
                return
            try:
                self._round(items)
            except Exception as err:  # a bug here must not leave sessions waiting for ever: each gets the error
                log.exception("a detokenizer round failed")
                for item in items:
                    if item[0] == "call":
                        if not item[4].done():
                            item[4].set_exception(err)
                    else:
                        _deliver(item[3], err)

    def _round(self, items: list[tuple]) -> None:
        t0 = time.perf_counter()
        pushes: dict = {}  # stream -> [codes, deliver], in order of arrival
        calls = []
        for item in items:
            if item[0] == "call":
                calls.append(item[1:])
                continue
            _, stream, codes, deliver, alive = item
            if alive is not None and not alive():
                continue
            entry = pushes.setdefault(stream, [[], deliver])
            entry[0] += codes
        batched = []
        for stream, (codes, deliver) in pushes.items():
            if not hasattr(stream, "feed"):
                _deliver(deliver, _outcome(stream.push, codes))
            elif (err := _outcome(stream.feed, codes)) is not None:  # bad codes: this stream alone fails
                _deliver(deliver, err)
            else:
                batched.append((stream, deliver))
        if batched:  # (a failed batched round is retried stream by stream: only the stream at fault fails)
            results = drain([stream for stream, _ in batched], isolate=True)
            for (_, deliver), result in zip(batched, results):
                _deliver(deliver, result)
        for fn, args, kwargs, future in calls:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except Exception as err:
                    future.set_exception(err)
        if self.metrics is not None and pushes:
            self.metrics.detok_round_seconds.observe(time.perf_counter() - t0)
            self.metrics.detok_round_streams.observe(len(pushes))


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
