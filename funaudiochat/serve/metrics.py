"""Server metrics in the Prometheus text format (version 0.0.4), without a client library.

Counters and histograms are updated from the engine thread and the event loop; a lock keeps each update whole.
Gauges (sessions, queue length) are read when `/metrics` is rendered.
"""
from __future__ import annotations

import threading
import time

LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Counter:
    def __init__(self):
        self.value, self._lock = 0, threading.Lock()

    def inc(self, n: float = 1) -> None:
        with self._lock:
            self.value += n


class Histogram:
    def __init__(self, buckets: tuple):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum, self.count = 0.0, 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            i = next((j for j, b in enumerate(self.buckets) if value <= b), len(self.buckets))
            self.counts[i] += 1
            self.sum += value
            self.count += 1

    def lines(self, name: str) -> list[str]:
        with self._lock:
            out, total = [], 0
            for b, n in zip(self.buckets + (float("inf"),), self.counts):
                total += n
                le = "+Inf" if b == float("inf") else f"{b:g}"
                out.append(f'{name}_bucket{{le="{le}"}} {total}')
            out += [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """What the scheduler and the API record."""

    def __init__(self):
        self.started = time.time()
        self.tokens = Counter()           # text + speech tokens generated
        self.requests = Counter()         # requests answered (any status)
        self.errors = Counter()           # requests answered with an error status
        self.rejected = Counter()         # 429 / 503: no free session
        self.first_audio = Histogram(LATENCY_BUCKETS)   # submit -> first audio chunk, seconds
        self.prefill_seconds = Histogram(LATENCY_BUCKETS)
        self.audio_encode_seconds = Histogram(LATENCY_BUCKETS)  # waiting sessions' audio encoded together
        self.step_seconds = Histogram(STEP_BUCKETS)     # one batched decode step
        self.batch_rows = Histogram(BATCH_BUCKETS)      # rows of each decode step
        self.detok_round_seconds = Histogram(STEP_BUCKETS)  # one detokenizer round (all sessions' new codes)
        self.detok_round_streams = Histogram(BATCH_BUCKETS)  # sessions whose codes one round synthesised
        self.prefix_hits = Counter()      # prefills that started from a cached shared prefix (system turn)
        self.conversation_hits = Counter()  # prefills that started from their conversation's cached last turn
        self.conversation_tokens_saved = Counter()  # prompt positions copied from a conversation's cache
        self.prefill_tokens = Counter()   # prompt positions computed (not copied from a cache)
        self.gauges: list[tuple[str, str, object]] = []  # (name, help, fn() -> value), read when rendered
        self.early_answers = Counter()    # realtime VAD turns answered from a start during their silence
        self.early_answers_dropped = Counter()  # ... started, then dropped (the user spoke on, the prompt changed)
        self.joins_in_place = Counter()   # sessions copied into a free row of a running batch
        self.batch_rebuilds = Counter()   # batch caches rebuilt (created, a join without a free row, compaction)
        self._rate_mark = (time.perf_counter(), 0)

    def tokens_per_second(self) -> float:
        """Tokens generated per second since the previous call (or since start)."""
        now, n = time.perf_counter(), self.tokens.value
        then, before = self._rate_mark
        self._rate_mark = (now, n)
        return (n - before) / (now - then) if now > then else 0.0

    def render(self, active: int, waiting: int, max_sessions: int) -> str:
        g = [("funaudiochat_sessions_active", "gauge", "sessions generating now", active),
             ("funaudiochat_sessions_max", "gauge", "batch rows (--max-sessions)", max_sessions),
             ("funaudiochat_queue_length", "gauge", "requests waiting for a free session", waiting),
             ("funaudiochat_tokens_per_second", "gauge", "text + speech tokens per second since the last scrape",
              round(self.tokens_per_second(), 3)),
             ("funaudiochat_tokens_total", "counter", "text + speech tokens generated", self.tokens.value),
             ("funaudiochat_requests_total", "counter", "HTTP requests answered", self.requests.value),
             ("funaudiochat_request_errors_total", "counter", "HTTP requests answered with an error",
              self.errors.value),
             ("funaudiochat_rejected_total", "counter", "requests refused for lack of a free session (429/503)",
              self.rejected.value),
             ("funaudiochat_prefix_cache_hits_total", "counter", "prefills started from a cached system prompt",
              self.prefix_hits.value),
             ("funaudiochat_conversation_cache_hits_total", "counter",
              "prefills that started from their conversation's cached last turn", self.conversation_hits.value),
             ("funaudiochat_conversation_cache_tokens_saved_total", "counter",
              "prompt tokens copied from a conversation's cached last turn instead of prefilled",
              self.conversation_tokens_saved.value),
             ("funaudiochat_prefill_tokens_total", "counter", "prompt tokens prefilled (computed, not copied)",
              self.prefill_tokens.value),
             ("funaudiochat_realtime_early_answers_total", "counter",
              "realtime turns answered from a start during the silence that ended them", self.early_answers.value),
             ("funaudiochat_realtime_early_answers_dropped_total", "counter",
              "answers started during a silence, then dropped (the user spoke on)", self.early_answers_dropped.value),
             ("funaudiochat_batch_joins_in_place_total", "counter", "sessions that joined a free batch row in place",
              self.joins_in_place.value),
             ("funaudiochat_batch_rebuilds_total", "counter", "batch caches rebuilt (copied whole)",
              self.batch_rebuilds.value),
             ("funaudiochat_uptime_seconds", "gauge", "seconds since the server started",
              round(time.time() - self.started, 3))]
        g += [(name, "gauge", help_, fn()) for name, help_, fn in self.gauges]
        out = []
        for name, kind, help_, value in g:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        for name, help_, hist in (
                ("funaudiochat_time_to_first_audio_seconds", "request accepted -> first audio chunk", self.first_audio),
                ("funaudiochat_prefill_seconds", "compute time of one prefill (its sessions, all chunks)",
                 self.prefill_seconds),
                ("funaudiochat_audio_encode_seconds", "one batched encoding of the audio of sessions waiting for "
                 "their prefill (then not counted in their prefill)", self.audio_encode_seconds),
                ("funaudiochat_decode_step_seconds", "one batched decode step", self.step_seconds),
                ("funaudiochat_decode_step_rows", "sessions in one batched decode step", self.batch_rows),
                ("funaudiochat_detokenizer_round_seconds", "one detokenizer round (every session's new speech codes)",
                 self.detok_round_seconds),
                ("funaudiochat_detokenizer_round_sessions", "sessions synthesised in one detokenizer round",
                 self.detok_round_streams)):
            out += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"] + hist.lines(name)
        return "\n".join(out) + "\n"
