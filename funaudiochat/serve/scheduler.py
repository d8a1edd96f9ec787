"""One engine, many conversations: a scheduler that runs every active session's decode step as one batch.

Public interface (what the HTTP API, the realtime WebSocket and `/api/chat` build on):

    scheduler = Scheduler(runtime.engine, runtime.tokenizer, runtime.detokenizer, max_sessions=8)
    scheduler.start()                       # the engine thread; `await scheduler.stop()` / `scheduler.close()` ends it
    session = await scheduler.submit(Request(messages=[{"role": "user", "content": user_content(1)}],
                                             audios=[wav_16k], mode="s2s", voice="中文女"))
    async for event in session:             # the engine's streaming events (funaudiochat.engine.events):
        ...                                 # TextDelta, SpeechGroup, AudioChunk (24 kHz), SpeechEnd, then TurnEnd
    session.cancel()                        # or cancel the consuming task / close the iterator: same effect

- `Request`: the conversation (ChatML messages whose content carries one audio template per audio, the audios as
  16 kHz float32 arrays in order), the mode ("s2s": text + speech, "s2t": text only), an optional system prompt and
  OpenAI-style tools (turned into the released function-calling system prompt), generation overrides of the mode's
  preset (max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, do_sample, text_greedy), stop
  strings, the voice (a detokenizer speaker name or a [1, 192] x-vector) and whether to synthesise audio.
- `check_capacity()` raises the 429 at once when the waiting room is full (cheap: call it before decoding uploads).
- `submit` validates and builds the prompt off the event loop (bad input raises `InputError` /
  `ContextLengthError`), then waits in line (first come, first served) for a free batch row: when `max_waiting`
  requests already wait it raises `ServerBusyError` (status 429) at once; after `wait_timeout_s` without a row it
  raises `ServerBusyError` (503). Both carry `retry_after` seconds. A session's row is free again before its
  `TurnEnd` reaches the consumer, so a conversation's next turn never competes with its own previous one.
- A `Session` is an async iterator of events ending with `TurnEnd` (finish_reason "stop", "length" or "cancelled";
  usage with prompt / text / speech token counts and timings; `audio` = the whole answer when audio was made).
  An engine failure ends the iteration with `EngineFailure`. Cancelling (explicit, task cancellation, closing the
  iterator, a matched stop string) frees the batch row and its cache at the next engine step.

How it runs: a dedicated engine thread loops: chunks (`prefill_chunk` prompt positions) of the prefills under way,
then one decode step for each batch of running sessions. Waiting prompts go first for up to `prompt_burst_s` after a
step (questions that end together all reach their first audio sooner), but never while a session playing its answer
has less than PLAYBACK_MARGIN_S of audio in hand: then one chunk alternates with one step, so a long prompt never
stalls a speaking session for more than a chunk. Until a session's first audio, and while it has less than
RENDER_MARGIN_S of audio in hand, the engine thread waits after a step for the detokenizer's round that renders the
speech that step made (at most RENDER_WAIT_S), as `stream_turn` waits for each rendering: its chunk goes out now, on
every core, instead of behind the next step. Audio of sessions waiting together is encoded in one batched call
(`Engine.encode_ahead`). Sessions waiting at the same moment with equal settings are prefilled together as one
left-padded batch. The keys and values of each distinct system turn, with the user turn's opening after it, are computed
once and copied into later prompts that start with them (copy-on-start prefix sharing, `max_prefixes` kept), so only the
rest of a prompt is prefilled. A request that names its conversation (`Request.conversation`) starts from that
conversation's last completed turn instead: when a turn completes, its row's keys and values are kept
(`ConversationStore`, LRU bounded in entries and bytes; `forget_conversation` drops one), and the next turn's prompt,
compared position by position by content, prefills only what follows their longest common prefix (docs/serve.md,
"Conversation cache"). When its prompt is in, a session chooses its first token exactly as a single run does and joins a
batch. Sessions whose settings can share a step (same mode and sampling parameters; a seeded session always runs alone
so its draws are its own) share a batch. A batch is one `DecodeState` whose live rows are right-aligned in a shared
cache: a joining row's keys and values are copied to the slots just before the shared slot (its rope positions stay its
own; slots before its first real position are masked, like left padding), so each row computes what it computes alone
(tests/test_scheduler.py). The cache has free rows and spare slots: a session joins by being copied into a free row in
place, and a finished or cancelled one leaves its row masked; the whole cache is copied (rebuilt: dead rows and slots
dropped) only when no free row or slot is left or most rows are free.

Per session, text is decoded incrementally and speech codes go to a streaming detokenizer on a worker thread
(`DetokenizerWorker`), which synthesises the chunks of all sessions in batched calls, so the engine thread only
decodes. Queues are bounded: the waiting room by `max_waiting`, each session's
event queue by its `max_new_tokens` (one engine item per step).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from funaudiochat.engine.compiled import CACHE_BUCKET
from funaudiochat.engine.events import PLAYBACK_MARGIN_S as STREAM_MARGIN_S
from funaudiochat.engine.events import AudioChunk, IncrementalDecoder, SpeechEnd, SpeechGroup, TextDelta, TurnEnd, Usage
from funaudiochat.engine.generate import DecodeState, Engine, GenerationConfig, PrefillJob
from funaudiochat.engine.inputs import check_trained
from funaudiochat.engine.prefix_cache import (ConversationEntry, ConversationStore, PrefixKV, PrefixStore, audio_name,
                                              audios_in, position_keys, snapshot_row, shared_prefix_len)
from funaudiochat.engine.presets import default_system, generation_preset
from funaudiochat.engine.prompt import Prompt, build_prompt, prompt_ids, stack_prompts
from funaudiochat.errors import ContextLengthError, FunAudioChatError, InputError
from funaudiochat.model.backbone import KVCache
from funaudiochat.serve.cpu_turns import CpuTurns
from funaudiochat.serve.detok_worker import DetokenizerWorker
from funaudiochat.serve.metrics import Metrics
from funaudiochat.serve.openmp import one_thread_here, threads_here
from funaudiochat.text.tools import tools_system_prompt

log = logging.getLogger(__name__)

MODES = ("s2s", "s2t")
GENERATION_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "do_sample",
                   "text_greedy")
_UNBOUNDED = 1 << 40  # a batch's own max_new_tokens: each row's limit is enforced by the scheduler
CACHE_HEADROOM = 256  # decode steps a batch cache holds beyond its current slot before it is rebuilt
# streaming detokenizer bounds of the released web demo: each chunk's cost stops growing with the answer's length
FLOW_WINDOW, HIFT_RESET = 200, 500
# Prompts before decode steps: after a decode step, waiting prompts are prefilled back to back for up to
# PROMPT_BURST_S (questions that end together all reach their first audio sooner than one prefill per step), unless
# a session already playing its answer has less than PLAYBACK_MARGIN_S of audio in hand
PROMPT_BURST_S, PLAYBACK_MARGIN_S = 0.8, 1.0
# Renders before the next step: until its first audio, and while a session has less than RENDER_MARGIN_S of audio in
# hand (the margin of `stream_turn`), a step that made it speech waits up to RENDER_WAIT_S for that speech's rendering
RENDER_MARGIN_S, RENDER_WAIT_S = STREAM_MARGIN_S, 1.0


class ServerBusyError(FunAudioChatError):
    """No batch row is free: `status` 429 (the waiting room is full) or 503 (waited too long); retry later."""

    def __init__(self, message: str, status: int, retry_after: int):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class EngineFailure(FunAudioChatError):
    """The engine failed while running this session (the message says how); the server keeps running."""


@dataclass
class Request:
    messages: list[dict]                        # {"role": "system"|"user"|"assistant", "content": str}
    audios: list = field(default_factory=list)  # 16 kHz float32 mono arrays, one per audio template, in order
    mode: str = "s2s"                           # "s2s" text + speech, "s2t" text only
    system: str | None = None                   # None: the mode's default, unless messages start with a system turn
    tools: list | None = None                   # OpenAI tool definitions -> the function-calling system prompt
    generation: dict = field(default_factory=dict)  # overrides of the mode's preset (GENERATION_KEYS)
    max_new_tokens_is_ceiling: bool = False     # generation's max_new_tokens shrinks to the context's room instead
                                                # of being refused (the web chat, whose history grows)
    stop: tuple = ()                            # stop strings: the text ends before the first one found
    voice: object = None                        # detokenizer speaker: a name or a [1, 192] x-vector; None = default
    audio_out: bool = True                      # s2s: synthesise audio chunks (needs a detokenizer)
    answer_prefix: str = ""                     # s2t: text the answer is made to start with (e.g. a forced tool
                                                # call's opening); not part of TurnEnd.text
    conversation: str | None = None             # a key naming the conversation this turn belongs to: its last
                                                # completed turn's keys and values are reused (conversation cache)


@dataclass
class _Prepared:
    """A validated request: its prompt (without audio inputs for the audios `prefix` covers), generation settings,
    the length of its shareable prefix (its system turn and the user turn's opening), and, for a turn of a known
    conversation, its position keys and the cached keys and values of the conversation's last turn it starts with."""

    prompt: Prompt
    gen: GenerationConfig
    prefix_len: int = 0
    keys: list | None = None
    conversation_prefix: PrefixKV | None = None


# ---------------------------------------------------------------------------------------------- engine-side rows
@dataclass
class _Row:
    """One session's place in the engine thread."""

    session: "Session"
    gen: GenerationConfig
    max_new: int
    generated: int = 0
    tail: list = field(default_factory=list)   # last ids of prompt + answer (for bad-word prefixes)
    text_ids: list = field(default_factory=list)
    speech_tokens: int = 0
    prefill_s: float = 0.0


def _batch_key(session: "Session") -> tuple:
    """Sessions with equal keys can share one decode step exactly. A seeded sampled session's key is its own: its
    draws come from its own generator, so it runs (and is prefilled) alone."""
    gen = session.gen
    own = session.id if gen.seed is not None and gen.do_sample else None
    return (gen.disable_speech, gen.sampling, gen.text_greedy, gen.bad_words_ids, gen.eos_ids, gen.pad_token_id,
            gen.text_loop_stop, gen.text_lead, gen.fast_text_lead, own)


def _release(event: threading.Event | None) -> None:
    """Let the engine thread go on (a `_Step.rendered` that was not handed to a detokenizer worker)."""
    if event is not None:
        event.set()


def _runs_alone(key: tuple) -> bool:
    return key[-1] is not None


@dataclass
class _Batch:
    """One DecodeState of `len(rows)` rows; a free row (None) is masked and finished: it computes a pad token on
    its own masked keys, which nobody reads, until a joining session is copied into it."""

    key: tuple
    gen: GenerationConfig
    rows: list[_Row | None]
    state: DecodeState

    @property
    def live(self) -> list[tuple[int, _Row]]:
        return [(i, row) for i, row in enumerate(self.rows) if row is not None]


@dataclass
class _Prefill:
    """Sessions whose prompts are prefilled together: one left-padded batch, one chunk per engine loop."""

    sessions: list["Session"]
    job: PrefillJob
    gen: GenerationConfig  # the first token's choice (shared: the sessions have equal batch keys)
    admitted: set = field(default_factory=set)  # rows already handed to a batch (or finished) once the prompts
    #   are in


# ---------------------------------------------------------------------------------------------- the session
class Session:
    """A submitted request: iterate it for events; `cancel()` stops it at the next engine step."""

    _ids = itertools.count(1)

    def __init__(self, scheduler: "Scheduler", request: Request, prepared: _Prepared):
        self.id = f"s{next(self._ids)}"
        self.request, self.prompt, self.gen = request, prepared.prompt, prepared.gen
        prompt = prepared.prompt
        self.prefix_len = prepared.prefix_len  # leading prompt ids every new conversation shares
        self.keys = prepared.keys  # (a conversation's turn) what each prompt position holds, for its commit
        self.conversation_prefix = prepared.conversation_prefix  # its conversation's cached keys and values
        self.cached_tokens = 0  # leading prompt positions copied from a cache, not computed (set at its prefill)
        self.prompt_tokens = int(prompt.input_ids.shape[1])
        self._scheduler = scheduler
        self._loop = asyncio.get_running_loop()
        self._raw: asyncio.Queue = asyncio.Queue()   # engine items; at most one per step (bounded by max_new_tokens)
        self._out: asyncio.Queue = asyncio.Queue()   # events for the consumer
        self._cancel = threading.Event()
        self._done = False
        self._abandoned = False  # the consumer left before TurnEnd: nothing more is synthesised for it
        self._ended = False      # (engine thread) its last engine item was sent and its row freed
        self.submitted = time.perf_counter()
        self.audio_started: float | None = None  # (event loop) when its first audio chunk was handed out
        self.audio_seconds = 0.0                 # (event loop) seconds of audio handed out so far
        self.speaks = False                      # (event loop) its speech codes go to a detokenizer
        self._pump = None

    # -- consumer side
    def cancel(self) -> None:
        """Stop generating (thread-safe); the stream ends with TurnEnd(finish_reason="cancelled")."""
        self._cancel.set()
        self._scheduler._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __aiter__(self):
        return self._events()

    async def _events(self):
        try:
            while True:
                event = await self._out.get()
                if isinstance(event, BaseException):
                    self._done = True
                    raise event
                if isinstance(event, TurnEnd):
                    self._done = True
                yield event
                if self._done:
                    return
        finally:
            if not self._done:  # the consumer left early (closed, cancelled, disconnected)
                self._abandoned = True
                self.cancel()

    # -- engine side (called from the engine thread)
    def _push(self, item) -> None:
        self._loop.call_soon_threadsafe(self._raw.put_nowait, item)

    def _awaits_audio(self) -> bool:
        """Whether the engine should wait for its speech's rendering: it speaks, and has no audio yet or less than
        RENDER_MARGIN_S in hand (handed out, not yet played by a listener who started at its first chunk)."""
        if not self.speaks or self._abandoned:
            return False
        started = self.audio_started
        return started is None or self.audio_seconds - (time.perf_counter() - started) < RENDER_MARGIN_S


@dataclass
class _Step:
    token: int
    group: tuple | None
    speech_ended: bool
    ahead: list | None = None  # the units the speech says next, where its text tells them (Engine.units_ahead)
    rendered: threading.Event | None = None  # set once the detokenizer's round with this group has run (or never will)


@dataclass
class _Finish:
    reason: str
    text_ids: tuple
    speech_tokens: int
    prefill_s: float


# ---------------------------------------------------------------------------------------------- the scheduler
class Scheduler:
    def __init__(self, engine: Engine, tokenizer, detokenizer=None, *, max_sessions: int = 8, max_waiting: int = 32,
                 wait_timeout_s: float = 10.0, detokenizer_hop: int = 15, detokenizer_max_hop: int | None = None,
                 detokenizer_threads: int = 1,
                 metrics: Metrics | None = None, frontend=None, prefill_chunk: int | None = 64,
                 share_prefix: bool = True, max_prefixes: int = 8, allow_untrained: bool = False,
                 conversation_cache: bool = True, max_conversations: int = 64, max_conversation_bytes: int = 512 << 20,
                 flow_cache: bool = True, prompt_burst_s: float = PROMPT_BURST_S):
        if max_sessions < 1 or max_waiting < 0:
            raise InputError("max_sessions must be >= 1 and max_waiting >= 0")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise InputError("prefill_chunk must be >= 1 (or None: whole prompts)")
        if not prompt_burst_s >= 0:
            raise InputError("prompt_burst_s must be >= 0 (0: one prefill chunk between decode steps)")
        self.prefill_chunk, self.share_prefix, self.max_prefixes = prefill_chunk, share_prefix, max_prefixes
        self.prompt_burst_s = prompt_burst_s
        self._burst_start: float | None = None  # (engine thread) when the prefills since the last decode step began
        self.allow_untrained = allow_untrained  # audio input on a checkpoint whose hearing was never trained
        self.engine, self.tokenizer, self.detokenizer = engine, tokenizer, detokenizer
        self.max_sessions, self.max_waiting, self.wait_timeout_s = max_sessions, max_waiting, wait_timeout_s
        self.detokenizer_hop, self.frontend = detokenizer_hop, frontend
        # later chunks up to this many tokens (None: the detokenizer's default)
        self.detokenizer_hops = {} if detokenizer_max_hop is None else {"max_hop": detokenizer_max_hop}
        if detokenizer is not None:  # (its own checks of the hops, before any request)
            detokenizer.stream(hop=detokenizer_hop, **self.detokenizer_hops)
        self.flow_cache = flow_cache  # each stream keeps its flow's keys and values (speech/flow_cache.py)
        self.metrics = metrics or Metrics()
        self.speech = engine.model.audio_invert_tower is not None
        self._cond = threading.Condition()
        self._inbox: deque[Session] = deque()
        self._batches: dict[tuple, _Batch] = {}
        self._queued: deque[Session] = deque()       # (engine thread) sessions waiting for their prefill, in order
        self._prefill: _Prefill | None = None          # (engine thread) the prefill under way
        self._joining = 0                              # (engine thread) rows of a finished prefill still to join
        self._renders: list[threading.Event] = []       # (engine thread) renderings to wait for (`_await_renders`)
        self._num_codes = engine.cfg.audio_config.num_codes
        self._prefixes = PrefixStore(max_prefixes)  # shared prefixes' keys and values, LRU
        # each conversation's last completed turn (keys and values), LRU; None: every turn prefills its whole prompt
        self.conversations = ConversationStore(max_conversations, max_conversation_bytes) if conversation_cache \
            else None
        if self.conversations is not None:
            self.metrics.gauges += [
                ("funaudiochat_conversation_cache_entries", "conversations whose last turn's keys and values are kept",
                 lambda: len(self.conversations)),
                ("funaudiochat_conversation_cache_bytes", "bytes of the kept conversations' keys and values",
                 lambda: self.conversations.nbytes)]
        self._stop = False
        self._thread: threading.Thread | None = None
        self._threads = torch.get_num_threads()  # the engine thread runs with the creating thread's torch threads
        # on CPU the engine's steps, the detokenizer's chunks and the prompts' features take turns on the cores
        self.turns = CpuTurns(enabled=engine.device.type == "cpu")
        self._free_rows = max_sessions                 # batch rows nobody holds (event loop only)
        self._waiters: deque[asyncio.Future] = deque()  # requests waiting for a row, first come first served
        self._active = 0
        # each worker batches the chunks of its sessions; sessions are dealt to the workers in turn
        self._detok_workers = [DetokenizerWorker(self.metrics, f"detokenizer-{i}", self.turns)
                               for i in range(max(1, detokenizer_threads))] if detokenizer is not None else []
        self._prep_pool = ThreadPoolExecutor(2, thread_name_prefix="prompt", initializer=one_thread_here)
        self._deal = itertools.count()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
            self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for worker in self._detok_workers:
            worker.close()
        self._prep_pool.shutdown(wait=False, cancel_futures=True)

    async def stop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def active_sessions(self) -> int:
        return self._active

    @property
    def waiting_sessions(self) -> int:
        return len(self._waiters)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ submission
    def prepare(self, request: Request) -> tuple[Prompt, GenerationConfig]:
        """Validate a request and build its prompt and generation settings (blocking; raises InputError)."""
        prepared = self._prepare(request, reuse=False)
        return prepared.prompt, prepared.gen

    def _prepare(self, request: Request, reuse: bool = True) -> _Prepared:
        """`prepare`, plus the length of the prompt's shareable prefix (`shared_prefix_len`; 0 if none) and, with
        `reuse`, the cached keys and values of the request's conversation that its prompt starts with."""
        if request.mode not in MODES:
            raise InputError(f"unknown mode {request.mode!r}; choose one of {', '.join(MODES)}")
        if request.mode == "s2s" and not self.speech:
            raise InputError("this model has no speech head: only text answers (mode s2t) are possible")
        if request.mode == "s2s" and request.audio_out and self.detokenizer is None:
            raise InputError("this server has no detokenizer: audio answers are not available (ask for text only, "
                             "or start the server with --detokenizer)")
        if request.audios:
            self.check_hearing()
        if request.answer_prefix and request.mode != "s2t":
            raise InputError("an answer prefix needs a text answer (mode s2t)")
        unknown = set(request.generation) - set(GENERATION_KEYS)
        if unknown:
            raise InputError(f"unknown generation setting(s): {', '.join(sorted(unknown))}")
        if request.conversation is not None and not isinstance(request.conversation, str):
            raise InputError("a conversation key must be a string")
        messages = [dict(m) for m in request.messages]
        if not messages or not any(m.get("role") == "user" for m in messages):
            raise InputError("a conversation needs at least one user message")
        if messages[0].get("role") != "system":
            system = request.system if request.system is not None else default_system(request.mode, self.engine.cfg)
            if request.tools:
                system = tools_system_prompt(request.tools, base=request.system or default_system("s2t", self.engine.cfg))
            messages.insert(0, {"role": "system", "content": system})
        elif request.tools:
            messages[0]["content"] = tools_system_prompt(request.tools, base=messages[0]["content"])
        cfg, audios = self.engine.cfg, list(request.audios)
        ids, counts = prompt_ids(self.tokenizer, cfg, messages, audios)
        forced = self.tokenizer.encode(request.answer_prefix) if request.answer_prefix else []
        ids += forced
        n_prompt = len(ids)
        room = self.engine.max_seq_len - n_prompt
        if room < 1:
            raise ContextLengthError(f"the prompt has {n_prompt} tokens, the context holds {self.engine.max_seq_len}; "
                                     f"send shorter audio or fewer messages")
        overrides = {k: v for k, v in request.generation.items() if v is not None}
        asked = overrides.get("max_new_tokens")
        if asked is not None and asked > room and request.max_new_tokens_is_ceiling:
            overrides["max_new_tokens"] = asked = room
        if asked is not None and asked > room:
            raise ContextLengthError(f"prompt of {n_prompt} tokens + max_new_tokens {asked} exceeds the context of "
                                     f"{self.engine.max_seq_len} tokens; lower max_new_tokens to at most {room}")
        gen = generation_preset(request.mode, self.tokenizer, self.engine.cfg, **overrides)
        if asked is None and gen.max_new_tokens > room:
            gen = gen.with_(max_new_tokens=room)
        if not gen.disable_speech and not self.speech:
            gen = gen.with_(disable_speech=True, force_text_abos=False)
        n_shared = shared_prefix_len(self.tokenizer, cfg, messages[0], ids) if self.share_prefix else 0
        keys = prefix = None
        if reuse and request.conversation is not None and self.conversations is not None:
            keys = position_keys(ids, audios, counts, cfg.audio_token_index, self.engine.k,
                                 names=[audio_name(a) for a in audios])
            prefix = self.conversations.lookup(request.conversation, ids, keys, self._speech_on(gen), self.engine.k)
            if prefix is not None and len(prefix) <= n_shared:  # no more than the shared prefix
                prefix = None
        # the audios the conversation's keys and values cover are not encoded again: they get no audio inputs
        cached_audios = audios_in(keys[:len(prefix)]) if prefix is not None else 0
        with self.turns.turn():  # (the audios' log-mel features)
            prompt = build_prompt(self.tokenizer, cfg, messages, audios, self.frontend, cached_audios=cached_audios)
        if forced:
            prompt.input_ids = torch.cat([prompt.input_ids, torch.tensor([forced], dtype=prompt.input_ids.dtype)], 1)
            prompt.attention_mask = torch.ones_like(prompt.input_ids)
        return _Prepared(prompt, gen, n_shared, keys, prefix)

    def longest_lead(self, mode: str) -> int:
        """The most LLM steps by which a spoken answer's text may run ahead of its speech in `mode` (the
        checkpoint's `GenerationConfig.text_lead` / `fast_text_lead`); 0 for text answers."""
        if mode != "s2s" or not self.speech:
            return 0
        return generation_preset(mode, self.tokenizer, self.engine.cfg).longest_lead

    def speech_trails_text(self, session: Session) -> int:
        """Speech tokens by which the speech of a step of this session's answer comes after its text: its text
        lead of L steps (its own once it has joined a batch: `Engine.lead_of`) is L groups."""
        return session.gen.text_lead * self.engine.k if self._speech_on(session.gen) else 0

    def _speech_on(self, gen: GenerationConfig) -> bool:
        return not gen.disable_speech and self.speech

    def forget_conversation(self, conversation: str) -> None:
        """Drop a conversation's cached keys and values (its client left). A turn of it still running commits
        nothing once it is cancelled: cancel it first (thread-safe)."""
        if self.conversations is not None:
            self.conversations.drop(conversation)

    def check_hearing(self) -> None:
        """Raise InputError if this checkpoint cannot take audio input: its audio adapter was never trained
        (config.json) and the server was not started with --allow-untrained."""
        check_trained(self.engine.cfg, True, False, self.allow_untrained)

    async def submit(self, request: Request) -> Session:
        """Build the prompt, wait (bounded) for a batch row, queue the session for the engine; see module doc."""
        return (await self.submit_together([request]))[0]

    async def submit_together(self, requests: list[Request]) -> list[Session]:
        """`submit` for several requests that reach the engine at the same moment, so that those with equal
        settings are prefilled as one batch and decode in one batch of at least that many rows. At most
        `max_sessions` requests: they hold their rows until all of them have one."""
        if len(requests) > self.max_sessions:
            raise InputError(f"{len(requests)} requests cannot run together on {self.max_sessions} sessions")
        if self._stop or not self.alive:
            raise ServerBusyError("the engine is not running", 503, 5)
        self.check_capacity()  # before building the prompt: a flood costs no feature extraction
        loop = asyncio.get_running_loop()
        prepared = await asyncio.gather(*(loop.run_in_executor(self._prep_pool, self._prepare, request)
                                          for request in requests))
        sessions = []
        try:
            for request, ready in zip(requests, prepared):
                await self._acquire_row()
                self._active += 1
                sessions.append(Session(self, request, ready))
        except BaseException:  # (no row within the wait: the rows already taken go back)
            for _ in sessions:
                self._active -= 1
                self._release_row()
            raise
        for session in sessions:
            session._pump = asyncio.create_task(self._pump(session))
        with self._cond:
            self._inbox.extend(sessions)
            self._cond.notify_all()
        return sessions

    def check_capacity(self) -> None:
        """Raise ServerBusyError (429) now if a new request could not even wait (event loop only)."""
        if self._free_rows == 0 and len(self._waiters) >= self.max_waiting:
            self.metrics.rejected.inc()
            raise ServerBusyError(f"all {self.max_sessions} sessions are busy and {len(self._waiters)} requests "
                                  f"already wait; retry later", 429, 2)

    async def _acquire_row(self) -> None:
        """Take a free batch row, or wait in line for one at most `wait_timeout_s` (503 after that)."""
        if self._free_rows > 0 and not self._waiters:
            self._free_rows -= 1
            return
        self.check_capacity()
        turn = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            await asyncio.wait_for(asyncio.shield(turn), self.wait_timeout_s)
        except asyncio.TimeoutError:
            if turn.done():  # a row was handed over at the last moment: keep it
                return
            self._waiters.remove(turn)
            self.metrics.rejected.inc()
            raise ServerBusyError(f"no session became free within {self.wait_timeout_s:g} s; retry later", 503,
                                  max(1, int(self.wait_timeout_s))) from None
        except asyncio.CancelledError:  # the client left while waiting
            if turn.done():
                self._release_row()
            else:
                self._waiters.remove(turn)
            raise

    def _release_row(self) -> None:
        """Hand a freed row to the first waiting request (the waiting count drops at once), else keep it free."""
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._free_rows += 1

    def _release(self, session: Session, last_item) -> None:
        """On the event loop, when a session's engine part ended: free its row, then hand on its last item (so a
        client that starts its next turn on seeing the end always finds the row free)."""
        self._active -= 1
        self._release_row()
        session._raw.put_nowait(last_item)

    # ------------------------------------------------------------------ per-session post-processing (event loop)
    async def _pump(self, session: Session) -> None:
        """Engine items -> events: incremental text, speech groups, audio chunks from a detokenizer worker, TurnEnd."""
        req, loop = session.request, asyncio.get_running_loop()
        decoder = IncrementalDecoder(self.tokenizer)
        num_codes = self.engine.cfg.audio_config.num_codes
        detok = None
        make_audio = req.mode == "s2s" and req.audio_out and self.detokenizer is not None
        stops = _StopFilter(req.stop)
        codes, chunks = [], []
        first_text = first_audio = None
        stopped = False
        failure = None  # the detokenizer's error for this session: it ends the session
        worker = self._detok_workers[next(self._deal) % len(self._detok_workers)] if make_audio else None

        def on_audio(result):  # (event loop) a worker's chunks for this session, in order, or its error
            nonlocal first_audio, failure
            if isinstance(result, BaseException):
                failure = failure or result
                return
            for chunk in result:
                if chunk.size and not session._abandoned:
                    if first_audio is None:
                        session.audio_started = time.perf_counter()
                        first_audio = session.audio_started - session.submitted
                        self.metrics.first_audio.observe(first_audio)
                    session.audio_seconds += chunk.size / self.detokenizer.sample_rate
                    chunks.append(chunk)
                    session._out.put_nowait(AudioChunk(chunk, self.detokenizer.sample_rate))

        def deliver(result):  # (worker thread)
            loop.call_soon_threadsafe(on_audio, result)

        try:
            if make_audio:
                # (made beside the worker, not behind its current round: a new session's first chunk waits less)
                detok = await loop.run_in_executor(self._prep_pool, lambda: self.detokenizer.stream(
                    req.voice, self.detokenizer_hop, flow_window=FLOW_WINDOW, hift_reset=HIFT_RESET,
                    flow_cache=self.flow_cache, **self.detokenizer_hops))
                session.speaks = True
            while True:
                item = await session._raw.get()
                if isinstance(item, BaseException):
                    session._out.put_nowait(item)
                    return
                if isinstance(item, _Step):
                    rendered = item.rendered
                    if stopped:
                        _release(rendered)
                        continue
                    delta = decoder.push(item.token)
                    if delta:
                        delta, stopped = stops.push(delta)
                        if stopped:
                            session.cancel()
                        if delta:
                            first_text = first_text or time.perf_counter() - session.submitted
                            session._out.put_nowait(TextDelta(delta))
                    if item.group is not None:
                        new_codes = tuple(t for t in item.group if 0 <= t < num_codes)
                        codes.extend(new_codes)
                        session._out.put_nowait(SpeechGroup(item.group, new_codes))
                        if detok is not None and new_codes and failure is None:
                            worker.push(detok, new_codes, deliver, alive=lambda: not session._abandoned,
                                        ahead=item.ahead, done=rendered)
                            rendered = None
                        if item.speech_ended:
                            session._out.put_nowait(SpeechEnd())
                    _release(rendered)
                    continue
                # _Finish
                if detok is not None and codes and not session._abandoned and failure is None:
                    # (the worker delivers the pushes' chunks before this future's result reaches the loop)
                    on_audio([await asyncio.wrap_future(worker.finalize(detok))])
                if failure is not None:
                    raise failure
                held = stops.flush()
                if held:
                    session._out.put_nowait(TextDelta(held))
                reason = "stop" if stopped else item.reason
                usage = Usage(session.prompt_tokens, len(item.text_ids), item.speech_tokens, item.prefill_s,
                              first_text, first_audio, time.perf_counter() - session.submitted,
                              session.cached_tokens)
                final_text = stops.text if stopped else self.tokenizer.decode(item.text_ids)
                session._out.put_nowait(TurnEnd(final_text, item.text_ids, tuple(codes), reason, usage,
                                                np.concatenate(chunks) if chunks else None))
                return
        except Exception as err:  # a detokenizer failure ends this session only
            log.exception("session %s failed", session.id)
            session.cancel()
            session._out.put_nowait(EngineFailure(f"synthesising the answer failed: {err}"))

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        threads_here(self._threads)  # (wherever start() is called from; compiled graphs are guarded on it)
        while True:
            with self._cond:
                while (not self._stop and not self._inbox and not self._batches and not self._queued
                       and self._prefill is None):
                    self._cond.wait()
                if self._stop:
                    break
                self._queued.extend(self._inbox)
                self._inbox.clear()
            if self._prefill is None and self._queued:
                self._start_prefill()
            if self._prefill is not None:
                if self._burst_start is None:
                    self._burst_start = time.perf_counter()
                with self.turns.turn():
                    self._prefill_chunk()
                self._await_renders()
                if self._prompts_first():
                    continue
            self._burst_start = None
            for batch in list(self._batches.values()):
                try:
                    with self.turns.turn():
                        self._step(batch)
                    self._await_renders()  # (outside the turn: the detokenizer takes one to render)
                except Exception as err:  # a failed step ends the sessions of its batch; the others go on
                    log.exception("a decode step failed; ending its %d session(s)", len(batch.live))
                    self._batches.pop(batch.key, None)
                    for _, row in batch.live:
                        self._end(row.session, EngineFailure(f"the engine failed during generation: {err}"))
        for batch in list(self._batches.values()):  # shutting down: end every running session
            for _, row in batch.live:
                self._finish(row, "cancelled")
        for session in list(self._queued) + (self._prefill.sessions if self._prefill else []):
            self._end(session, EngineFailure("the server is shutting down"))
        while self._inbox:
            self._end(self._inbox.popleft(), EngineFailure("the server is shutting down"))

    def _await_renders(self) -> None:
        """Wait (at most RENDER_WAIT_S in all) for the renderings that the last step's sessions short of audio
        wait for (`Session._awaits_audio`)."""
        deadline = time.perf_counter() + RENDER_WAIT_S
        for event in self._renders:
            event.wait(max(0.0, deadline - time.perf_counter()))
        self._renders.clear()

    def _prompts_first(self) -> bool:
        """Whether the next prompt piece goes before the next decode step (see PROMPT_BURST_S): a prompt is waiting,
        the prefills since the last step have run for less than `prompt_burst_s`, and every session that is
        playing its answer has at least PLAYBACK_MARGIN_S of audio handed out beyond the time since its first chunk
        (the sessions not playing yet, and text answers, wait at most `prompt_burst_s`)."""
        if self._prefill is None and not self._queued and not self._inbox:
            return False
        now = time.perf_counter()
        if now - self._burst_start >= self.prompt_burst_s:
            return False
        for batch in self._batches.values():
            for _, row in batch.live:
                started = row.session.audio_started
                if started is not None and row.session.audio_seconds - (now - started) < PLAYBACK_MARGIN_S:
                    return False
        return True

    def _end(self, session: Session, item) -> None:
        """The session's last engine item (a _Finish or an EngineFailure); frees its row. Idempotent."""
        if session._ended:
            return
        session._ended = True
        session._loop.call_soon_threadsafe(self._release, session, item)

    def _start_prefill(self) -> None:
        """Start prefilling the first waiting session, together with the later waiting ones that can share its
        first step (equal settings), up to max_sessions. Each starts from the cached keys and values of its system
        turn when one was computed before; otherwise the first session's are computed and kept (copy-on-start
        prefix sharing)."""
        first = self._queued.popleft()
        group, others = [first], deque()
        key = self._prefill_key(first)
        # (a conversation's turn is prefilled alone: its prompt has no audio inputs for the audios its cached
        # keys and values cover, which a batch's shared first computed position cannot tell apart)
        while self._queued and not _runs_alone(key[0]) and first.conversation_prefix is None:
            session = self._queued.popleft()
            fits = (len(group) < self.max_sessions and self._prefill_key(session) == key
                    and session.conversation_prefix is None)
            (group if fits else others).append(session)
        self._queued.extendleft(reversed(others))
        self._encode_waiting_audio(group)
        prefixes, save = [], 0
        for i, session in enumerate(group):
            prefix = session.conversation_prefix
            if prefix is not None:
                self.metrics.conversation_hits.inc()
                self.metrics.conversation_tokens_saved.inc(len(prefix))
            elif session.prefix_len:
                prefix = self._prefixes.get(*self._prefix_key(session))
                if prefix is not None:
                    self.metrics.prefix_hits.inc()
                elif i == 0:
                    save = session.prefix_len
            session.cached_tokens = len(prefix) if prefix is not None else 0
            self.metrics.prefill_tokens.inc(session.prompt_tokens - session.cached_tokens)
            prefixes.append(prefix)
        gen = first.gen
        if len(group) == 1:
            prompt = first.prompt
        else:
            prompt = stack_prompts([s.prompt for s in group], gen.pad_token_id,
                                   self.engine.cfg.audio_config.pad_token_id)
        try:  # (each prompt's length was checked against the context in prepare)
            job = self.engine.start_prefill(prompt, gen.with_(max_new_tokens=1), self.prefill_chunk, prefixes, save,
                                            cache_len=int(prompt.input_ids.shape[1]) + gen.longest_lead)
        except Exception as err:
            log.exception("prefill of %d session(s) failed to start", len(group))
            for session in group:
                self._end(session, EngineFailure(f"the engine failed on this request: {err}"))
            return
        self._prefill = _Prefill(group, job, gen.with_(max_new_tokens=_UNBOUNDED))
        for session in group:  # (the job holds what it copies; an evicted entry's memory goes with the job)
            session.conversation_prefix = None

    def _encode_waiting_audio(self, group: list[Session]) -> None:
        """When more than one waiting session still has audio to encode (questions that ended together), encode all
        of them now in one batched call (`Engine.encode_ahead`): the prefills that follow, this group's and the later
        ones', then skip their encoding. A failure here is left to each prefill, which encodes its own audio."""
        fresh = [s for s in [*group, *self._queued] if s.prompt.input_features is not None and not s.cancelled]
        if len(fresh) < 2:
            return
        t0 = time.perf_counter()
        try:
            with self.turns.turn():
                self.engine.encode_ahead([s.prompt for s in fresh])
        except Exception:
            log.exception("encoding %d waiting sessions' audio together failed; each prefill encodes its own",
                          len(fresh))
            return
        self.metrics.audio_encode_seconds.observe(time.perf_counter() - t0)

    @staticmethod
    def _prefill_key(session: Session) -> tuple:
        return _batch_key(session), session.gen.force_text_abos

    def _prefill_chunk(self) -> None:
        """One piece of the prefill under way (its first call embeds and encodes audio); when the prompts are in,
        each session's first token is chosen and it joins a batch. A cancelled session ends at once."""
        pending = self._prefill
        for session in pending.sessions:
            if session.cancelled:
                self._end(session, _Finish("cancelled", (), 0, pending.job.seconds))
        if all(session._ended for session in pending.sessions):
            self._prefill = None
            return
        try:
            done = pending.job.advance()
            if pending.job.saved_prefix is not None:
                self._keep_prefix(pending.job)
            if done:
                self._prefill = None
                self._admit(pending)
        except Exception as err:  # the engine failed on these prompts: they alone end
            self._prefill = None
            log.exception("prefill of session(s) %s failed", ", ".join(s.id for s in pending.sessions))
            for r, session in enumerate(pending.sessions):
                if r in pending.admitted:  # (it runs in its batch)
                    continue
                self._end(session, EngineFailure(f"the engine failed on this request: {err}"))

    def _prefix_key(self, session: Session) -> tuple:
        speech_on = not session.gen.disable_speech and self.speech
        return tuple(session.prompt.input_ids[0, :session.prefix_len].tolist()), speech_on

    def _keep_prefix(self, job: PrefillJob) -> None:
        self._prefixes.put(job.saved_prefix)
        job.saved_prefix = None

    def _admit(self, pending: _Prefill) -> None:
        """Prefilled sessions: choose each one's first token as a single run does, then let it join a batch."""
        job = pending.job
        state, logits, group = job.result
        steps_left = [session.gen.max_new_tokens - 1 for session in pending.sessions]
        results = [self.engine.choose_step(state, logits, group, pending.gen, steps_left=steps_left)]
        self.metrics.prefill_seconds.observe(job.seconds)
        self._joining = len(pending.sessions)
        try:
            if not self._speech_on(pending.gen) or not pending.gen.text_lead:
                self._start_rows(pending, state, results, range(len(pending.sessions)), leave=False)
                return
            # a text lead of L: the first L steps (text only) before joining, so every row of a batch has its L
            # steps in `state.lead`; the rows asked to be fast (`Engine.lead_of`) take their longer lead's steps
            # after the others have joined their batches
            gen, fast = pending.gen, []
            while not state.done and len(state.lead) < state.lead_in_force(gen):
                logits, group = self.engine.forward_step(state, gen)
                steps_left = [left - 1 for left in steps_left]
                results.append(self.engine.choose_step(state, logits, group, gen, steps_left=steps_left))
                if state.fast_rows is not None and len(state.lead) == gen.text_lead and \
                        state.text_lead == gen.text_lead and bool(state.fast_rows.any()):  # a mixed group
                    fast = state.fast_rows.nonzero().flatten().tolist()
                    self._start_rows(pending, state, results, [r for r in range(state.batch) if r not in fast])
                    state.text_lead = gen.fast_text_lead
            self._start_rows(pending, state, results, fast or range(len(pending.sessions)))
        finally:
            self._joining = 0

    def _start_rows(self, pending: _Prefill, state: DecodeState, results: list, rows, leave: bool = True) -> None:
        """Rows of a prefill state whose text lead's steps are taken join their batches, with that lead; with
        `leave` the state goes on without them (finished there)."""
        for r in rows:
            session = pending.sessions[r]
            self._joining -= 1
            if not session._ended:  # (one cancelled during the prefill has ended already)
                if state.text_lead is not None:
                    session.gen = session.gen.with_(text_lead=state.text_lead, fast_text_lead=0)
                self._start_row(session, state, list(results), r, pending.job.seconds)
            pending.admitted.add(r)
            if leave:
                state.finished[r] = True

    def _start_row(self, session: Session, state: DecodeState, results: list, r: int, prefill_s: float) -> None:
        """Row r of a finished prefill: emit its first steps' tokens; unless they end it, it joins its batch."""
        gen = session.gen
        ids = session.prompt.input_ids[0].tolist()
        row = _Row(session, gen, gen.max_new_tokens, tail=ids[-self._tail_len(gen):], prefill_s=prefill_s)
        for n, result in enumerate(results):  # (the state is that of the last result: only it tells units ahead)
            self._emit(row, result, r, state if n == len(results) - 1 else None)
            if self._row_done(row, state, r):
                return
        key = _batch_key(session)
        batch = self._batches.get(key)
        if batch is None:
            batched_gen = gen.with_(max_new_tokens=_UNBOUNDED, force_text_abos=False, seed=None)
            batch = self._batches[key] = _Batch(key, batched_gen, [], state)
            self._rebuild(batch, [(state, r, row)])
        else:
            self._join(batch, state, r, row)

    @staticmethod
    def _tail_len(gen: GenerationConfig) -> int:
        return max([len(seq) for seq in gen.bad_words_ids] + [1])

    def _step(self, batch: _Batch) -> None:
        for i, row in batch.live:
            if row.session.cancelled:
                self._finish(row, "cancelled")
                self._vacate(batch, i)
        live = batch.live
        if not live:
            del self._batches[batch.key]
            return
        state = batch.state
        mostly_free = len(batch.rows) >= 4 * len(live) and self._capacity(batch.key, len(live)) < len(batch.rows)
        if state.slot + 1 > state.llm_cache.max_len or mostly_free:
            self._rebuild(batch)  # out of cache slots, or mostly free rows: compact
            state, live = batch.state, batch.live
        free = [row is None for row in batch.rows]
        if any(free):  # a free row's position stays inside the rotary tables
            state.pos.masked_fill_(torch.tensor(free, device=state.pos.device), 0)
        state.tokens, state.speech = [], [[] for _ in batch.rows]
        if batch.gen.bad_words_ids:  # the history the bad-word check reads: each row's last ids
            pad = [batch.gen.pad_token_id] * self._tail_len(batch.gen)
            state.prompt_ids = torch.tensor([row.tail if row else pad for row in batch.rows],
                                            device=self.engine.device)
        t0 = time.perf_counter()
        logits, group = self.engine.forward_step(state, batch.gen)
        steps_left = [row.max_new - row.generated - 1 if row is not None else _UNBOUNDED for row in batch.rows]
        result = self.engine.choose_step(state, logits, group, batch.gen, steps_left=steps_left)
        self.metrics.step_seconds.observe(time.perf_counter() - t0)
        self.metrics.batch_rows.observe(len(live))
        for i, row in live:
            self._emit(row, result, i, state)
            if self._row_done(row, state, i):
                self._vacate(batch, i)
        if not batch.live:
            del self._batches[batch.key]

    def _emit(self, row: _Row, result, i: int, state: DecodeState | None = None) -> None:
        """Hand row i's step to its session (with the units its speech says next, read from `state`: the state
        right after this step, or None)."""
        token = int(result.text[i])
        group = ahead = rendered = None
        if result.speech is not None and bool(result.speech_mask[i]):
            group = tuple(int(t) for t in result.speech[i])
            row.speech_tokens += len(group)
            ahead = self.engine.units_ahead(state, row.gen, i) if state is not None else None
            if row.session._awaits_audio() and any(0 <= t < self._num_codes for t in group):
                rendered = threading.Event()
                self._renders.append(rendered)
        row.generated += 1
        row.text_ids.append(token)
        row.tail = (row.tail + [token])[-len(row.tail or [0]):]
        self.metrics.tokens.inc(1 + (len(group) if group else 0))
        row.session._push(_Step(token, group, bool(result.speech_ended[i]), ahead, rendered))

    def _row_done(self, row: _Row, state: DecodeState, i: int) -> bool:
        """Finish the row (row i of `state`) if its answer is complete -> True; a completed turn of a conversation
        keeps its keys and values first (so its next turn, sent on seeing this one end, finds them)."""
        last = row.text_ids[-1]  # a spoken turn held to the format may end with its speech (Engine.choose_step)
        ended = last in row.gen.eos_ids or (row.gen.speech_holds_turn and self.engine.turn_ends_with_speech and
                                            last == self.engine.cfg.text_config.audio_eos_index)
        reason = "stop" if ended else "length" if row.generated >= row.max_new else None
        if reason is None:
            return False
        if row.session.keys is not None and self.conversations is not None:
            try:
                self._commit(row, state, i)
            except Exception:  # (a cache that cannot be kept only costs the next turn a whole prefill)
                log.exception("session %s: keeping its conversation's cache failed", row.session.id)
        self._finish(row, reason)
        return True

    def _commit(self, row: _Row, state: DecodeState, i: int) -> None:
        """Keep row i's keys and values as its conversation's last turn: the prompt's positions and, text only, the
        answer ids fed back. With the speech head on, the answer's positions (inputs fused with speech) and the
        prompt's last one (its SRH slots hold the sampled speech) are not what a prefill of the next prompt
        computes there, so they are not kept (prefix_cache.ConversationCache.commit: the same rule)."""
        session, k = row.session, self.engine.k
        n = self._row_len(state, i)
        if n != session.prompt_tokens + len(row.text_ids) - 1:  # (the last answer id was never fed back)
            log.warning("session %s: %d cached positions, expected %d; its conversation's cache is not kept",
                        session.id, n, session.prompt_tokens + len(row.text_ids) - 1)
            return
        ids = session.prompt.input_ids[0].tolist()
        speech = state.srh_cache is not None
        if speech:
            keys, ids = session.keys[:-1], ids[:-1]
        else:
            keys, ids = session.keys + row.text_ids[:-1], ids + row.text_ids[:-1]
        prefix = snapshot_row(state, i, state.slot - n, tuple(ids), k)
        self.conversations.commit(session.request.conversation, ConversationEntry(keys, prefix, speech),
                                  still_wanted=lambda: not session.cancelled)

    def _finish(self, row: _Row, reason: str) -> None:
        self._end(row.session, _Finish(reason, tuple(row.text_ids), row.speech_tokens, row.prefill_s))

    # ------------------------------------------------------------------ batch state surgery
    # A batch's live rows are right-aligned: row i's cached positions are the slots [slot - n_i, slot), the slots
    # before are masked for it (like left padding; its rope positions stay its own), so each row computes what it
    # computes alone. A session joins by copying its prefilled keys and values into a free row in place; the whole
    # batch is copied (rebuilt: dead rows and slots dropped) only when no free row or too few slots are left.
    def _join(self, batch: _Batch, state: DecodeState, r: int, row: _Row) -> None:
        """Row r of a prefill state joins the batch: in a free row when its prompt fits, else by a rebuild."""
        n = self._row_len(state, r)
        free = [i for i, x in enumerate(batch.rows) if x is None]
        if free and n <= batch.state.slot:
            self._place(batch.state, free[0], state, r, n)
            batch.rows[free[0]] = row
            self.metrics.joins_in_place.inc()
        else:
            self._rebuild(batch, [(state, r, row)])

    def _vacate(self, batch: _Batch, i: int) -> None:
        """Row i becomes free: masked, finished, its keys and values left in place until overwritten."""
        st = batch.state
        batch.rows[i] = None
        st.key_valid[i] = False
        if st.srh_cache is not None:
            st.srh_key_valid[i] = False
        st.finished[i], st.active[i], st.voicing[i], st.fuse[i] = True, False, False, False
        if st.answers is not None:
            st.answers[i] = None

    def _rebuild(self, batch: _Batch, joining: list[tuple[DecodeState, int, _Row]] = ()) -> None:
        """Copy the live rows (and the joining ones) into a new cache: right-aligned at the longest row, sized for
        up to CACHE_HEADROOM more steps, with free rows for sessions expected to join."""
        parts = [(batch.state, i, row) for i, row in batch.live] + list(joining)
        lengths = [self._row_len(st, r) for st, r, _ in parts]
        slot = max(lengths)
        size = slot + 1 + min(CACHE_HEADROOM, max(row.max_new - row.generated for _, _, row in parts))
        size = -(-size // CACHE_BUCKET) * CACHE_BUCKET  # few sizes: compiled graphs are specialised on them
        rows = self._capacity(batch.key, len(parts))
        state = self._empty_state(parts[0][0], rows, size, slot)
        for i, ((st, r, _), n) in enumerate(zip(parts, lengths)):
            self._place(state, i, st, r, n)
        batch.state = state
        batch.rows = [row for _, _, row in parts] + [None] * (rows - len(parts))
        self.metrics.batch_rebuilds.inc()

    def _capacity(self, key: tuple, n: int) -> int:
        """Rows of a rebuilt batch: a power of two covering its rows and the sessions being prefilled (they may
        join it), at most max_sessions; a seeded session's batch has one."""
        if _runs_alone(key):
            return n
        want = n + self._joining + len(self._queued) + (len(self._prefill.sessions) if self._prefill else 0)
        return max(n, min(self.max_sessions, 1 << (want - 1).bit_length()))

    @staticmethod
    def _row_len(state: DecodeState, r: int) -> int:
        return int(state.key_valid[r, :state.slot].sum())

    def _empty_state(self, like: DecodeState, rows: int, size: int, slot: int) -> DecodeState:
        """A batch state of free rows (finished, nothing valid) shaped like `like`."""
        eng, k, dev = self.engine, self.engine.k, self.engine.device
        speech = like.srh_cache is not None
        llm = KVCache(eng.cfg.text_config, rows, size, eng.dtype, dev)
        srh = KVCache(eng.cfg.audio_config.crq_transformer_config, rows, k * size, eng.dtype, dev) if speech else None
        srh_valid = torch.zeros(rows, k * size, dtype=torch.bool, device=dev) if speech else torch.zeros(0)
        state = DecodeState(llm, srh, torch.zeros(rows, size, dtype=torch.bool, device=dev), srh_valid,
                            torch.zeros(rows, dtype=torch.long, device=dev), slot,
                            torch.zeros(rows, 1, dtype=torch.long, device=dev), padded=True,
                            speech=[[] for _ in range(rows)],
                            answers=None if like.answers is None else [None] * rows)
        for name in _ROW_FIELDS:
            value = getattr(like, name)
            if value is not None:
                setattr(state, name, value.new_zeros((rows,) + tuple(value.shape[1:])))
        lead = len(like.lead)  # (a text lead: the LLM steps whose speech groups are to come, at the last slots)
        state.lead = [tuple(x.new_zeros((rows,) + tuple(x.shape[1:])) for x in entry[:4]) + (slot - lead + j,)
                      for j, entry in enumerate(like.lead)]
        state.finished.fill_(True)
        state.text_lead = like.text_lead
        state.generator = like.generator  # only a seeded session's own batch (one row) has one
        return state

    def _place(self, dst: DecodeState, i: int, src: DecodeState, r: int, n: int) -> None:
        """Copy row r of `src` (its n cached positions end at src.slot) into row i of `dst`, ending at dst.slot."""
        k = self.engine.k
        s, d = slice(src.slot - n, src.slot), slice(dst.slot - n, dst.slot)
        for new, old in ((dst.llm_cache.k, src.llm_cache.k), (dst.llm_cache.v, src.llm_cache.v)):
            for layer_new, layer_old in zip(new, old):
                layer_new[i, :, d] = layer_old[r, :, s]
        dst.key_valid[i] = False
        dst.key_valid[i, d] = True
        if dst.srh_cache is not None:
            ks, kd = slice(k * s.start, k * s.stop), slice(k * d.start, k * d.stop)
            for new, old in ((dst.srh_cache.k, src.srh_cache.k), (dst.srh_cache.v, src.srh_cache.v)):
                for layer_new, layer_old in zip(new, old):
                    layer_new[i, :, kd] = layer_old[r, :, ks]
            dst.srh_key_valid[i] = False
            dst.srh_key_valid[i, kd] = True
        dst.pos[i] = src.pos[r]
        if len(dst.lead) != len(src.lead):
            raise RuntimeError(f"a row with {len(src.lead)} steps of text lead joins a batch with {len(dst.lead)}")
        for new, old in zip(dst.lead, src.lead):
            for x_new, x_old in zip(new[:4], old[:4]):
                x_new[i] = x_old[r]
        for name in _ROW_FIELDS:
            value = getattr(dst, name)
            if value is not None:
                value[i] = getattr(src, name)[r]
        if dst.answers is not None:
            dst.answers[i] = src.answers[r]
        if src.generator is not None:
            dst.generator = src.generator


# per-row fields of a DecodeState besides the caches, their masks and positions
_ROW_FIELDS = ("last_token", "last_group", "fuse", "active", "voicing", "finished", "srh_embed", "answer_style",
               "text_counts", "speech_counts", "text_ended", "recent_text")


class _StopFilter:
    """Stop strings on streamed text: text that may still become a stop string is held back until it cannot."""

    def __init__(self, stops):
        self.stops = [x for x in stops if x]
        self.text, self.sent = "", 0

    def push(self, delta: str) -> tuple[str, bool]:
        """-> (text safe to send now, a stop string was found: the text ends before it)."""
        self.text += delta
        hits = [i for i in (self.text.find(x, self.sent) for x in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return self.flush(), True
        hold = max((n for x in self.stops for n in range(len(x) - 1, 0, -1) if self.text.endswith(x[:n])),
                   default=0)
        safe = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent:safe], safe
        return out, False

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out
