"""Ids of spoken answers, so a later request can refer to an earlier answer by `audio: {id}` (its transcript).

Bounded: at most `max_items` ids, each valid for `ttl_s` seconds (the answer's `expires_at`); the oldest go first.
"""
from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict


class AudioStore:
    def __init__(self, max_items: int = 4096, ttl_s: float = 3600.0):
        self.max_items, self.ttl_s = max_items, ttl_s
        self._items: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def new_id(self) -> tuple[str, int]:
        """A fresh id and its expiry (unix seconds); `put` records its transcript once the answer is complete."""
        return "audio_" + secrets.token_hex(12), int(time.time() + self.ttl_s)

    def put(self, audio_id: str, transcript: str, expires_at: float) -> None:
        with self._lock:
            self._items[audio_id] = (transcript, expires_at)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def transcript(self, audio_id: str) -> str | None:
        with self._lock:
            item = self._items.get(audio_id)
            if item is None or item[1] < time.time():
                self._items.pop(audio_id, None)
                return None
            return item[0]
