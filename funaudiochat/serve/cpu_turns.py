"""The server's heavy threads take turns on the CPU cores instead of running at once.

    turns = CpuTurns()
    with turns.turn():      # first come, first served; a thread already holding a turn goes straight on
        run_a_decode_step() # each turn may use every core (torch's and onnxruntime's thread pools)

Why: the engine's decode step runs as parallel regions of `torch.get_num_threads()` threads that meet at a barrier
after every kernel. When a detokenizer thread computes at the same time on a 2-core machine, one of those threads
waits for a core at each barrier, and the step takes 2-5x its time (machine F: an 8-row compiled int8 step of the
mini, 40 ms alone, 87-193 ms beside one busy Piper decoder thread). Taking turns, each part runs at its full
speed and the cores are never shared by two thread pools. On a GPU the engine's work is not on the CPU cores:
there, `enabled=False` lets everything run at once.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager


class CpuTurns:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._cond = threading.Condition()
        self._next_ticket = 0   # the ticket the next caller draws
        self._serving = 0       # the ticket whose turn it is
        self._owner: int | None = None  # the thread holding the turn
        self._depth = 0         # nested turns of the owner

    @contextmanager
    def turn(self):
        if not self.enabled:
            yield
            return
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:  # a nested turn of the holder (e.g. a call that takes a turn inside a step)
                self._depth += 1
            else:
                ticket = self._next_ticket
                self._next_ticket += 1
                while ticket != self._serving:
                    self._cond.wait()
                self._owner, self._depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if self._depth == 0:
                    self._owner = None
                    self._serving += 1
                    self._cond.notify_all()
